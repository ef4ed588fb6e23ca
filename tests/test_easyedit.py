"""The EasyEdit-shaped entry: EasyEdit's argument names in, EasyEdit's per-edit metrics out."""

from __future__ import annotations

import pytest

from elder import DataError, MethodError
from elder.easyedit import BaseEditor

MEMOIR = {"layer": 5, "active": 6, "lr": 5e-2, "steps": 200, "stop_loss": 1e-3, "threshold": 0.9}


@pytest.fixture
def editor(tiny_dir):
    return BaseEditor.from_hparams({"alg_name": "MEMOIR", "model_name": str(tiny_dir)}, **MEMOIR)


def test_a_sequential_edit_returns_easyedit_metrics(editor):
    metrics, edited, _ = editor.edit(
        prompts=["Where does Zorbulaq live? In", "The colour of Mirtavej is"], target_new=[" Quem", " wox"],
        ground_truth=[" Paris", " red"], rephrase_prompts=["Zorbulaq lives in", "Mirtavej's colour is"],
        locality_inputs={"neighborhood": {"prompt": ["Where does Pennimore live? In", "The colour of Habrosk is"],
                                          "ground_truth": [" Lyon", " blue"]}},
        sequential_edit=True)
    assert edited is editor.method and edited.edited_ids == ["easyedit-0", "easyedit-1"]
    assert [m["case_id"] for m in metrics] == [0, 1]
    first = metrics[0]
    assert first["requested_rewrite"]["target_new"] == " Quem" and first["requested_rewrite"]["ground_truth"] == " Paris"
    assert first["post"]["rewrite_acc"] == [1.0] and first["pre"]["rewrite_acc"][0] < 1.0
    assert 0.0 <= first["post"]["rephrase_acc"][0] <= 1.0
    # the neighbour is deferred (another subject's mask): the base model's tokens, as EasyEdit's locality counts
    assert first["post"]["locality"] == {"neighborhood_acc": [1.0]} and first["pre"]["locality"] == {}
    assert first["time"] > 0 and "portability" in first["post"]


def test_edits_one_at_a_time_are_scored_right_after_each(editor):
    metrics, _, _ = editor.edit(prompts="Where does Zorbulaq live? In", target_new=" Quem", sequential_edit=False)
    assert len(metrics) == 1 and metrics[0]["post"]["rewrite_acc"] == [1.0] and "rephrase_acc" not in metrics[0]["post"]
    again, _, _ = editor.edit(prompts="The colour of Mirtavej is", target_new=" wox")
    assert editor.method.edited_ids == ["easyedit-0", "easyedit-1"] and again[0]["post"]["rewrite_acc"] == [1.0]


def test_mismatched_or_unknown_input_is_a_one_line_error(editor, tiny_dir):
    with pytest.raises(DataError, match="2 prompts but 1 target_new"):
        editor.edit(prompts=["a b", "c d"], target_new=[" x"])
    with pytest.raises(DataError, match="rephrase_prompts has 1 entries for 2 prompts"):
        editor.edit(prompts=["a b", "c d"], target_new=[" x", " y"], rephrase_prompts=["e"])
    assert editor.method.edited_ids == []  # nothing was applied
    with pytest.raises(MethodError, match="unknown editing method 'ROME'"):
        BaseEditor.from_hparams({"alg_name": "ROME", "model_name": str(tiny_dir)})
    with pytest.raises(DataError, match="alg_name"):
        BaseEditor.from_hparams({"model_name": str(tiny_dir)})
