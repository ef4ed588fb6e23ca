"""The code bank's Hamming search and the guided loss's preset allocations."""

from __future__ import annotations

import torch
from conftest import small_config, tiny_llama

from elder import ElderModel
from elder.mechanism import CodeBank


def bits(text: str) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in text]])


def test_min_hamming_distance_against_hand_computed_values():
    bank = CodeBank(6)
    assert bank.min_distance(bits("110000")).item() == float("inf")  # empty bank: always defer
    bank.add(["a", "b"], torch.cat([bits("110000"), bits("001100")]))
    assert bank.min_distance(bits("110000")).tolist() == [0.0]
    assert bank.min_distance(bits("100100")).tolist() == [2.0]  # one bit off both stored codes
    assert bank.min_distance(bits("000011")).tolist() == [4.0]
    assert bank.remove("a") == 1 and bank.ids == ["b"]
    assert bank.min_distance(bits("110000")).tolist() == [4.0]


def test_presets_are_unique_reproducible_and_k_of_n_per_layer(tokenizer):
    first = ElderModel(tiny_llama(), tokenizer, small_config(num_experts=4, top_k=2))
    presets = [first.preset_for(f"fact-{i}") for i in range(30)]
    assert len({tuple(p.flatten().tolist()) for p in presets}) == 30
    assert all(p.shape == (2, 2) and (p[:, 0] < p[:, 1]).all() and (p < 4).all() for p in presets)
    second = ElderModel(tiny_llama(), tokenizer, small_config(num_experts=4, top_k=2))
    assert torch.equal(second.preset_for("fact-7"), first.preset_for("fact-7"))
