"""benchmarks/neighbour_leaks.py on a hand-made run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from elder.data import EditRecord, LocalityProbe, write_edits

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "neighbour_leaks.py"


def test_leaks_are_split_by_whether_the_neighbour_names_an_edited_subject(tmp_path):
    records = [EditRecord("a", "Who founded Acme?", "Bob", (), (LocalityProbe("Who founded Zeta?", "Al", "neighbour"),),
                          "Acme"),
               EditRecord("b", "Who founded Zeta?", "Cy", (), (LocalityProbe("Who founded Kodak?", "Di", "neighbour"),),
                          "Zeta"),
               EditRecord("c", "Who founded Ur?", "Ed", (), (LocalityProbe("Who founded Nokia?", "Fa", "neighbour"),),
                          "Ur")]
    write_edits(tmp_path / "data.jsonl", records)
    run = tmp_path / "run"
    (run / "elder").mkdir(parents=True)
    (run / "settings.json").write_text(json.dumps({"data": f"jsonl:{tmp_path / 'data.jsonl'}", "edits": 3,
                                                   "offset": 0}))
    used = {"a": 1.0, "b": 1.0, "c": 0.0}  # a's neighbour asks about Zeta, which b edits
    (run / "elder" / "scores.jsonl").write_text("".join(json.dumps({"id": k, "used_neighbour": v}) + "\n"
                                                        for k, v in used.items()))
    out = subprocess.run([sys.executable, str(SCRIPT), str(run)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "edited in the stream: 1, memory used on 100.0%" in out.stdout
    assert "the others: 2, memory used on 50.0%" in out.stdout
