"""Attention over the paged KV cache: store this step's K/V, then attend through the block tables."""
from __future__ import annotations

import torch
from torch import nn

from tuili.ops import attention as attention_ops
from tuili.ops import rope
from tuili.ops.attention_metadata import get_attention_metadata


class Attention(nn.Module):
    """q: [T, H, D], k/v: [T, KVH, D] -> [T, H, D]. The runner assigns `k_cache`/`v_cache` (and, for an
    fp8/int8 cache, `k_scale`/`v_scale`) after profiling."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.k_cache = self.v_cache = torch.empty(0)
        self.k_scale = self.v_scale = None
        self.launch_early_rows: frozenset[int] = frozenset()  # Triton decode steps of these many rows: the next
        # kernel launched at once (set_backends)
        self.use_triton(False)

    def use_triton(self, enabled: bool) -> None:
        self.triton = enabled
        if enabled:
            from tuili.ops import attention_triton

            self._store, self._attend = attention_triton.store_kv_cache_triton, attention_triton.paged_attention_triton
        else:
            self._store, self._attend = attention_ops.store_kv_cache, attention_ops.paged_attention

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        meta = get_attention_metadata()
        if not self.k_cache.numel():  # memory profiling runs before the cache exists
            return attention_ops.varlen_causal_attention(q, k, v, meta, self.scale)
        self._store(k, v, self.k_cache, self.v_cache, meta.slot_mapping, self.k_scale, self.v_scale)
        early = {"launch_early": True} if q.shape[0] in self.launch_early_rows else {}  # set with triton only
        return self._attend(q, self.k_cache, self.v_cache, meta, self.scale, self.k_scale, self.v_scale, **early)

    def forward_rope(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     rotary: nn.Module) -> torch.Tensor | None:
        """RoPE (rotary: a RotaryEmbedding), then forward, with the rotation and the K/V store in one kernel where
        both run in Triton over a 16/32-bit cache (and in the decode attention kernel itself in a decode step);
        None elsewhere (the caller rotates and calls forward)."""
        if not (self.triton and rotary.triton and self.k_cache.numel() and self.k_scale is None):
            return None
        meta = get_attention_metadata()
        if meta.max_query_len == 1 and q.dtype == self.k_cache.dtype:  # decode: RoPE inside the attention kernel
            from tuili.ops import attention_triton

            return attention_triton.decode_attention_rope(q, k, v, rotary.cos, rotary.sin, positions, self.k_cache,
                                                          self.v_cache, meta, self.scale,
                                                          launch_early=q.shape[0] in self.launch_early_rows)
        q = rope.rope_store_kv_triton(q, k, v, rotary.cos, rotary.sin, positions, self.k_cache, self.v_cache,
                                      meta.slot_mapping)
        return self._attend(q, self.k_cache, self.v_cache, meta, self.scale, None, None)
