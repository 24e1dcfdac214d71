"""Rotary position embedding, NeoX layout (the halves of each head are rotated), torch reference."""
from __future__ import annotations

import torch


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, H, D], k: [T, KVH, D], cos/sin: [T, D/2] (fp32). Returns rotated q, k in their dtype."""

    def rotate(x: torch.Tensor) -> torch.Tensor:
        c, s = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)

    return rotate(q), rotate(k)
