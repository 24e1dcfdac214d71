"""Paged attention, torch reference: K/V are read from the block-structured cache through block tables.

Cache layout (per layer): k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim].
Token t of a sequence lives in block block_table[t // block_size] at offset t % block_size.

Quantized caches (--kv-cache-dtype fp8|int8) hold K/V in float8_e4m3fn or int8 with one fp32 scale per token
and kv head (k_scale, v_scale: [num_blocks, block_size, num_kv_heads]): x ~ q * scale, scale = amax|x| / QMAX.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tuili.ops.attention_metadata import AttentionMetadata


KV_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "int8": torch.int8}
QMAX = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}
MAX_ONE_SEQUENCE_QUERY = 16  # CPU: one sequence with up to this many new tokens attends through attend_one_cpu


def quantize_kv(x: torch.Tensor, cache_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (values in cache_dtype, fp32 scales [...]). int8 rounds with floor(x / scale + 0.5), as
    the Triton store kernel does."""
    xf = x.float()
    scale = (xf.abs().amax(-1) / QMAX[cache_dtype]).clamp_min(1e-8)
    y = xf / scale[..., None]
    if cache_dtype == torch.int8:
        y = torch.floor(y + 0.5).clamp_(-127, 127)
    return y.to(cache_dtype), scale


def dequantize_kv(values: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if scale is None:
        return values.to(dtype)
    return (values.float() * scale[..., None]).to(dtype)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """fp8 tensors as raw bytes: CPU index_copy_ has no fp8 kernel."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def store_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                   v_scale: torch.Tensor | None = None) -> None:
    """Write new K/V ([T, KVH, D]) into the cache at `slot_mapping` ([T] flat slot ids), quantized (with
    their scales) when the cache is fp8/int8."""
    kvh, d = k.shape[1:]
    slot_mapping = slot_mapping.long()
    for x, cache, scales in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        if scales is not None:
            x, s = quantize_kv(x, cache.dtype)
            scales.view(-1, kvh).index_copy_(0, slot_mapping, s)
        _bytes(cache).view(-1, kvh, d).index_copy_(0, slot_mapping, _bytes(x.to(cache.dtype)))


def _gather(cache: torch.Tensor, scales: torch.Tensor | None, block_table: torch.Tensor, length: int,
            dtype: torch.dtype) -> torch.Tensor:
    """The first `length` tokens of one sequence's K or V: [length, KVH, D] in `dtype`."""
    num_blocks = -(-length // cache.shape[1])
    pages = block_table[:num_blocks]  # index_select: a third of advanced indexing's overhead on the CPU
    return dequantize_kv(cache.index_select(0, pages).flatten(0, 1)[:length],
                         None if scales is None else scales.index_select(0, pages).flatten(0, 1)[:length], dtype)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of the new tokens q ([T, H, D]) over each sequence's whole context in the cache.

    A sequence's new tokens are the last query_len of its seq_len positions, so chunked prefill, plain
    prefill and decode are the same computation. Returns [T, H, D].
    """
    if q.device.type == "cpu" and len(meta.query_lens_cpu) == 1 and meta.max_query_len <= MAX_ONE_SEQUENCE_QUERY:
        return attend_one_cpu(q, k_cache, v_cache, meta.seq_lens_cpu[0], meta.block_tables[0], scale, k_scale,
                               v_scale)
    if meta.is_pure_decode:
        return _decode(q, k_cache, v_cache, meta, scale, k_scale, v_scale)
    out = torch.empty_like(q)
    start = 0
    for i, (q_len, ctx) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        qi = q[start:start + q_len].transpose(0, 1)                      # [H, q_len, D]
        table = meta.block_tables[i]
        k = _gather(k_cache, k_scale, table, ctx, q.dtype).transpose(0, 1)  # [KVH, ctx, D]
        v = _gather(v_cache, v_scale, table, ctx, q.dtype).transpose(0, 1)
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
    starts = [0]
    for n in meta.query_lens_cpu:  # host lists: no device sync
        starts.append(starts[-1] + n)
    for start, end in zip(starts[:-1], starts[1:]):
        qi, ki, vi = (x[start:end].transpose(0, 1) for x in (q, k, v))
        out[start:end] = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale,
                                                         enable_gqa=True).transpose(0, 1)
    return out


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
            scale: float, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> torch.Tensor:
    """One query token per sequence: gather every sequence's pages at once, mask past each length."""
    b = q.shape[0]
    num_blocks = -(-meta.max_seq_len // k_cache.shape[1])
    tables = meta.block_tables[:, :num_blocks]
    # CPU SDPA is several times faster in fp32
    dtype = torch.float32 if q.device.type == "cpu" else q.dtype
    k, v = (dequantize_kv(cache[tables], None if s is None else s[tables], dtype).flatten(1, 2).transpose(1, 2)
            for cache, s in ((k_cache, k_scale), (v_cache, v_scale)))  # [B, KVH, S, D]
    mask = torch.arange(k.shape[2], device=q.device)[None, :] < meta.seq_lens[:, None]  # [B, S]
    qv = q.view(b, -1, 1, q.shape[-1]).to(dtype)
    o = F.scaled_dot_product_attention(qv, k, v, attn_mask=mask[:, None, None, :], scale=scale,
                                       enable_gqa=True)                 # [B, H, 1, D]
    return o.to(q.dtype).view(b, -1, q.shape[-1])


def attend_one_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: int,
                    block_table: torch.Tensor, scale: float, k_scale: torch.Tensor | None,
                    v_scale: torch.Tensor | None) -> torch.Tensor:
    """One sequence's few new tokens (a decode, a verification) on the CPU, where a step is mostly per-op
    overhead: the query heads and tokens of each kv head as the rows of one fp32 matmul (no GQA expansion), the
    causal mask only among the new tokens. q: [Q, H, D], the last Q of the sequence's `length` tokens."""
    q_len, num_heads, d = q.shape
    kv_heads = k_cache.shape[2]
    k = _gather(k_cache, k_scale, block_table, length, torch.float32)      # [n, KVH, D]
    v = _gather(v_cache, v_scale, block_table, length, torch.float32)
    if q_len == 1:  # a decode: no mask at all, and fp32 SDPA is one op (a few us under the matmuls below)
        o = F.scaled_dot_product_attention(q.float().view(1, num_heads, 1, d), k.transpose(0, 1)[None],
                                           v.transpose(0, 1)[None], scale=scale, enable_gqa=True)
        return o.view(1, num_heads, d).to(q.dtype)
    # rows (token j, head g of the kv head's group): head h -> kv head h // G
    qf = q.float().view(q_len, kv_heads, -1, d).transpose(0, 1).reshape(kv_heads, -1, d)
    scores = torch.bmm(qf, k.permute(1, 2, 0)).mul_(scale)                 # [KVH, Q * G, n]
    # token j sits at position length - q_len + j: later keys hidden
    hidden = torch.ones(q_len, length, dtype=torch.bool).triu_(length - q_len + 1)
    scores.view(kv_heads, q_len, -1, length).masked_fill_(hidden[None, :, None, :], float("-inf"))
    o = torch.bmm(torch.softmax(scores, dim=-1), v.transpose(0, 1))        # [KVH, Q * G, D]
    return o.view(kv_heads, q_len, -1, d).transpose(0, 1).reshape(q_len, num_heads, d).to(q.dtype)
