"""Real edits on real knowledge: the embedded SmolLM2-135M, through the command line, in separate processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from elder.data import write_edits
from elder.demo_facts import demo_edits

pytestmark = pytest.mark.integration
UNRELATED = ["Water is made of hydrogen and", "The chemical symbol for gold is"]


def elder(*args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "elder", *args], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_edit_then_ask_in_a_new_process(tmp_path):
    records = demo_edits(4)
    edits = tmp_path / "edits.jsonl"
    write_edits(edits, records)
    base = [json.loads(line) for line in elder("ask", "--json", "--max-new-tokens", "6", *UNRELATED).splitlines()]
    elder("edit", str(edits), "--out", str(tmp_path / "memory"))
    prompts = [r.prompt for r in records] + UNRELATED
    rows = [json.loads(line) for line in
            elder("ask", "--memory", str(tmp_path / "memory"), "--json", "--max-new-tokens", "6", *prompts).splitlines()]
    for record, row in zip(records, rows):
        assert row["used_memory"], row
        assert row["answer"].strip().startswith(record.target), (record.target, row)
    # the answers must stay the base model's; whether they got there by deferral is a measured diagnostic
    # (the README's status: a router trained on few edits may route unrelated prompts to a stored code)
    for before, row in zip(base, rows[len(records):]):
        assert row["answer"] == before["answer"], (before, row)
