"""The command line on a tiny saved model: edit, resume, ask --json, malformed records, a corrupt memory."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from elder.cli import app
from elder.data import EditRecord, write_edits

SETTINGS = ["--set", "first_layer=3", "--set", "num_layers=2", "--set", "num_experts=8", "--set", "rank=4",
            "--set", "lr=0.03", "--set", "router_lr=0.05", "--set", "iterations=200", "--set", "epsilon=1",
            "--set", "batch_size=2", "--preset", "fast"]


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


def test_edit_then_ask_json_then_resume(tiny_dir, tmp_path):
    edits = tmp_path / "edits.jsonl"
    write_edits(edits, [EditRecord("a", "Q: sky?", "violet"), EditRecord("b", "Q: pet?", "a red fox")])
    out = tmp_path / "memory"
    result = run("edit", edits, "--out", out, "--model", tiny_dir, *SETTINGS)
    assert result.exit_code == 0, result.output
    assert "applied 2 edits" in result.output
    result = run("ask", "--memory", out, "--json", "--max-new-tokens", "10", "Q: sky?")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["used_memory"] is True and row["answer"].strip().startswith("violet")
    write_edits(edits, [EditRecord("a", "Q: sky?", "violet"), EditRecord("c", "Q: sea?", "dry")])
    assert run("edit", edits, "--out", out, "--model", tiny_dir).exit_code == 2  # exists: needs --resume
    result = run("edit", edits, "--out", out, "--resume")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "memory.json").read_text())
    assert list(manifest["edits"]) == ["a", "b", "c"]
    assert manifest["training"]["variant"] == "edit-prompt-only"


def test_malformed_record_is_reported_with_its_line(tiny_dir, tmp_path):
    edits = tmp_path / "edits.jsonl"
    edits.write_text('{"id": "a", "prompt": "Q: x?", "target": "y"}\n{"id": "b", "prompt": "Q: z?", "target": ""}\n')
    result = run("edit", edits, "--out", tmp_path / "m", "--model", tiny_dir)
    assert result.exit_code == 2
    assert "line 2" in result.output and "empty target" in result.output
    assert not (tmp_path / "m" / "memory.json").exists()


def test_unknown_setting_and_unknown_model_are_named(tiny_dir, tmp_path):
    edits = tmp_path / "edits.jsonl"
    write_edits(edits, [EditRecord("a", "Q: sky?", "violet")])
    result = run("edit", edits, "--out", tmp_path / "m", "--model", tiny_dir, "--set", "nope=1")
    assert result.exit_code == 2 and "unknown setting" in result.output
    result = run("ask", "--model", tmp_path / "no-such-model", "hello")
    assert result.exit_code == 2 and "cannot load model" in result.output


def test_edit_and_ask_with_another_method_found_from_its_saved_state(tiny_dir, tmp_path):
    edits = tmp_path / "edits.jsonl"
    write_edits(edits, [EditRecord("a", "Q: sky?", "violet")])
    out = tmp_path / "memory"
    result = run("edit", edits, "--out", out, "--model", tiny_dir, "--method", "lora", "--set", "lr=0.02",
                 "--set", "steps=200", "--set", "stop_loss=0.001")
    assert result.exit_code == 0 and "applied 1 edits (1 learned" in result.output, result.output
    assert json.loads((out / "state.json").read_text())["method"] == "lora"
    result = run("ask", "--memory", out, "--json", "--max-new-tokens", "8", "Q: sky?")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["answer"].strip().startswith("violet")
    result = run("edit", edits, "--out", out, "--resume", "--method", "elder")
    assert result.exit_code == 2 and "holds a 'lora' memory, not 'elder'" in result.output, result.output
    # a setting only ELDER has is refused for LoRA, by name; the listing shows every method
    result = run("edit", edits, "--out", tmp_path / "other", "--model", tiny_dir, "--method", "lora",
                 "--set", "key_threshold=0.9")
    assert result.exit_code == 2 and "unknown setting 'key_threshold'" in result.output, result.output
    listing = run("methods")
    assert listing.exit_code == 0 and all(f"{n}:" in listing.output for n in ("elder", "ft", "grace", "lora"))
