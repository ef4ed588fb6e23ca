"""MELO: one LoRA block per batch of edits, found through keys with radii."""

from __future__ import annotations

import pytest
import torch
from conftest import byte_tokenizer, tiny_llama

from elder import EditRecord
from elder.methods import registered
from elder.settings import ConfigError

SETTINGS = {"radius": 1e-3, "rank": 4, "alpha": 4.0, "lr": 5e-2, "steps": 200, "stop_loss": 1e-3, "batch_size": 2}
EDITS = [EditRecord("zq", "Where does Zorbulaq live? In", " Quem"),
         EditRecord("mw", "The colour of Mirtavej is", " wox"),
         EditRecord("nv", "The home of Nuvelt is", " Pra")]


def melo(**changes):
    return registered()["melo"].create(tiny_llama(), byte_tokenizer(), "tiny", {**SETTINGS, **changes})


def test_each_batch_trains_a_block_of_its_own_and_its_edits_keys_open_it():
    method = melo()
    method.edit(EDITS)
    assert len(method.A[0]) == 2 and method.key_blocks == [0, 0, 1]  # batches of 2: (zq, mw), (nv)
    assert method.paths == ["model.layers.4.mlp.up_proj", "model.layers.5.mlp.up_proj"]
    assert method.key_path == "model.layers.3.mlp.up_proj"
    answers = method.answer([e.prompt for e in EDITS], 6)
    assert [a.edit_id for a in answers] == ["zq", "mw", "nv"]
    assert all(a.text.startswith(e.target) for a, e in zip(answers, EDITS))
    frozen = method.A[0][0].clone()
    method.edit([EditRecord("qb", "The sound of Quillaby is", " brum")])
    assert torch.equal(method.A[0][0], frozen)  # a later batch never trains an earlier block


def test_a_key_near_another_blocks_key_splits_the_distance():
    method = melo(radius=1e9)  # every key reaches every other
    method.edit(EDITS)
    d = torch.cdist(method.keys[2:3], method.keys[:2])[0]
    nearest = int(d.argmin())
    assert method.radii[2].item() == pytest.approx(d[nearest].item() / 2)
    assert method.radii[nearest].item() == pytest.approx(d[nearest].item() / 2 - 1e-5)
    assert method.radii[1 - nearest].item() == 1e9  # the same block's keys do not split


def test_forgetting_an_edit_keeps_its_batchs_block_for_the_other():
    method = melo()
    method.edit(EDITS[:2])
    method.forget("zq")
    assert method.key_edits == ["mw"] and len(method.A[0]) == 1
    assert method.answer([EDITS[1].prompt], 6)[0].text.startswith(EDITS[1].target)
    assert not method.answer([EDITS[0].prompt], 4)[0].used_memory


def test_layers_outside_the_model_are_refused():
    with pytest.raises(ConfigError, match="outside a model of 6 layers"):
        melo(first_layer=5)
    with pytest.raises(ConfigError, match="first_layer"):
        registered()["melo"].config({"first_layer": 0})
