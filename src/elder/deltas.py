"""Additive deltas on a frozen model's linear modules, through forward hooks: module(x) + delta(x), switched on
only inside `active()`, for every row or for chosen rows. The base weights are never written, so switching the
deltas off gives the base model bit for bit. FT-L (a dense delta), LoRA and MELO (low-rank ones) are built on it."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from elder.modules import device_of, get_module, linear_shape


class DenseDelta(nn.Module):
    """A full (out, in) weight change, zero at the start: fine-tuning one layer, kept apart from its weight."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T


class LowRankDelta(nn.Module):
    """LoRA (Hu et al., 2022): B A x * alpha / r, with B zero at the start."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.scale = alpha / rank
        bound = 1 / math.sqrt(in_features)  # kaiming-uniform with a = sqrt(5), as nn.Linear and peft
        self.lora_A = nn.Parameter((torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound)
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.lora_A.T) @ self.lora_B.T * self.scale


class OutputDeltas:
    """One delta module per adapted module, in fp32 on that module's device, added to its output while active."""

    def __init__(self, base: nn.Module, paths: Sequence[str], make: Callable[[int, int], nn.Module]) -> None:
        self.paths = tuple(paths)
        modules = [get_module(base, p) for p in self.paths]
        self.deltas = nn.ModuleList(make(*linear_shape(m, p)).to(device_of(m)) for m, p in zip(modules, self.paths))
        self._rows: torch.Tensor | bool = False  # False: off; True: every row; (batch,) bool: those rows
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, index: int):
        def add(module: nn.Module, args: tuple, output: torch.Tensor):
            rows = self._rows
            if rows is False:
                return None
            x = args[0]
            delta = self.deltas[index](x.to(torch.float32))
            if rows is not True:
                delta = delta * rows.to(delta.device, delta.dtype).view(-1, *([1] * (delta.dim() - 1)))
            return output + delta.to(output.dtype)
        return add

    @contextmanager
    def active(self, rows: torch.Tensor | bool = True) -> Iterator[None]:
        """Deltas on for the block: on every row, or where `rows` (batch,) is True."""
        previous, self._rows = self._rows, rows
        try:
            yield
        finally:
            self._rows = previous

    def parameters(self) -> list[nn.Parameter]:
        """The trainable parameters of every delta."""
        return list(self.deltas.parameters())

    def remove(self) -> None:
        """Take the hooks out of the base model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
