"""Paged attention, torch reference: K/V are read from the block-structured cache through block tables.

Cache layout (per layer): k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim].
Token t of a sequence lives in block block_table[t // block_size] at offset t % block_size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tuili.ops.attention_metadata import AttentionMetadata


def store_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Write new K/V ([T, KVH, D]) into the cache at `slot_mapping` ([T] flat slot ids)."""
    kvh, d = k.shape[1:]
    slot_mapping = slot_mapping.long()
    k_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, v)


def _gather(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of one sequence's K or V: [length, KVH, D]."""
    num_blocks = -(-length // cache.shape[1])
    return cache[block_table[:num_blocks]].flatten(0, 1)[:length]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal attention of the new tokens q ([T, H, D]) over each sequence's whole context in the cache.

    A sequence's new tokens are the last query_len of its seq_len positions, so chunked prefill, plain
    prefill and decode are the same computation. Returns [T, H, D].
    """
    if meta.is_pure_decode:
        return _decode(q, k_cache, v_cache, meta, scale)
    out = torch.empty_like(q)
    start = 0
    for i, (q_len, ctx) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        qi = q[start:start + q_len].transpose(0, 1)                      # [H, q_len, D]
        k = _gather(k_cache, meta.block_tables[i], ctx).transpose(0, 1)  # [KVH, ctx, D]
        v = _gather(v_cache, meta.block_tables[i], ctx).transpose(0, 1)
        mask = None
        if q_len > 1:  # query j sits at position ctx - q_len + j and sees keys up to there
            rows = torch.arange(ctx - q_len, ctx, device=q.device)[:, None]
            mask = torch.arange(ctx, device=q.device)[None, :] <= rows
        o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start:start + q_len] = o.transpose(0, 1)
        start += q_len
    return out


def varlen_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                            scale: float) -> torch.Tensor:
    """Causal attention within each sequence of a flat batch of fresh prompts (no cache, no earlier context)."""
    out = torch.empty_like(q)
    for start, end in zip(meta.query_start_loc.tolist()[:-1], meta.query_start_loc.tolist()[1:]):
        qi, ki, vi = (x[start:end].transpose(0, 1) for x in (q, k, v))
        out[start:end] = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale,
                                                         enable_gqa=True).transpose(0, 1)
    return out


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
            scale: float) -> torch.Tensor:
    """One query token per sequence: gather every sequence's pages at once, mask past each length."""
    b = q.shape[0]
    num_blocks = -(-meta.max_seq_len // k_cache.shape[1])
    tables = meta.block_tables[:, :num_blocks]
    k = k_cache[tables].flatten(1, 2).transpose(1, 2)                   # [B, KVH, S, D]
    v = v_cache[tables].flatten(1, 2).transpose(1, 2)
    mask = torch.arange(k.shape[2], device=q.device)[None, :] < meta.seq_lens[:, None]  # [B, S]
    qv = q.view(b, -1, 1, q.shape[-1])
    if q.device.type == "cpu" and q.dtype != torch.float32:  # CPU SDPA is several times faster in fp32
        qv, k, v = qv.float(), k.float(), v.float()
    o = F.scaled_dot_product_attention(qv, k, v, attn_mask=mask[:, None, None, :], scale=scale,
                                       enable_gqa=True)                 # [B, H, 1, D]
    return o.to(q.dtype).view(b, -1, q.shape[-1])
