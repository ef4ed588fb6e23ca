"""Tiny random-weight LLaMA and GPT-2 models with a byte-level tokenizer, built in seconds without a download."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from elder import ElderConfig


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte (ids 0-255) plus an end-of-text token."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 6-layer LLaMA with random weights and a 257-token vocabulary."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=256, pad_token_id=256, bos_token_id=256)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """A 4-layer GPT-2 with random weights."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=257, n_embd=32, n_layer=4, n_head=4, n_positions=128,
                        eos_token_id=256, bos_token_id=256)
    return GPT2LMHeadModel(config).eval()


def small_config(**overrides) -> ElderConfig:
    """Settings that learn a tiny model's edits in a few dozen steps."""
    settings = dict(first_layer=3, num_layers=2, num_experts=8, rank=4, lr=3e-2, iterations=200, early_stop=True,
                    guide_weight=1.0, epsilon=1.0, batch_size=2, router_lr=5e-2, anchor_routes=True)
    return ElderConfig(**{**settings, **overrides})


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return byte_tokenizer()


@pytest.fixture
def tiny_dir(tmp_path):
    """A tiny LLaMA and the byte tokenizer saved as a model folder, for the command line."""
    folder = tmp_path / "tiny"
    tiny_llama().save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder
