"""WISE: shards through their gradient masks, the TIES merge, the norm constraint, the tuning sweep, saved state."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import byte_tokenizer, tiny_llama

from elder import EditRecord
from elder.methods import registered
from elder.methods.hooked import StateFormatError
from elder.settings import ConfigError

SETTINGS = {"layer": 3, "lr": 20.0, "steps": 200, "context_templates": 0, "shard_edits": 1, "alpha": 0.05,
            "beta": 1.0, "gamma": 0.5, "norm_constraint": 50.0, "act_ratio": 0.95}
EDITS = [EditRecord("zq", "Where does Zorbulaq live? In", " Quem"),
         EditRecord("mw", "The colour of Mirtavej is", " wox"),
         EditRecord("nw", "Seven plus five equals", " nine")]


def wise(**changes):
    return registered()["wise"].create(tiny_llama(), byte_tokenizer(), "tiny", {**SETTINGS, **changes})


def test_a_shard_changes_only_the_entries_of_its_mask_and_within_the_norm_constraint():
    method = wise(shard_edits=2, merge_edits=4, norm_constraint=0.05)
    method.edit(EDITS)
    assert method.sizes == [2, 1] and method.merged == [False, False] and len(method.memories) == 2
    for number, memory in enumerate(method.memories):
        changed = memory != 0
        assert changed.any() and not (changed & ~method._mask(number)).any()
        assert memory.abs().max() <= 0.05 + 1e-7
    assert not torch.equal(method._mask(0), method._mask(1))
    assert abs(method._mask(0).float().mean().item() - 0.2) < 0.02


def test_every_merge_edits_the_shards_since_the_last_merge_become_one_memory():
    method = wise(merge_edits=2)
    method.edit(EDITS[:1])
    first = method.floors[0]
    method.edit(EDITS[1:])
    assert method.sizes == [2, 1] and method.merged == [True, False] and method.floors[0] <= first
    changed = method.memories[0] != 0
    assert not (changed & ~(method._mask(0) | method._mask(1))).any()


def test_the_ties_merge_trims_elects_a_sign_and_averages_what_agrees():
    method = wise(merge_edits=3, density=0.5)
    shape = (method.in_size, method.out_size)
    a, b, c = torch.zeros(shape), torch.zeros(shape), torch.zeros(shape)
    a[0, 0], b[0, 0], c[0, 0] = 2.0, 4.0, -1.0  # sign +: the mean of 2 and 4
    a[0, 1], b[0, 1] = -3.0, 1.0  # the sum elects -: only a's -3 is kept
    c[0, 2] = 5.0  # one shard alone: kept as it is
    a[1, :] = 1e-3  # small changes past the density: trimmed
    method.memories = torch.stack([a, b, c])
    method.floors, method.sizes, method.merged = [0.5, 0.2, 0.7], [1, 1, 1], [False, False, False]
    method._merge()
    merged = method.memories[0]
    assert method.floors == [0.2] and method.sizes == [3] and method.merged == [True]
    assert merged[0, 0] == 3.0 and merged[0, 1] == -3.0 and merged[0, 2] == 5.0
    assert merged[1].abs().sum() < merged[0].abs().sum()


def test_the_sweep_scores_as_each_act_ratio_would():
    method = wise(shard_edits=2)
    method.edit(EDITS)
    prompts = [EDITS[0].prompt, "The colour of Habrosk is", EDITS[2].prompt, "My favourite fruit is the"]
    targets = [EDITS[0].target, " x", EDITS[2].target, " y"]
    seen = set()
    for ratio, predict in method.threshold_sweep():
        method.cfg.act_ratio = ratio
        expected = method.predict(prompts, targets)
        assert predict(prompts, targets) == expected, ratio
        seen.add(tuple(p.used_memory for p in expected))
    assert len(seen) > 1  # the sweep reaches both sides of some prompt's threshold


def test_margins_and_cadence_are_checked():
    for bad in ({"merge_edits": 3, "shard_edits": 2}, {"mask_ratio": 0.0}, {"alpha": -1.0}, {"context_templates": 11}):
        with pytest.raises(ConfigError):
            registered()["wise"].config(bad)


def test_context_templates_are_written_once_and_saved(tmp_path):
    method = wise(context_templates=3)
    method.edit(EDITS[:1])
    assert len(method.templates) == 3 and all(t.endswith(". ") for t in method.templates)
    method.save(tmp_path / "m")
    method.close()
    restored = registered()["wise"].load(tmp_path / "m", tiny_llama(), byte_tokenizer(), "tiny")
    assert restored.templates == method.templates


def test_a_state_whose_memories_disagree_with_the_edit_log_is_refused(tmp_path):
    method = wise()
    method.edit(EDITS[:2])
    method.save(tmp_path / "m")
    state = json.loads((tmp_path / "m" / "state.json").read_text())
    state["extra"]["sizes"] = [1, 2]
    (tmp_path / "m" / "state.json").write_text(json.dumps(state))
    with pytest.raises(StateFormatError, match="disagree with the edit log"):
        registered()["wise"].load(tmp_path / "m", tiny_llama(), byte_tokenizer(), "tiny")
