"""INT4 weight-only quantization, group-wise along the input dimension, with offsets or symmetric.

Asymmetric (default, the form of GGUF's Q4_1): per group of G weights, scale = (max - min) / 15, offset = min,
W ~ scale * q + offset with q in 0..15 (at G = 32 it reproduces a Q4_1 model's blocks exactly). Symmetric:
scale = max |w| / 7 and the offset is -8 * scale (not stored). Layout: see tuili/ops/quant_matmul.py.
"""
from __future__ import annotations

import torch

GROUP_SIZES = (32, 64, 128)


def quantize_groupwise(weight: torch.Tensor, group_size: int = 128, symmetric: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """[N, K] float -> (qweight [N, K/2] uint8, scales [N, ceil(K/G)], offsets [N, ceil(K/G)] or None), scales and
    offsets in the weight's dtype; rounding in fp32."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"INT4 group size must be one of {GROUP_SIZES}, got {group_size}")
    n, k = weight.shape
    if k % 2:
        raise ValueError(f"INT4 packs two weights per byte along the input dimension; {k} is odd")
    groups = -(-k // group_size)
    w = weight.float()
    pad = groups * group_size - k  # a short last group: padded with copies of its first value (no new extremes)
    w = torch.cat((w, w[:, -1:].expand(n, pad)), dim=1) if pad else w
    w = w.view(n, groups, group_size)
    if symmetric:
        scales = w.abs().amax(dim=2).clamp(min=1e-8) / 7.0
        offsets = -8.0 * scales
    else:
        offsets = w.amin(dim=2)
        scales = ((w.amax(dim=2) - offsets) / 15.0).clamp(min=1e-8)
    scales, offsets = scales.to(weight.dtype), offsets.to(weight.dtype)  # round from the values used at run time
    q = torch.round((w - offsets.float()[..., None]) / scales.float()[..., None]).clamp(0, 15).to(torch.uint8)
    q = q.view(n, groups * group_size)[:, :k]
    qweight = q[:, 0::2] | (q[:, 1::2] << 4)
    return qweight.contiguous(), scales, None if symmetric else offsets
