"""GRACE's codebook rules on a tiny model: where keys go, how radii split and grow, and what a radius decides."""

from __future__ import annotations

import pytest
import torch
from conftest import byte_tokenizer, tiny_llama

from elder import EditRecord
from elder.methods import get_method

SETTINGS = {"layer": 2, "radius": 1e-4, "lr": 0.5, "steps": 200, "stop_loss": 1e-3}


def grace(**changes):
    return get_method("grace").create(tiny_llama(), byte_tokenizer(), "tiny", {**SETTINGS, **changes})


def key_of(method, prompt: str) -> torch.Tensor:
    with method._edits([prompt], True):
        method._call["capture"] = True
        method.base(input_ids=torch.tensor([byte_tokenizer()(prompt).input_ids]))
        return method._call["queries"][0]


def test_far_edits_get_their_own_keys_at_the_initial_radius():
    method = grace()
    method.edit([EditRecord("a", "Q: color of sky?", " violet"), EditRecord("b", "Q: best pet?", " fox")])
    assert len(method.keys) == 2 and method.radii.tolist() == pytest.approx([1e-4, 1e-4])
    assert method.key_edits == [["a"], ["b"]] and method.labels == [" violet", " fox"]


def test_a_near_key_with_another_target_splits_the_distance_and_one_with_the_same_target_grows():
    first, second = "Q: color of sky?", "Q: colour of sky?"
    probe = grace()
    distance = torch.dist(key_of(probe, first), key_of(probe, second)).item()
    method = grace(radius=distance)  # the second key lies within the first's reach
    method.edit([EditRecord("a", first, " violet"), EditRecord("b", second, " green")])
    assert method.radii.tolist() == pytest.approx([distance / 2 - 1e-5, distance / 2], rel=1e-4)
    same = grace(radius=distance * 0.75)  # within radius + radius, beyond the first radius: coverage grows it
    same.edit([EditRecord("a", first, " violet"), EditRecord("b", second, " violet")])
    assert len(same.keys) == 1 and same.key_edits == [["a", "b"]]
    assert same.radii.tolist() == pytest.approx([distance], rel=1e-4)
    same.forget("a")
    assert len(same.keys) == 1 and same.key_edits == [["b"]]
    same.forget("b")
    assert len(same.keys) == 0


def test_radius_scale_widens_what_a_key_answers():
    method = grace()
    method.edit([EditRecord("a", "Q: color of sky?", " violet")])
    prompt = "Q: colour of sky?"
    (answer,) = method.answer([prompt], 3)
    assert not answer.used_memory
    ratio = answer.distance / method.radii[0].item()
    wide = get_method("grace").create(tiny_llama(), byte_tokenizer(), "tiny",
                                      {**SETTINGS, "radius_scale": ratio * 1.01})
    wide.edit([EditRecord("a", "Q: color of sky?", " violet")])
    (answer,) = wide.answer([prompt], 3)
    assert answer.used_memory and answer.edit_id == "a"
    sweep = dict(method.threshold_sweep())
    assert list(sweep) == sorted(sweep)  # strictest first
