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
        self.use_triton(False)
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def use_triton(self, enabled: bool) -> None:
        self._norm = rmsnorm.rms_norm_triton if enabled else rmsnorm.rms_norm
        self._add_norm = rmsnorm.fused_add_rms_norm_triton if enabled else rmsnorm.fused_add_rms_norm

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return self._norm(x, self.weight, self.eps)
        return self._add_norm(x, residual, self.weight, self.eps)
