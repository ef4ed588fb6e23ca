"""benchmarks/ablation.py runs several settings on one edit stream and refuses a bad setting before training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import byte_tokenizer, tiny_llama

from elder.data import EditRecord, LocalityProbe, write_edits

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ablation.py"
TINY = {"first_layer": 3, "num_layers": 2, "num_experts": 8, "rank": 4, "lr": 0.03, "iterations": 100}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ablation")
    tiny_llama().save_pretrained(folder / "tiny")
    byte_tokenizer().save_pretrained(folder / "tiny")
    # the first edit's neighbour names the second edit's subject; the others name none
    write_edits(folder / "edits.jsonl", [
        EditRecord(f"e{i}", f"Q{i}: sky?", "violet", (f"Sky {i}?",),
                   (LocalityProbe(f"Z{i}: sea?", "blue"), LocalityProbe("Q1: sea?" if i == 0 else f"W{i}: sea?",
                                                                        "green", "neighbour")), subject=f"Q{i}")
        for i in range(4)])
    return folder


def ablation(folder: Path, *configs: str) -> subprocess.CompletedProcess:
    args = [sys.executable, str(SCRIPT), "--data", f"jsonl:{folder / 'edits.jsonl'}", "--model", str(folder / "tiny"),
            "--edits", "4", "--json", str(folder / "rows.json")]
    for config in configs:
        args += ["--config", config]
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_each_config_gets_a_row_on_the_same_stream(inputs):
    done = ablation(inputs, json.dumps(TINY), json.dumps({**TINY, "settle_routes": False}))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((inputs / "rows.json").read_text())
    assert [r["settings"].get("settle_routes") for r in rows] == [None, False]
    for row in rows:
        assert row["edits"] == 4 and row["learned_when_trained"] == 1.0 and row["steps_per_batch_mean"] >= 1
        assert 0.0 <= row["rel_first_fifth"] <= 1.0 and row["used_prompt"] == 1.0  # learned edits answer from memory
        assert row["neighbours_naming_edited"] == 1  # "Q1: sea?" names edit e1's subject, "W2: sea?" none
        assert 0.0 <= row["loc_neighbour_naming"] <= 1.0 and 0.0 <= row["loc_neighbour_other"] <= 1.0
    assert sum('"settle_routes": false' in line for line in done.stdout.splitlines()) == 1


def test_a_bad_setting_is_refused_before_anything_trains(inputs):
    done = ablation(inputs, json.dumps(TINY), json.dumps({"num_expert": 3}))
    assert done.returncode != 0 and "num_expert" in done.stderr and "first" not in done.stdout
