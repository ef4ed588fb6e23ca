"""MEMOIR: TopHash masks, overlap routing, its tuning sweep and its saved state."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import byte_tokenizer, tiny_llama

from elder import EditRecord
from elder.methods import registered
from elder.methods.hooked import StateFormatError
from elder.settings import ConfigError

SETTINGS = {"layer": 5, "active": 6, "lr": 5e-2, "steps": 200, "stop_loss": 1e-3, "threshold": 0.9}
EDITS = [EditRecord("zq", "Where does Zorbulaq live? In", " Quem"),
         EditRecord("mw", "The colour of Mirtavej is", " wox")]


def memoir(**changes):
    return registered()["memoir"].create(tiny_llama(), byte_tokenizer(), "tiny", {**SETTINGS, **changes})


def test_each_edit_stores_one_mask_of_k_features_and_its_own_prompt_matches_it_fully():
    method = memoir()
    method.edit(EDITS)
    assert method.masks.shape == (2, 64) and method.masks.sum(1).tolist() == [6, 6]
    assert method.mask_edits == ["zq", "mw"]
    answers = method.answer([e.prompt for e in EDITS], 3)
    assert [a.edit_id for a in answers] == ["zq", "mw"] and [a.distance for a in answers] == [0.0, 0.0]
    # the memory is written only in the rows the masks name
    written = method.memory.abs().sum(1) > 0
    assert torch.equal(written, method.masks.any(0))


def test_the_default_k_is_the_papers_fraction_of_the_layer_width():
    assert registered()["memoir"].create(tiny_llama(), byte_tokenizer(), "t", {}).active == round(64 * 4096 / 14336)
    with pytest.raises(ConfigError, match="active \\(65\\) exceeds the 64 input features"):
        memoir(active=65)
    with pytest.raises(ConfigError, match="threshold"):
        registered()["memoir"].config({"threshold": 1.5})


def test_the_sweep_scores_as_each_threshold_would():
    method = memoir()
    method.edit(EDITS)
    prompts = [EDITS[0].prompt, "Where does Pennimore live? In"]
    targets = [EDITS[0].target, " x"]
    for threshold, predict in method.threshold_sweep():
        method.cfg.threshold = threshold
        assert predict(prompts, targets) == method.predict(prompts, targets), threshold


def test_a_saved_mask_of_the_wrong_size_is_refused(tmp_path):
    method = memoir()
    method.edit(EDITS[:1])
    method.save(tmp_path / "m")
    state = json.loads((tmp_path / "m" / "state.json").read_text())
    state["extra"]["mask_edits"] = ["zq", "other"]
    (tmp_path / "m" / "state.json").write_text(json.dumps(state))
    with pytest.raises(StateFormatError, match="masks do not match"):
        registered()["memoir"].load(tmp_path / "m", tiny_llama(), byte_tokenizer(), "tiny")
