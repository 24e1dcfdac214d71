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
    """Quantize every Linear of the decoder layers and the LM head in place; the embedding lookup stays float
    (it reads one row per token). Returns the bytes saved (negative for a tied head, which gains an int8 copy
    but reads a quarter of the bytes per step)."""
    if method != "int8":
        raise ValueError(f"quantization {method!r} is not supported; supported: int8")
    saved = 0
    if model.lm_head is None:  # tied: the lookup keeps the float table, the output projection reads int8
        embedding = model.embed_tokens.weight
        model.lm_head = Linear(embedding.shape[1], embedding.shape[0]).to(embedding.device)
        model.lm_head.quantize_int8(*quantize_per_channel(embedding))
        saved -= model.lm_head.qweight.numel() + model.lm_head.scales.numel() * model.lm_head.scales.element_size()
    for module in [*model.layers.modules(), model.lm_head]:
        if isinstance(module, Linear) and module.qweight is None:
            before = module.weight.numel() * module.weight.element_size()
            module.quantize_int8(*quantize_per_channel(module.weight))
            saved += before - module.qweight.numel() - module.scales.numel() * module.scales.element_size()
    return saved
