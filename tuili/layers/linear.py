"""Linear layers, plain and fused (QKV, gate/up), whose parameters load checkpoint shards themselves."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tuili.ops import quant_matmul


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"weight shape mismatch: model has {tuple(param.shape)}, checkpoint {tuple(loaded.shape)}")
    param.data.copy_(loaded)


class Linear(nn.Module):
    """y = x W^T (+ b)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = default_weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = default_weight_loader
        self.qweight = self.scales = None

    def quantize_int8(self, qweight: torch.Tensor, scales: torch.Tensor) -> None:
        """Replace the float weight by int8 rows and per-row scales (weight-only quantization)."""
        self.weight = None
        self.qweight = nn.Parameter(qweight, requires_grad=False)
        self.scales = nn.Parameter(scales, requires_grad=False)
        on_cpu = qweight.device.type == "cpu" and hasattr(torch, "_weight_int8pack_mm")
        self._int8 = quant_matmul.int8_linear_cpu if on_cpu else quant_matmul.int8_linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None:
            return self._int8(x, self.qweight, self.scales, self.bias)
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several linears with the same input fused into one matmul; checkpoint shards load into their rows.

    `shard_sizes` maps each shard id (e.g. "q", "k", "v" or 0, 1 for gate/up) to its output size, in order.
    """

    def __init__(self, in_features: int, shard_sizes: dict, bias: bool = False) -> None:
        super().__init__(in_features, sum(shard_sizes.values()), bias)
        self.offsets, offset = {}, 0
        for shard_id, size in shard_sizes.items():
            self.offsets[shard_id] = (offset, size)
            offset += size
        self.weight.weight_loader = self._load_shard
        if self.bias is not None:
            self.bias.weight_loader = self._load_shard

    def _load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard_id) -> None:
        offset, size = self.offsets[shard_id]
        default_weight_loader(nn.Parameter(param.data.narrow(0, offset, size), requires_grad=False), loaded)
