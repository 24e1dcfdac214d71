"""INT4 weight-only quantization, group-wise along the input dimension, with zero points or symmetric.

Asymmetric (default): per group of G weights, scale = (max - min) / 15 and an integer zero point z in 0..15,
W ~ scale * (q - z). Symmetric: scale = max |w| / 7, zero point 8. Layout: see tuili/ops/quant_matmul.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

GROUP_SIZES = (32, 64, 128)


def quantize_groupwise(weight: torch.Tensor, group_size: int = 128, symmetric: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """[N, K] float -> (qweight [N, K/2] uint8, scales [N, ceil(K/G)], zeros [N, ceil(K/G)] or None), scales and
    zeros in the weight's dtype (zeros are whole numbers); rounding in fp32."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"INT4 group size must be one of {GROUP_SIZES}, got {group_size}")
    n, k = weight.shape
    if k % 2:
        raise ValueError(f"INT4 packs two weights per byte along the input dimension; {k} is odd")
    groups = -(-k // group_size)
    w = F.pad(weight.float(), (0, groups * group_size - k)).view(n, groups, group_size)
    if symmetric:
        scales = w.abs().amax(dim=2).clamp(min=1e-8) / 7.0
        zeros = torch.full_like(scales, 8.0)
    else:
        lo, hi = w.amin(dim=2).clamp(max=0.0), w.amax(dim=2).clamp(min=0.0)  # 0 is always representable
        scales = ((hi - lo) / 15.0).clamp(min=1e-8)
        zeros = torch.round(-lo / scales).clamp(0, 15)
    q = torch.round(w / scales[..., None] + zeros[..., None]).clamp(0, 15).to(torch.uint8)
    q = q.view(n, groups * group_size)[:, :k]
    qweight = q[:, 0::2] | (q[:, 1::2] << 4)
    return qweight.contiguous(), scales.to(weight.dtype), None if symmetric else zeros.to(weight.dtype)
