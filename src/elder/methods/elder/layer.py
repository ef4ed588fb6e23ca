"""One adapted layer: N LoRA experts beside a frozen linear layer, and the router that weighs them."""

from __future__ import annotations

import math

import torch
from torch import nn


class MixtureOfLoRA(nn.Module):
    """N LoRA experts for one frozen linear layer plus this layer's sequence-level router.

    The N trainable experts are the open block. `freeze_block` moves them into the frozen blocks (buffers that no
    optimiser sees) and opens N fresh ones; expert indices count the frozen blocks first, so expert
    `frozen_experts + i` is open expert i. With no frozen block this is the paper's layer.
    """

    def __init__(self, in_features: int, out_features: int, query_features: int, num_experts: int, rank: int,
                 alpha: float, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, rank))
        self.register_buffer("frozen_A", torch.zeros(0, rank, in_features))
        self.register_buffer("frozen_B", torch.zeros(0, out_features, rank))
        self.router = nn.Linear(query_features, num_experts)
        with torch.no_grad():
            self._init_experts(generator)
            qbound = 1.0 / math.sqrt(query_features)
            self.router.weight.uniform_(-qbound, qbound, generator=generator)
            self.router.bias.uniform_(-qbound, qbound, generator=generator)

    def _init_experts(self, generator: torch.Generator | None) -> None:
        bound = 1.0 / math.sqrt(self.lora_A.shape[-1])  # kaiming_uniform(a=sqrt(5)), as peft initialises lora_A
        self.lora_A.uniform_(-bound, bound, generator=generator)
        self.lora_B.zero_()

    @property
    def frozen_experts(self) -> int:
        """Experts in the frozen blocks."""
        return self.frozen_A.shape[0]

    @property
    def total_experts(self) -> int:
        """Frozen and open experts."""
        return self.frozen_experts + self.lora_A.shape[0]

    @torch.no_grad()
    def freeze_block(self, generator: torch.Generator | None = None) -> None:
        """Freeze the open experts as they are and open as many fresh ones (LoRA init: they add nothing yet)."""
        self.frozen_A = torch.cat([self.frozen_A, self.lora_A.detach().to(self.frozen_A.dtype)])
        self.frozen_B = torch.cat([self.frozen_B, self.lora_B.detach().to(self.frozen_B.dtype)])
        self._init_experts(generator)

    def resize_frozen(self, experts: int) -> None:
        """Make room for `experts` frozen experts (their values are loaded next), so a saved state fits."""
        self.frozen_A = self.frozen_A.new_zeros(experts, *self.frozen_A.shape[1:])
        self.frozen_B = self.frozen_B.new_zeros(experts, *self.frozen_B.shape[1:])

    def scores(self, query: torch.Tensor) -> torch.Tensor:
        """Softmax routing scores (batch, N) for one query vector per sequence."""
        return torch.softmax(self.router(query.to(self.router.weight.dtype)), dim=-1)

    def delta(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_i w_i B_i A_i x for each row of x (batch, tokens, in), in fp32; weights is (batch, total_experts)."""
        # each row computes only its own top-k experts (rows of a batch often pick different ones)
        used = int((weights != 0).sum(dim=-1).max())
        if used == 0:
            return torch.zeros(*x.shape[:-1], self.lora_B.shape[1], device=x.device)
        w, experts = weights.topk(used, dim=-1)  # (batch, k)
        a, b = self._experts(experts)  # (batch, k, r, in), (batch, k, out, r)
        hidden = torch.einsum("btd,bkrd->btkr", x.to(a.dtype), a) * (w * self.scaling)[:, None, :, None]
        return torch.einsum("btkr,bkor->bto", hidden, b)

    def _experts(self, experts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        frozen = self.frozen_experts
        if frozen == 0:
            return self.lora_A[experts], self.lora_B[experts]
        is_open = (experts >= frozen)[..., None, None]
        opened = (experts - frozen).clamp_min(0)
        kept = experts.clamp_max(frozen - 1)
        a = torch.where(is_open, self.lora_A[opened], self.frozen_A[kept].to(self.lora_A.dtype))
        b = torch.where(is_open, self.lora_B[opened], self.frozen_B[kept].to(self.lora_B.dtype))
        return a, b
