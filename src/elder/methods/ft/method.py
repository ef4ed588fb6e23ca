"""FT-L: each edit batch fine-tunes one FFN output layer on the target tokens; there is no deferral, so every
input goes through the changed layer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from elder.data import EditRecord
from elder.deltas import DenseDelta, OutputDeltas
from elder.methods.base import EditResult
from elder.methods.ft.config import FTConfig
from elder.methods.hooked import DeltaMethod
from elder.modules import ffn_output_path, layer_of

BAND = 21 / 32  # EasyEdit tunes layer 21 of LLaMA-7B's 32


class FTMethod(DeltaMethod):
    """FT-L: fine-tune one FFN layer on each edit (Zhu et al. 2020; as ROME and EasyEdit run it)."""

    name = "ft"
    config_class = FTConfig

    def __init__(self, base: nn.Module, tokenizer, base_name: str, config: FTConfig) -> None:
        path = ffn_output_path(base, config.layer, config.module, BAND)
        super().__init__(base, tokenizer, base_name, config)
        try:
            self.path = path
            self.deltas = OutputDeltas(base, [self.path], lambda i, o: DenseDelta(i, o))
        except BaseException:
            self._release()
            raise

    def edit(self, records: Sequence[EditRecord]) -> list[EditResult]:
        """Train the layer's delta on each batch of edits in turn."""
        return self._fit(records, self.deltas.parameters(), self._constrain, layer_of(self.base, self.path))

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

