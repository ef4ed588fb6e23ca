"""The shared forward helpers: logits at the target positions only are the model's own logits there."""

from __future__ import annotations

import pytest
import torch
from conftest import byte_tokenizer, small_config, tiny_gpt2, tiny_llama
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from elder import ElderModel
from elder.forward import target_logits
from elder.tokens import teacher_forced


def tiny_gemma3(seed: int = 0) -> Gemma3ForCausalLM:
    """A 6-layer Gemma 3 whose final logits are soft-capped (as Gemma 2's are by default)."""
    torch.manual_seed(seed)
    config = Gemma3TextConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
                              final_logit_softcapping=0.5, eos_token_id=256, pad_token_id=256, bos_token_id=256)
    return Gemma3ForCausalLM(config).eval()


def a_batch():
    return teacher_forced(byte_tokenizer(), ["Where does Zorbulaq live? In", "Sky:"], [" Quem", " violet"], 128, 8,
                          "cpu")


def own_logits(model, batch) -> torch.Tensor:
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    return out[batch.rows, batch.cols]


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_gemma3])
def test_target_logits_are_the_models_own_logits_at_the_target_positions(build):
    model = build()
    batch = a_batch()
    with torch.no_grad():
        assert torch.allclose(target_logits(model, batch), own_logits(model, batch), atol=1e-5)


def test_elder_scores_a_soft_capped_model_as_the_model_does():
    # ELDER projects only the target positions too; a model with a final soft cap must keep it
    model = tiny_gemma3()
    with torch.no_grad():
        expected = own_logits(model, a_batch())
        elder = ElderModel(model, byte_tokenizer(), small_config())
        logits, _ = elder.target_logits(a_batch(), defer=True, use_memory=False)
    assert expected.abs().max() <= 0.5  # the cap is at work
    assert torch.allclose(logits, expected, atol=1e-5)
