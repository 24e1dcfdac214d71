"""INT8 weight-only quantization, symmetric per output channel: scale[n] = max_k |W[n, k]| / 127."""
from __future__ import annotations

import torch
from torch import nn

from tuili.layers.linear import Linear


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> ([N, K] int8, [N] scales in the weight's dtype); rounding in fp32."""
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales.to(weight.dtype)


@torch.no_grad()
def quantize_model(model: nn.Module, method: str) -> int:
    """Quantize every Linear of the decoder layers in place (embedding and LM head stay as they are).

    Returns the bytes saved."""
    if method != "int8":
        raise ValueError(f"quantization {method!r} is not supported; supported: int8")
    saved = 0
    for module in model.layers.modules():
        if isinstance(module, Linear):
            before = module.weight.numel() * module.weight.element_size()
            module.quantize_int8(*quantize_per_channel(module.weight))
            saved += before - module.qweight.numel() - module.scales.numel() * module.scales.element_size()
    return saved
