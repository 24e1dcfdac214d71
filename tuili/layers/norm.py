"""RMSNorm layer; with a residual it fuses the add (returns the new residual too)."""
from __future__ import annotations

import torch
from torch import nn

from tuili.layers.linear import default_weight_loader
from tuili.ops import rmsnorm


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return rmsnorm.rms_norm(x, self.weight, self.eps)
        return rmsnorm.fused_add_rms_norm(x, residual, self.weight, self.eps)
