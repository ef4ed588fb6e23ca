"""benchmarks/speed.py runs end to end on a tiny model and reports every number issue 4 asks for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import byte_tokenizer, tiny_llama

from elder.data import EditRecord, LocalityProbe, write_edits

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


def test_speed_script_prints_the_comparison(tmp_path):
    model = tmp_path / "tiny"
    tiny_llama().save_pretrained(model)
    byte_tokenizer().save_pretrained(model)
    data = tmp_path / "edits.jsonl"
    write_edits(data, [EditRecord(f"e{i}", f"Q{i}: sky?", "violet", (), (LocalityProbe(f"Z{i}: sea?", "blue"),))
                       for i in range(4)])
    out = tmp_path / "speed.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--data", f"jsonl:{data}", "--model", str(model), "--edits", "4",
         "--plain-edits", "2", "--set", "first_layer=3", "--set", "num_layers=2", "--set", "lr=0.03",
         "--json", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    for text in ("fast vs plain", "generation, edited prompts", "generation, unrelated prompts", "peak RSS",
                 "100,000 codes"):
        assert text in result.stdout
    numbers = json.loads(out.read_text())
    assert set(numbers["lookup_ms"]) == {"1000", "10000", "100000"}
    assert numbers["fast"]["edits"] == 4 and numbers["plain"]["edits"] == 2
    assert numbers["memory"]["code_bytes_per_edit"] == 2 * 64 / 8  # L=2 layers x N=64 experts, one bit each
