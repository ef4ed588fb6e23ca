"""One adapted layer: N LoRA experts beside a frozen linear layer, and the router that weighs them."""

from __future__ import annotations

import math

import torch
from torch import nn


class MixtureOfLoRA(nn.Module):
    """N LoRA experts for one frozen linear layer plus this layer's sequence-level router."""

    def __init__(self, in_features: int, out_features: int, query_features: int, num_experts: int, rank: int,
                 alpha: float, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, rank))
        self.router = nn.Linear(query_features, num_experts)
        bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform(a=sqrt(5)), as peft initialises lora_A
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound, generator=generator)
            qbound = 1.0 / math.sqrt(query_features)
            self.router.weight.uniform_(-qbound, qbound, generator=generator)
            self.router.bias.uniform_(-qbound, qbound, generator=generator)

    def scores(self, query: torch.Tensor) -> torch.Tensor:
        """Softmax routing scores (batch, N) for one query vector per sequence."""
        return torch.softmax(self.router(query.to(self.router.weight.dtype)), dim=-1)

    def delta(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_i w_i B_i A_i x for each row of x (batch, tokens, in), in fp32; weights is (batch, N)."""
        # each row computes only its own top-k experts (rows of a batch often pick different ones)
        used = int((weights != 0).sum(dim=-1).max())
        if used == 0:
            return torch.zeros(*x.shape[:-1], self.lora_B.shape[1], device=x.device)
        w, experts = weights.topk(used, dim=-1)  # (batch, k)
        a, b = self.lora_A[experts], self.lora_B[experts]  # (batch, k, r, in), (batch, k, out, r)
        hidden = torch.einsum("btd,bkrd->btkr", x.to(a.dtype), a) * (w * self.scaling)[:, None, :, None]
        return torch.einsum("btkr,bkor->bto", hidden, b)
