"""INT4 weight-only quantization, group-wise along the input dimension, with offsets or symmetric.

Asymmetric (default, the form of GGUF's Q4_1): per group of G weights, scale = (max - min) / 15, offset = min,
W ~ scale * q + offset with q in 0..15 (at G = 32 it reproduces a Q4_1 model's blocks exactly). Symmetric:
scale = max |w| / 7 and the offset is -8 * scale (not stored). Each group's range is searched: shrunk about its
middle by each factor of RANGES, the one with the least squared rounding error wins (a clipped outlier costs less
than a coarse grid for the rest; the full range wins where it is exact, as on Q4_1 blocks). Layout: see
tuili/ops/quant_matmul.py.
"""
from __future__ import annotations

import torch

GROUP_SIZES = (32, 64, 128)
# range factors tried per group (default model, INT4 g128, fp32, first 4,096 tokens of the prose: perplexity
# 29.53 with the full range, 27.79 searched; reference 20.25)
RANGES = tuple(1.0 - 0.05 * i for i in range(11))


def quantize_groupwise(weight: torch.Tensor, group_size: int = 128, symmetric: bool = False,
                       ranges: tuple = RANGES) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """[N, K] float -> (qweight [N, K/2] uint8, scales [N, ceil(K/G)], offsets [N, ceil(K/G)] or None), scales and
    offsets in the weight's dtype; rounding in fp32; `ranges`: the factors searched per group ((1.0,): each
    group's full range)."""
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
    scales, offsets = group_params(w, symmetric, weight.dtype, ranges)
    q = torch.round((w - offsets[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8)
    q = q.view(n, groups * group_size)[:, :k]
    qweight = q[:, 0::2] | (q[:, 1::2] << 4)
    return qweight.contiguous(), scales.to(weight.dtype), None if symmetric else offsets.to(weight.dtype)


def group_params(w: torch.Tensor, symmetric: bool, dtype: torch.dtype, shrink: tuple = (1.0,),
                  importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset) fp32 of groups of weights w [..., G] (reduced over the last dim), rounded to the dtype the
    model runs in so that codes are chosen against the values used at run time. Offsets: the group's minimum
    (Q4_1's form), scale (max - min) / 15; symmetric: scale max |w| / 7, offset -8 * scale. shrink: factors of the
    range to try per group (the one with the least squared rounding error, weighted per weight by `importance`
    [G] (GPTQ: input energy), wins)."""
    best = best_err = None
    for f in shrink:
        if symmetric:
            scale = (w.abs().amax(dim=-1).clamp(min=1e-8) * f / 7.0).to(dtype).float()
            offset = -8.0 * scale
        else:
            lo, hi = w.amin(dim=-1), w.amax(dim=-1)
            offset = (lo + (hi - lo) * (1.0 - f) / 2).to(dtype).float()  # the range shrunk about its middle
            scale = ((hi - lo) * f / 15.0).clamp(min=1e-8).to(dtype).float()
        if len(shrink) == 1:
            return scale, offset
        s, o = scale[..., None], offset[..., None]
        deq = torch.round((w - o) / s).clamp(0, 15) * s + o
        err = (w - deq).square()
        err = (err if importance is None else err * importance).sum(dim=-1)
        if best is None:
            best, best_err = (scale, offset), err
        else:
            better = err < best_err
            best = (torch.where(better, scale, best[0]), torch.where(better, offset, best[1]))
            best_err = torch.minimum(err, best_err)
    return best
