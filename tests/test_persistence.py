"""Saving and loading the edit memory: identical outputs, clear refusals, nothing half-written."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import small_config, tiny_gpt2, tiny_llama

import elder.methods.elder.persistence as persistence
from elder import EditRecord, ElderModel, apply_edits, load_memory, save_memory
from elder.methods.elder.persistence import MemoryFormatError

EDITS = [EditRecord("a", "Q: sky?", "violet"), EditRecord("b", "Q: pet?", "a red fox")]
PROBES = ["Q: sky?", "Q: pet?", "zzzz 12345 qqqq"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from conftest import byte_tokenizer
    tokenizer = byte_tokenizer()
    model = ElderModel(tiny_llama(), tokenizer, small_config())
    apply_edits(model, EDITS, progress=False)
    folder = tmp_path_factory.mktemp("memory")
    save_memory(model, folder)
    return folder, model, tokenizer


def _outputs(model: ElderModel):
    return [(a.text, a.used_memory, a.distance) for a in model.generate(PROBES, max_new_tokens=10)]


def test_round_trip_gives_identical_outputs(saved):
    folder, model, tokenizer = saved
    loaded = load_memory(folder, tiny_llama(), tokenizer)
    assert _outputs(loaded) == _outputs(model)
    assert loaded.bank.ids == model.bank.ids and torch.equal(loaded.bank.codes, model.bank.codes)
    assert torch.equal(loaded.bank.queries, model.bank.queries)
    assert list(loaded.edit_log) == ["a", "b"] and loaded.config == model.config
    for key, value in model.adapters.state_dict().items():
        assert torch.equal(loaded.adapters.state_dict()[key], value)


def test_other_base_models_are_refused(saved):
    folder, _, tokenizer = saved
    with pytest.raises(MemoryFormatError, match="weights of .* differ"):
        load_memory(folder, tiny_llama(seed=1), tokenizer)
    with pytest.raises(MemoryFormatError):
        load_memory(folder, tiny_gpt2(), tokenizer)


def test_a_refused_load_leaves_the_base_model_free(saved):
    folder, _, tokenizer = saved
    base = tiny_llama(seed=1)
    with pytest.raises(MemoryFormatError):
        load_memory(folder, base, tokenizer)
    ElderModel(base, tokenizer, small_config())  # no hooks or marker were left behind


def test_truncated_or_corrupt_files_are_refused(saved, tmp_path):
    folder, _, tokenizer = saved
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    tensors = next(copy.glob("adapters-*.safetensors"))
    tensors.write_bytes(tensors.read_bytes()[:-100])
    with pytest.raises(MemoryFormatError, match="corrupt or truncated"):
        load_memory(copy, tiny_llama(), tokenizer)
    (copy / "memory.json").write_text("{not json")
    with pytest.raises(MemoryFormatError, match="corrupt"):
        load_memory(copy, tiny_llama(), tokenizer)
    with pytest.raises(MemoryFormatError, match="memory.json is missing"):
        load_memory(tmp_path / "nowhere", tiny_llama(), tokenizer)


def test_other_format_versions_are_refused(saved, tmp_path):
    folder, _, tokenizer = saved
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    manifest = json.loads((copy / "memory.json").read_text())
    manifest["format_version"] = 99
    (copy / "memory.json").write_text(json.dumps(manifest))
    with pytest.raises(MemoryFormatError, match="format version 99"):
        load_memory(copy, tiny_llama(), tokenizer)


def test_version_1_memories_with_fp16_queries_still_load(saved, tmp_path):
    folder, model, tokenizer = saved
    import shutil

    from safetensors.torch import load_file, save_file
    copy = tmp_path / "v1"
    shutil.copytree(folder, copy)
    manifest = json.loads((copy / "memory.json").read_text())
    tensors = load_file(copy / manifest["tensors"]["file"])
    assert tensors["bank.query_values"].dtype == torch.int8  # what version 2 writes
    tensors["bank.queries"] = model.bank.queries.half()
    del tensors["bank.query_values"], tensors["bank.query_scales"]
    save_file(tensors, copy / manifest["tensors"]["file"])
    manifest.update(format_version=1, tensors={"file": manifest["tensors"]["file"],
                                               "sha256": persistence._sha256(copy / manifest["tensors"]["file"])})
    (copy / "memory.json").write_text(json.dumps(manifest))
    loaded = load_memory(copy, tiny_llama(), tokenizer)
    assert _outputs(loaded) == _outputs(model)
    assert torch.allclose(loaded.bank.queries, model.bank.queries, rtol=1e-2, atol=1e-2 * model.bank.queries.abs().max())


def test_a_memory_with_a_missing_or_misshapen_bank_tensor_is_refused(saved, tmp_path):
    folder, _, tokenizer = saved
    import shutil

    from safetensors.torch import load_file, save_file
    for damage in ("drop", "reshape"):
        copy = tmp_path / damage
        shutil.copytree(folder, copy)
        manifest = json.loads((copy / "memory.json").read_text())
        tensors = load_file(copy / manifest["tensors"]["file"])
        if damage == "drop":
            del tensors["bank.query_scales"]
        else:
            tensors["bank.query_scales"] = tensors["bank.query_scales"][:1].contiguous()
        save_file(tensors, copy / manifest["tensors"]["file"])
        manifest["tensors"]["sha256"] = persistence._sha256(copy / manifest["tensors"]["file"])
        manifest["checksum"] = persistence._manifest_checksum(manifest)
        (copy / "memory.json").write_text(json.dumps(manifest))
        base = tiny_llama()
        with pytest.raises(MemoryFormatError, match="consistent memory"):
            load_memory(copy, base, tokenizer)
        assert not getattr(base, "_elder_attached", False)  # the base model is free again


def test_a_failed_save_keeps_the_previous_memory(saved, tmp_path, monkeypatch):
    folder, model, tokenizer = saved
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    before = sorted(p.name for p in copy.iterdir())

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(persistence, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_memory(model, copy)
    assert sorted(p.name for p in copy.iterdir()) == before
    monkeypatch.undo()
    assert _outputs(load_memory(copy, tiny_llama(), tokenizer)) == _outputs(model)
