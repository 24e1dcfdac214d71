"""INT8 weight-only quantization, symmetric per output channel: scale[n] = max_k |W[n, k]| / 127 (or per group of
inputs, the form GGUF's Q8_0 and Q6_K blocks transcode to)."""
from __future__ import annotations

import torch


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> ([N, K] int8, [N] scales in the weight's dtype); rounding in fp32."""
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales.to(weight.dtype)


def quantize_groupwise_int8(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> ([N, K] int8, [N, ceil(K / G)] scales in the weight's dtype), symmetric per group."""
    n, k = weight.shape
    groups = -(-k // group_size)
    w = torch.nn.functional.pad(weight.float(), (0, groups * group_size - k)).view(n, groups, group_size)
    scales = (w.abs().amax(dim=2).clamp(min=1e-8) / 127.0).to(weight.dtype)
    q = torch.round(w / scales.float()[..., None]).clamp(-127, 127).to(torch.int8)
    return q.view(n, -1)[:, :k].contiguous(), scales
