"""One ordinary LoRA adapter trained on the stream: each batch of edits trains the same low-rank updates, with
no routing and no deferral, so later edits overwrite earlier ones where they share directions."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from elder.data import EditRecord
from elder.deltas import LowRankDelta, OutputDeltas
from elder.methods.base import EditResult
from elder.methods.hooked import DeltaMethod
from elder.methods.lora.config import LoRAConfig
from elder.modules import block_suffix, decoder_layers_path, num_hidden_layers
from elder.settings import ConfigError

LLAMA_MODULES = ("self_attn.q_proj", "self_attn.v_proj")
GPT2_MODULES = ("attn.c_attn",)


class LoRAMethod(DeltaMethod):
    """One LoRA adapter (Hu et al., 2022) fine-tuned on every edit in turn."""

    name = "lora"
    config_class = LoRAConfig

    def __init__(self, base: nn.Module, tokenizer, base_name: str, config: LoRAConfig) -> None:
        super().__init__(base, tokenizer, base_name, config)
        try:
            layers = decoder_layers_path(base)
            suffixes = config.modules or _default_modules(base, layers)
            self.paths = [f"{layers}.{i}.{s}" for i in range(num_hidden_layers(base)) for s in suffixes]
            generator = torch.Generator().manual_seed(config.seed)
            self.deltas = OutputDeltas(base, self.paths,
                                       lambda i, o: LowRankDelta(i, o, config.rank, config.alpha, generator))
        except BaseException:
            self._release()
            raise

    def edit(self, records: Sequence[EditRecord]) -> list[EditResult]:
        """Train the adapter on each batch of edits in turn."""
        return self._fit(records, self.deltas.parameters())

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f"{path}.{name}": p for path, delta in zip(self.paths, self.deltas.deltas)
                for name, p in delta.named_parameters()}

    def _load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for path, delta in zip(self.paths, self.deltas.deltas):
                for name, p in delta.named_parameters():
                    p.copy_(tensors[f"{path}.{name}"])



def _default_modules(base: nn.Module, layers: str) -> tuple[str, ...]:
    try:
        return tuple(block_suffix(base, layers, (m,), "modules") for m in LLAMA_MODULES)
    except ConfigError:
        return (block_suffix(base, layers, GPT2_MODULES, "modules"),)
