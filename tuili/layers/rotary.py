"""Rotary embedding with a precomputed cos/sin cache; default, linear and llama3 frequency scaling."""
from __future__ import annotations

import math

import torch
from torch import nn

from tuili.ops import rope

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(config) -> tuple[float, dict]:
    """(rope_theta, scaling dict with 'rope_type') from a HF config, transformers 4 or 5 style."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    params = {**scaling, **params}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    if params["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope type {params['rope_type']!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    return float(theta), params


def inv_frequencies(head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = scaling["rope_type"]
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":  # Llama 3.1: low frequencies slowed by `factor`, a smooth ramp in between
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict) -> None:
        super().__init__()
        freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_frequencies(head_dim, theta, scaling)
        self.register_buffer("cos", freqs.cos(), persistent=False)  # [max_position, head_dim / 2], fp32
        self.register_buffer("sin", freqs.sin(), persistent=False)
        self._rows = None
        self.use_triton(False)

    def use_triton(self, enabled: bool) -> None:
        self.triton = enabled

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        if self.triton:  # the kernel reads the table rows itself
            return rope.apply_rope_triton(q, k, self.cos, self.sin, positions)
        return self.rotate(positions, q), self.rotate(positions, k)

    def rotate(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The torch path for one [T, heads, D] tensor (q and k side by side in one go: fewer ops per layer)."""
        # the step's rows of the tables, made once per forward: every layer shares this module and gets the
        # same `positions` tensor (kept here, so `is` cannot match a new tensor at a reused address)
        key = self._rows[0] if self._rows is not None else None
        if key is not positions or self._rows[1].dtype != x.dtype:
            self._rows = (positions, *rope.rope_rows(self.cos, self.sin, positions, x.dtype))
        return rope.rotate_rows(x, *self._rows[1:])
