"""benchmarks/replay.py runs end to end on a tiny model and finds both ways of training take the same steps."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from elder.data import EditRecord, write_edits

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "replay.py"


def test_replay_script_prints_both_ways_with_the_same_outcomes(tmp_path, tiny_dir):
    data = tmp_path / "edits.jsonl"
    write_edits(data, [EditRecord(f"e{i}", f"Q{i}: sky?", "violet") for i in range(2)])
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--data", f"jsonl:{data}", "--model", str(tiny_dir), "--edits", "2",
         "--methods", "grace,ft", "--rounds", "1"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| grace", "| ft"))]
    assert len(rows) == 2 and all(row.rstrip().endswith("| yes |") for row in rows), result.stdout
