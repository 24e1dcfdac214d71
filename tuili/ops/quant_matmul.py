"""Matmuls that read packed weights. INT8 weight-only, per output channel: W = scale[n] * Wq[n, k]."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [T, K] (float), qweight: [N, K] int8, scales: [N] in x's dtype -> [T, N]. Torch reference."""
    out = F.linear(x, qweight.to(x.dtype)) * scales
    return out if bias is None else out + bias


def int8_linear_cpu(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same on the CPU. Decode-sized batches go through torch's packed int8 kernel (1 byte read per weight,
    no dequantized copy); it is a matrix-vector kernel, so prefill-sized ones (more than 16 rows) dequantize the
    weight once and use the float GEMM, which is many times faster there."""
    if x.shape[0] > 16:
        return int8_linear(x, qweight, scales, bias)
    out = torch._weight_int8pack_mm(x.contiguous(), qweight, scales)
    return out if bias is None else out + bias
