"""The code bank's Hamming search and the guided loss's preset allocations."""

from __future__ import annotations

import torch
from conftest import small_config, tiny_llama

from elder import ElderModel
from elder.methods.elder.codebank import CodeBank


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


def test_codes_are_kept_bit_packed_and_queries_as_int8():
    generator = torch.Generator().manual_seed(0)
    codes = torch.rand(50, 21, generator=generator) < 0.3  # 21 bits: not a whole number of bytes
    queries = torch.randn(50, 64, generator=generator) * torch.logspace(-3, 2, 50)[:, None]  # rows of any scale
    bank = CodeBank(21)
    bank.add([f"e{i}" for i in range(50)], codes, queries)
    assert torch.equal(bank.codes, codes)
    step = queries.abs().amax(dim=1, keepdim=True) / 127  # per-row quantization step
    assert ((bank.queries - queries).abs() <= step / 2 * 1.001).all()
    assert bank.nbytes() == 50 * (3 + 64 + 4)  # 3 bytes of code bits, 64 int8 values and one fp32 scale per edit
    bank.remove("e3")
    assert torch.equal(bank.codes, torch.cat([codes[:3], codes[4:]])) and len(bank.queries) == 49
    bank.replace_codes(~bank.codes)
    assert torch.equal(bank.codes, ~torch.cat([codes[:3], codes[4:]]))


def test_presets_are_unique_reproducible_and_k_of_n_per_layer(tokenizer):
    first = ElderModel(tiny_llama(), tokenizer, small_config(num_experts=4, top_k=2))
    presets = [first.preset_for(f"fact-{i}") for i in range(30)]
    assert len({tuple(p.flatten().tolist()) for p in presets}) == 30
    assert all(p.shape == (2, 2) and (p[:, 0] < p[:, 1]).all() and (p < 4).all() for p in presets)
    second = ElderModel(tiny_llama(), tokenizer, small_config(num_experts=4, top_k=2))
    assert torch.equal(second.preset_for("fact-7"), first.preset_for("fact-7"))


def test_indexed_search_equals_brute_force_on_random_codes():
    generator = torch.Generator().manual_seed(0)
    stored = torch.rand(500, 40, generator=generator) < 0.2  # any density: not only k-of-N codes
    queries = torch.rand(7, 40, generator=generator) < 0.2
    bank = CodeBank(40)
    bank.add([str(i) for i in range(500)], stored)
    brute = (queries[:, None, :] ^ stored[None]).sum(-1).min(-1).values.float()
    assert torch.equal(bank.min_distance(queries), brute)
    assert bank.min_distance(torch.zeros(1, 40, dtype=torch.bool)).item() == stored.sum(1).min().item()


def test_indexed_search_equals_brute_force_on_k_of_n_codes():
    generator = torch.Generator().manual_seed(1)
    def k_of_n(count: int) -> torch.Tensor:  # 3 layers, 2 of 8 experts each, as ELDER stores them
        picks = torch.rand(count, 3, 8, generator=generator).topk(2, dim=-1).indices
        return torch.zeros(count, 3, 8, dtype=torch.bool).scatter_(-1, picks, True).flatten(1)
    stored, queries = k_of_n(300), k_of_n(9)
    bank = CodeBank(24)
    bank.add([str(i) for i in range(300)], stored)
    brute = (queries[:, None, :] ^ stored[None]).sum(-1).min(-1).values.float()
    assert torch.equal(bank.min_distance(queries), brute)
