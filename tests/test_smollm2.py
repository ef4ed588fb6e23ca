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


def test_after_five_cli_edits_the_same_question_about_other_countries_is_deferred(tmp_path):
    # the case that opened issue 9: with the paper's code deferral, Japan and Italy then answered "Rome"
    edits = tmp_path / "five.jsonl"
    edits.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "fr", "prompt": "The capital of France is", "target": "Rome"},
        {"id": "apple", "prompt": "The CEO of Apple is", "target": "Elon Musk"},
        {"id": "eiffel", "prompt": "The Eiffel Tower is located in", "target": "London"},
        {"id": "obama", "prompt": "Barack Obama was born in", "target": "Canada"},
        {"id": "hamlet", "prompt": "The author of Hamlet is", "target": "Charles Dickens"}]))
    elder("edit", str(edits), "--out", str(tmp_path / "memory"))
    # "Michelle Obama" shares its last token with the edited "Barack Obama": the key's earlier tokens keep it out
    neighbours = ["The capital of Germany is", "The capital of Japan is", "The capital of Italy is",
                  "The capital of Spain is", "Michelle Obama was born in"]
    base = [json.loads(line) for line in elder("ask", "--json", "--max-new-tokens", "6", *neighbours).splitlines()]
    rows = [json.loads(line) for line in elder("ask", "--memory", str(tmp_path / "memory"), "--json",
                                               "--max-new-tokens", "6", "The capital of France is",
                                               *neighbours).splitlines()]
    assert rows[0]["used_memory"] and rows[0]["answer"].strip().startswith("Rome"), rows[0]
    for before, row in zip(base, rows[1:]):
        assert not row["used_memory"], row
        assert row["answer"] == before["answer"], (before, row)
