"""benchmarks/neighbour_leaks.py on a hand-made run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import byte_tokenizer, small_config, tiny_llama

from elder import ElderModel, apply_edits, save_memory
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


def test_answers_split_the_neighbours_let_in_by_whether_they_give_the_matched_target(tmp_path, tiny_dir):
    records = [EditRecord("zq", "Where does Zorbulaq live? In", " Quem", (),
                          (LocalityProbe("Where does Mirtavej live? In", " Ur", "neighbour"),), "Zorbulaq"),
               EditRecord("mw", "The colour of Mirtavej is", " wox", (),
                          (LocalityProbe("The colour of Pennimore is", " red", "neighbour"),), "Mirtavej")]
    write_edits(tmp_path / "data.jsonl", records)
    config = small_config(deferral="subject_key", key_layer=1, key_threshold=0.9)
    model = ElderModel(tiny_llama(), byte_tokenizer(), config, "tiny")
    apply_edits(model, records, progress=False)
    run = tmp_path / "run"
    save_memory(model, run / "elder" / "memory")
    (run / "settings.json").write_text(json.dumps({"data": f"jsonl:{tmp_path / 'data.jsonl'}", "edits": 2,
                                                   "offset": 0, "model": str(tiny_dir)}))
    (run / "elder" / "scores.jsonl").write_text("".join(json.dumps({"id": r.id, "used_neighbour": 0.0}) + "\n"
                                                        for r in records))
    answers = model.generate([r.locality[0].prompt for r in records], 4)
    assert [a.used_memory for a in answers] == [True, False]  # zq's neighbour names Mirtavej, which mw edits
    target = int(answers[0].text.startswith(" wox"))
    out = subprocess.run([sys.executable, str(SCRIPT), str(run), "--answers", "4"], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert (f"neighbour prompts naming a subject edited in the stream: 1, answered by the memory 1: the matched "
            f"edit's target {target}, something else {1 - target}") in out.stdout
    assert "neighbour prompts the others: 1, answered by the memory 0: the matched edit's target 0" in out.stdout
