"""block_edits: once a block of experts holds its edits it is frozen, and later edits train a fresh block."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import byte_tokenizer, small_config, tiny_llama

from elder import EditRecord, ElderModel, apply_edits, load_memory, save_memory
from elder.methods.elder.persistence import MemoryFormatError
from elder.settings import ConfigError

EDITS = [EditRecord("zq", "Where does Zorbulaq live? In", " Quem", subject="Zorbulaq"),
         EditRecord("mw", "The colour of Mirtavej is", " wox", subject="Mirtavej"),
         EditRecord("pk", "The pet of Pennimoraq is", " yak", subject="Pennimoraq"),
         EditRecord("hb", "The river of Habroskel is", " Ulm", subject="Habroskel")]


def blocked(**overrides) -> ElderModel:
    config = small_config(**{"deferral": "subject_key", "key_layer": 1, "key_threshold": 0.9, "batch_size": 1,
                             "block_edits": 2, "replay": 2, **overrides})
    return ElderModel(tiny_llama(), byte_tokenizer(), config, "tiny")


def test_a_full_block_is_frozen_untouched_and_later_edits_go_to_a_fresh_one():
    model = blocked()
    experts = model.config.num_experts
    apply_edits(model, EDITS[:2], progress=False)
    assert model.total_experts == experts and model.open_block == 0
    first_block = [(a.lora_A.detach().clone(), a.lora_B.detach().clone()) for a in model.adapters]
    before = model.generate([e.prompt for e in EDITS[:2]], max_new_tokens=5)
    results = apply_edits(model, EDITS[2:], progress=False)
    assert all(r.learned for r in results)
    assert model.total_experts == 2 * experts and model.open_block == 1
    for adapter, (a, b) in zip(model.adapters, first_block):
        assert torch.equal(adapter.frozen_A, a) and torch.equal(adapter.frozen_B, b)  # frozen as they were
    assert [model.block_of(e.id) for e in EDITS] == [0, 0, 1, 1]
    assert all(int(model.presets[e.id].min()) >= experts for e in EDITS[2:])
    after = model.generate([e.prompt for e in EDITS], max_new_tokens=5)
    assert [a.text for a in after[:2]] == [a.text for a in before]  # old edits answer exactly as before
    assert [a.edit_id for a in after] == [e.id for e in EDITS]
    assert [a.text[:len(e.target)] for a, e in zip(after, EDITS)] == [e.target for e in EDITS]


def test_without_block_edits_every_edit_shares_one_pool():
    model = blocked(block_edits=0)
    apply_edits(model, EDITS, progress=False)
    assert model.total_experts == model.config.num_experts
    assert {model.block_of(e.id) for e in EDITS} == {0}


def test_frozen_blocks_survive_a_save_and_load(tmp_path):
    model = blocked()
    apply_edits(model, EDITS, progress=False)
    save_memory(model, tmp_path / "m")
    restored = load_memory(tmp_path / "m", tiny_llama(), byte_tokenizer(), "tiny")
    assert restored.total_experts == model.total_experts and restored.open_block == 1
    for a, b in zip(restored.adapters, model.adapters):
        assert torch.equal(a.frozen_A, b.frozen_A) and torch.equal(a.lora_A, b.lora_A)
    prompts = [e.prompt for e in EDITS]
    assert [a.text for a in restored.generate(prompts, 5)] == [a.text for a in model.generate(prompts, 5)]
    result, = apply_edits(restored, [EditRecord("qv", "The hat of Quorvanel is", " red", subject="Quorvanel")],
                          progress=False)
    assert result.learned and restored.open_block == 2  # the reloaded open block was full: a third one opened
    assert [a.text for a in restored.generate(prompts, 5)] == [a.text for a in model.generate(prompts, 5)]


def test_a_memory_with_frozen_blocks_and_block_edits_zero_is_refused(tmp_path):
    model = blocked()
    apply_edits(model, EDITS, progress=False)
    save_memory(model, tmp_path / "m")
    manifest_path = tmp_path / "m" / "memory.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["config"]["block_edits"] = 0
    from elder.methods.elder.persistence import _manifest_checksum
    manifest["checksum"] = _manifest_checksum(manifest)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(MemoryFormatError, match="frozen blocks of experts, but the manifest says block_edits=0"):
        load_memory(tmp_path / "m", tiny_llama(), byte_tokenizer(), "tiny")


def test_block_edits_needs_subject_keys():
    with pytest.raises(ConfigError, match="block_edits needs deferral='subject_key'"):
        small_config(block_edits=10)
    with pytest.raises(ConfigError, match="block_edits must be an integer >= 0"):
        small_config(deferral="subject_key", block_edits=-1)
