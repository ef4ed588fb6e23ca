"""FT-L: each edit batch fine-tunes one FFN output layer on the target tokens; there is no deferral, so every
input goes through the changed layer."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from elder.data import EditRecord
from elder.deltas import DenseDelta, OutputDeltas
from elder.methods.base import EditResult
from elder.methods.ft.config import FTConfig
from elder.methods.hooked import HookedMethod, Use
from elder.modules import block_module, decoder_layers_path, num_hidden_layers
from elder.settings import ConfigError

BAND = 21 / 32  # EasyEdit tunes layer 21 of LLaMA-7B's 32


class FTMethod(HookedMethod):
    """FT-L: fine-tune one FFN layer on each edit (Zhu et al. 2020; as ROME and EasyEdit run it)."""

    name = "ft"
    config_class = FTConfig

    def __init__(self, base: nn.Module, tokenizer, base_name: str, config: FTConfig) -> None:
        depth = num_hidden_layers(base)
        layer = config.layer if config.layer is not None else round(BAND * depth)
        if layer >= depth:
            raise ConfigError(f"layer {layer} lies outside a model of {depth} layers")
        super().__init__(base, tokenizer, base_name, config)
        try:
            self.path = block_module(base, decoder_layers_path(base), layer, config.module,
                                     ("mlp.down_proj", "mlp.c_proj"))
            self.deltas = OutputDeltas(base, [self.path], lambda i, o: DenseDelta(i, o))
        except BaseException:
            self._release()
            raise

    @contextmanager
    def _edits(self, prompts: Sequence[str], use_edits: bool, training: bool = False,
               generating: bool = False) -> Iterator[Use]:
        on = training or (use_edits and bool(self.records))
        with self.deltas.active(on):
            yield Use(len(prompts), on)

    def edit(self, records: Sequence[EditRecord]) -> list[EditResult]:
        """Train the layer's delta on each batch of edits in turn."""
        return self._fit(records, self.deltas.parameters(), self._constrain)

    def _constrain(self) -> None:
        if self.cfg.norm_constraint is not None:
            with torch.no_grad():
                for p in self.deltas.parameters():
                    p.clamp_(-self.cfg.norm_constraint, self.cfg.norm_constraint)

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"delta.weight": self.deltas.deltas[0].weight}

    def _load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.deltas.deltas[0].weight.copy_(tensors["delta.weight"])

    def close(self) -> nn.Module:
        """Take the hook out and give back the base model."""
        self.deltas.remove()
        return self._release()
