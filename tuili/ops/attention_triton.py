"""Paged attention, Triton: the fast versions of `store_kv_cache` and `paged_attention` in ops/attention.py.

Same shapes and semantics as the torch reference. Cache layout (per layer): k_cache, v_cache:
[num_blocks, block_size, num_kv_heads, head_dim], head_dim contiguous; token t of a sequence lives in block
block_table[t // block_size] at offset t % block_size. Kernels gather K/V rows through the block table, so
any block size works and a tile of keys may span several blocks.

Triton is imported on first use, not with this module: importing tuili must not import triton (the tests set
TRITON_INTERPRET first, and CPU-only installs never need it). The kernel bodies below name the module
global `tl`, which `_kernels()` binds before it wraps them with `triton.jit` (their `tl.constexpr`
annotations stay strings until then, thanks to `from __future__ import annotations`).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from types import SimpleNamespace

import torch

from tuili.ops import pdl
from tuili.ops.attention import QMAX
from tuili.ops.attention_metadata import AttentionMetadata

tl = None  # triton.language, bound by _kernels()


# ---- kernels (plain functions here; _kernels() jit-compiles them) ------------------------------------------

def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, slot_mapping_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_kc_slot, stride_kc_h, stride_vc_slot, stride_vc_h,
                     NUM_KV_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
                     QMAX: tl.constexpr):
    """One program per new token t: copy k[t], v[t] ([KVH, D], strided) to cache slot slot_mapping[t].
    QMAX > 0: a quantized cache (int8: 127, fp8 e4m3: 448); each head's row is stored as x / s with
    s = amax|x| / QMAX, and s goes to the scale tensors ([slots, KVH], contiguous)."""
    t = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    if slot < 0:  # padding token (e.g. a CUDA-graph batch padded to its bucket): nothing to store
        return
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, HEAD_DIM)[None, :]
    mask = offs_h < NUM_KV_HEADS
    k = tl.load(k_ptr + t.to(tl.int64) * stride_kt + offs_h * stride_kh + offs_d, mask=mask)
    v = tl.load(v_ptr + t.to(tl.int64) * stride_vt + offs_h * stride_vh + offs_d, mask=mask)
    k_dst = k_cache_ptr + slot * stride_kc_slot + offs_h * stride_kc_h + offs_d
    v_dst = v_cache_ptr + slot * stride_vc_slot + offs_h * stride_vc_h + offs_d
    if QMAX > 0:
        _store_quantized(k, k_dst, k_scale_ptr + slot * NUM_KV_HEADS + offs_h, mask, QMAX)
        _store_quantized(v, v_dst, v_scale_ptr + slot * NUM_KV_HEADS + offs_h, mask, QMAX)
    else:
        tl.store(k_dst, k, mask=mask)
        tl.store(v_dst, v, mask=mask)


def _store_quantized(x, dst, scale_dst, mask, QMAX: tl.constexpr):
    """Store rows x ([H, D]) as x / s in dst's dtype (int8: rounded, floor(. + 0.5)), s ([H, 1]) at scale_dst."""
    x = x.to(tl.float32)
    scale = tl.maximum(tl.div_rn(tl.max(tl.abs(x), 1, keep_dims=True), QMAX), 1e-8)
    y = tl.div_rn(x, scale)  # IEEE division, as torch's: `/` is approximate on GPUs
    if dst.dtype.element_ty == tl.int8:
        y = tl.minimum(tl.maximum(tl.floor(y + 0.5), -127.0), 127.0)
    else:  # round to e4m3's 3 mantissa bits here (to nearest, ties to even), so the cast below is exact: the
        # Triton interpreter's own fp8 cast loses the carry into the exponent (124.0 -> 64.0)
        bits = y.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000
        y = bits.to(tl.float32, bitcast=True)
    tl.store(dst, y.to(dst.dtype.element_ty), mask=mask)
    tl.store(scale_dst, scale, mask=mask)


def _attend_tile(q, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table_ptr, kv_head, n, load_mask,
                 score_mask, m_i, l_i, acc, qk_scale, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                 stride_vh, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
                 KV_QUANT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step of q ([M, D]) over the keys at positions n ([N]), gathered through the block
    table. load_mask ([N]) guards the gather; score_mask ([M, N] or None) hides keys a row must not see.
    KV_QUANT: the cache holds int8/fp8 values with one scale per (slot, kv head); K's scales multiply the
    scores' columns (the dot runs on the raw values, exact in q's dtype), V is dequantized in fp32 (scaling the
    probabilities instead could push them below fp16's normal range)."""
    offs_d = tl.arange(0, HEAD_DIM)
    page = tl.load(table_ptr + n // PAGE_SIZE, mask=load_mask, other=0).to(tl.int64)
    offset = n % PAGE_SIZE
    k = tl.load(k_cache_ptr + page[:, None] * stride_kb + offset[:, None] * stride_ks + kv_head * stride_kh
                + offs_d[None, :], mask=load_mask[:, None], other=0.0)
    v = tl.load(v_cache_ptr + page[:, None] * stride_vb + offset[:, None] * stride_vs + kv_head * stride_vh
                + offs_d[None, :], mask=load_mask[:, None], other=0.0)
    if KV_QUANT:
        slot = (page * PAGE_SIZE + offset) * NUM_KV_HEADS + kv_head
        k_scale = tl.load(k_scale_ptr + slot, mask=load_mask, other=0.0)
        v_scale = tl.load(v_scale_ptr + slot, mask=load_mask, other=0.0)
        k = k.to(q.dtype)
        v = (v.to(tl.float32) * v_scale[:, None]).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * (k_scale * qk_scale)[None, :]
    else:
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [M, N], log2 domain
    if score_mask is not None:  # finite, not -inf: a row that sees no key of its split (decode kernel, QLEN > 1)
        # must not make NaN; its sum of junk gets lse ~ -1e30, weight 0 in the split merge. A row that sees any
        # key sees its split's (or the prefill kernel's) first key, in the first tile: the rest adds exp2(-1e30
        # - m) = 0.
        s = tl.where(score_mask, s, -1.0e30)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


def _rotate(x, x_rot, cos, signed_sin):
    """RoPE of x (NeoX: x_rot is x with its halves swapped, signed_sin -sin on the first half), each product
    rounded to x's dtype before the sum, as rope_store_kv_triton (and the torch reference) round them."""
    dtype = x.dtype
    return ((x.to(tl.float32) * cos).to(dtype).to(tl.float32)
            + (x_rot.to(tl.float32) * signed_sin).to(dtype).to(tl.float32)).to(dtype)


def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_tables_ptr, seq_lens_ptr,
                   out_ptr, lse_ptr, k_new_ptr, v_new_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, scale,
                   stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                   stride_bt, stride_ot, stride_oh, stride_os, stride_lt, stride_lh, stride_knt, stride_knh,
                   stride_vnt, stride_vnh, stride_cos, stride_sin,
                   GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
                   NUM_KV_HEADS: tl.constexpr, KV_QUANT: tl.constexpr, BLOCK_N: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, WRITE_LSE: tl.constexpr, QLEN: tl.constexpr,
                   MIN_SPLIT: tl.constexpr, ROPE: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr):
    """Flash-decoding. Grid (batch, kv_heads, num_splits). Program (b, g, s) attends the GROUP query heads of
    kv head g for each of sequence b's QLEN new tokens (QLEN * GROUP rows, padded to BLOCK_G >= 16 for tl.dot)
    over split s of its context: split s covers whole pages [s * split_len, (s + 1) * split_len), split_len =
    max(ceil(ceil(seq_len / splits) / page) * page, MIN_SPLIT) (a short context leaves the last splits empty:
    tiny splits cost more than they save), all read from device memory, so one launch serves any seq_lens
    (CUDA-graph safe). QLEN > 1 (speculative verification: every sequence the same number of new tokens): row
    (j, head) sits at position seq_len - QLEN + j and sees the keys up to it; each K/V tile is read once for
    all of them.
    q: [B * QLEN, H, D]; out: [B * QLEN, H, splits, D] (fp32, normalised per split) with lse: [B * QLEN, H,
    splits] (log2 domain) when WRITE_LSE, else out: [B * QLEN, H, D] in q's dtype (one split: final).
    ROPE (QLEN 1; a 16/32-bit cache in q's dtype): q, k_new, v_new are this step's projections before RoPE
    (views of the fused qkv: [B, H, D], [B, KVH, D]) and the kernel does rope_store_kv_triton's work too: each
    program rotates its q rows (cos/sin rows at pos[b], rounded as that kernel rounds), and the split holding
    position seq_len - 1 rotates the new key, stores it and v_new at slot[b] (a negative slot: padding, not
    stored) and attends to them from registers, not from the cache it has just written (one kernel fewer per
    step, no store-to-load ordering inside the program).
    EARLY (PDL): the next kernel may launch at once, not after the loop (see paged_decode_attention)."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    # the step's lengths, positions and slots come from the host's buffers, written before the kernel this one
    # follows: read while it still runs (PDL), so that only q and the new K/V wait for it
    seq_len = tl.load(seq_lens_ptr + b)
    split_len = tl.maximum(tl.cdiv(tl.cdiv(seq_len, tl.num_programs(2)), PAGE_SIZE) * PAGE_SIZE, MIN_SPLIT)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    # a split past the context (a short one leaves most of them empty) writes nothing and exits at once: the
    # merge reads only the splits that hold keys (split 0 always runs, so the kernel still waits as a whole)
    active = (start < seq_len) | (split == 0)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    token = offs_g // GROUP                               # which of the sequence's new tokens a row is
    heads = kv_head * GROUP + offs_g % GROUP
    head_mask = offs_g < tl.where(active, GROUP * QLEN, 0)
    tokens = b.to(tl.int64) * QLEN + token
    if ROPE:
        half: tl.constexpr = HEAD_DIM // 2
        rot_d = (offs_d + half) % HEAD_DIM  # rotate_half: x2 beside x1, -x1 beside x2
        pos = tl.load(pos_ptr + b).to(tl.int64)
        cos = tl.load(cos_ptr + pos * stride_cos + offs_d % half)
        sin = tl.load(sin_ptr + pos * stride_sin + offs_d % half)
        slot = tl.load(slot_ptr + b).to(tl.int64)
        own_new = (start <= seq_len - 1) & (seq_len - 1 < end)  # this split holds the new token: the loop stops
        if own_new:                                               # before it, which comes from registers
            end = seq_len - 1
    if PDL:  # launched early (ops/pdl.py): wait for the kernel before (the new K/V, q) to finish
        if EARLY:
            tl.extra.cuda.gdc_launch_dependents()
        if active:
            tl.extra.cuda.gdc_wait()
    q = tl.load(q_ptr + tokens[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=head_mask[:, None], other=0.0)
    if ROPE:
        cos = cos.to(q.dtype).to(tl.float32)
        sin = sin.to(q.dtype).to(tl.float32)
        sin = tl.where(offs_d < half, -sin, sin)
        q_rot = tl.load(q_ptr + tokens[:, None] * stride_qt + heads[:, None] * stride_qh + rot_d[None, :],
                        mask=head_mask[:, None], other=0.0)
        q = _rotate(q, q_rot, cos[None, :], sin[None, :])
        # the new token's k and v, loaded with q (the split that holds it uses them after its loop; 768 bytes from
        # L2 for the others)
        k_row = k_new_ptr + b.to(tl.int64) * stride_knt + kv_head * stride_knh
        d_mask = offs_d < tl.where(active, HEAD_DIM, 0)
        k_new = tl.load(k_row + offs_d, mask=d_mask, other=0.0)
        k_new_rot = tl.load(k_row + rot_d, mask=d_mask, other=0.0)
        v_new = tl.load(v_new_ptr + b.to(tl.int64) * stride_vnt + kv_head * stride_vnh + offs_d, mask=d_mask,
                        other=0.0)
    visible_end = seq_len - QLEN + 1 + token              # one past the last key each row sees
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    qk_scale = scale * 1.4426950408889634
    table_ptr = block_tables_ptr + b.to(tl.int64) * stride_bt
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        valid = n < end
        if QLEN == 1:
            score_mask = valid[None, :]
        else:  # a row sees a prefix of the split; one that sees none of it gets lse ~ -1e30: weight 0 in the merge
            score_mask = n[None, :] < tl.minimum(visible_end, end)[:, None]
        m_i, l_i, acc = _attend_tile(q, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table_ptr, kv_head, n,
                                     valid, score_mask, m_i, l_i, acc, qk_scale, stride_kb, stride_ks,
                                     stride_kh, stride_vb, stride_vs, stride_vh, HEAD_DIM, PAGE_SIZE,
                                     NUM_KV_HEADS, KV_QUANT, DOT_PRECISION)
    if PDL and not EARLY:  # not before the loop: the next kernel's waiting programs would slow it
        tl.extra.cuda.gdc_launch_dependents()
    if ROPE:
        if own_new:  # the new token: rotated k and v from the projections, stored, and attended to here
            k_new = _rotate(k_new, k_new_rot, cos, sin)
            if slot >= 0:
                tl.store(k_cache_ptr + (slot // PAGE_SIZE) * stride_kb + (slot % PAGE_SIZE) * stride_ks
                         + kv_head * stride_kh + offs_d, k_new)
                tl.store(v_cache_ptr + (slot // PAGE_SIZE) * stride_vb + (slot % PAGE_SIZE) * stride_vs
                         + kv_head * stride_vh + offs_d, v_new)
            score = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * qk_scale
            score = tl.where(head_mask, score, -1.0e30)
            m_new = tl.maximum(m_i, score)
            alpha = tl.exp2(m_i - m_new)
            p_new = tl.exp2(score - m_new)
            l_i = l_i * alpha + p_new
            acc = acc * alpha[:, None] + p_new.to(v_new.dtype).to(tl.float32)[:, None] * v_new.to(tl.float32)[None, :]
            m_i = m_new
    # a split with no keys (seq_len 0) writes out 0 and lse -inf, which the merge weighs 0; head_mask is all
    # off in the inactive splits
    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    out_ptrs = out_ptr + tokens[:, None] * stride_ot + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=head_mask[:, None])
    if WRITE_LSE:
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + tokens * stride_lt + heads * stride_lh + split, lse, mask=head_mask)


def _merge_splits_kernel(partial_ptr, lse_ptr, out_ptr, seq_lens_ptr, stride_pt, stride_ph, stride_ps, stride_lt,
                         stride_lh, stride_ot, stride_oh, num_splits, qlen, BLOCK_S: tl.constexpr,
                         HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, MIN_SPLIT: tl.constexpr, PDL: tl.constexpr,
                         EARLY: tl.constexpr):
    """Grid (rows, heads): out[b, h] = sum_s w_s * partial[b, h, s] with w = softmax over s of lse (log2), over
    the splits the decode kernel wrote: those that hold keys of the row's sequence (its split_len), at least one."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b // qlen)  # the host's buffer: read before the wait
    split_len = tl.maximum(tl.cdiv(tl.cdiv(seq_len, num_splits), PAGE_SIZE) * PAGE_SIZE, MIN_SPLIT)
    written = tl.maximum(tl.cdiv(seq_len, split_len), 1)
    if PDL:  # launched early (ops/pdl.py): wait for the splits to be written
        if EARLY:
            tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
        if not EARLY:
            tl.extra.cuda.gdc_launch_dependents()
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    split_mask = offs_s < written
    lse = tl.load(lse_ptr + b * stride_lt + h * stride_lh + offs_s, mask=split_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m > float("-inf"), m, 0.0)  # no split had keys (seq_len 0): every weight is 0, out is 0
    w = tl.exp2(lse - m)
    partial = tl.load(partial_ptr + b.to(tl.int64) * stride_pt + h * stride_ph + offs_s[:, None] * stride_ps
                      + offs_d[None, :], mask=split_mask[:, None], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(partial * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b.to(tl.int64) * stride_ot + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))


def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_tables_ptr, seq_lens_ptr,
                    query_start_loc_ptr, out_ptr, scale, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh,
                    stride_vb, stride_vs, stride_vh, stride_bt, stride_ot, stride_oh,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
                    NUM_KV_HEADS: tl.constexpr, KV_QUANT: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """FlashAttention over a varlen batch whose keys all live in the paged cache. Grid (query tiles, batch,
    heads). Program (i, b, h) takes query rows [i * BLOCK_M, (i + 1) * BLOCK_M) of sequence b (they sit at
    positions seq_len - query_len + row) and head h, and attends keys 0 .. its last row's position: tiles
    below the tile's first position unmasked, the rest (the diagonal) with the causal mask.
    q: [T, H, D] (rows query_start_loc[b] ..); out: [T, H, D]."""
    tile = tl.program_id(0)
    b = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + b)
    q_len = tl.load(query_start_loc_ptr + b + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    first_pos = seq_len - q_len + tile * BLOCK_M  # position of the tile's first query row

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < q_len
    pos = first_pos + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    tokens = (q_start + rows).to(tl.int64)
    q = tl.load(q_ptr + tokens[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=row_mask[:, None], other=0.0)
    kv_head = head // GROUP
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qk_scale = scale * 1.4426950408889634
    table_ptr = block_tables_ptr + b.to(tl.int64) * stride_bt

    full_end = (first_pos + 1) // BLOCK_N * BLOCK_N      # keys < full_end are visible to every row
    causal_end = tl.minimum(first_pos + BLOCK_M, seq_len)  # one past the last row's position
    for n0 in range(0, full_end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        m_i, l_i, acc = _attend_tile(q, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table_ptr, kv_head, n,
                                     n < full_end, None, m_i, l_i, acc, qk_scale, stride_kb, stride_ks, stride_kh,
                                     stride_vb, stride_vs, stride_vh, HEAD_DIM, PAGE_SIZE, NUM_KV_HEADS, KV_QUANT,
                                     DOT_PRECISION)
    for n0 in range(full_end, causal_end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        visible = n[None, :] <= pos[:, None]
        m_i, l_i, acc = _attend_tile(q, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table_ptr, kv_head, n,
                                     n < causal_end, visible, m_i, l_i, acc, qk_scale, stride_kb, stride_ks,
                                     stride_kh, stride_vb, stride_vs, stride_vh, HEAD_DIM, PAGE_SIZE, NUM_KV_HEADS,
                                     KV_QUANT, DOT_PRECISION)
    out = acc / l_i[:, None]
    tl.store(out_ptr + tokens[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


@functools.cache
def _kernels() -> SimpleNamespace:
    """Import triton and jit-compile the kernels above, once, on first use."""
    global tl, _attend_tile, _store_quantized, _rotate  # the kernels look these up as module globals when compiled
    import triton
    import triton.language as tl

    _attend_tile = triton.jit(_attend_tile)
    _store_quantized = triton.jit(_store_quantized)
    _rotate = triton.jit(_rotate)
    # Triton compiles a kernel once per "specialization" of its arguments (an int equal to 1 or divisible by
    # 16, a pointer 16-byte aligned). Block tables and lengths arrive as views of one buffer at any offset and
    # width, so they would make a server compile new variants (about a second each) in the middle of serving;
    # they are read once per tile, so nothing is lost by not specializing them.
    loose = ["block_tables_ptr", "seq_lens_ptr", "query_start_loc_ptr", "pos_ptr", "slot_ptr", "stride_bt",
             "stride_lt", "stride_lh", "qlen"]  # lse strides: the split count (1 or 16, ...) must not make a
    # variant; nor the merge's tokens per sequence (1 or 5): decode's variants serve verification's
    jit_args = inspect.signature(triton.jit).parameters

    def jit(fn):
        names = [n for n in loose if n in inspect.signature(fn).parameters]
        extra = {"do_not_specialize_on_alignment": names} if "do_not_specialize_on_alignment" in jit_args else {}
        return triton.jit(fn, do_not_specialize=names, **extra)

    return SimpleNamespace(store_kv=triton.jit(_store_kv_kernel), decode=jit(_decode_kernel),
                           merge=jit(_merge_splits_kernel), prefill=jit(_prefill_kernel))


# ---- launchers ----------------------------------------------------------------------------------------------

def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to tf32 on tensor cores: keep them exact, like the reference
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int]:
    """Validate shapes; returns (head_dim, group = query heads per kv head)."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"expected q [T, H, D] and caches [blocks, block_size, KVH, D], got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    head_dim, num_heads, num_kv_heads = q.shape[2], q.shape[1], k_cache.shape[2]
    if k_cache.shape[3] != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"q {tuple(q.shape)} does not fit caches of {num_kv_heads} kv heads of dim "
                         f"{k_cache.shape[3]}")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("the caches' head_dim must be contiguous")
    return head_dim, num_heads // num_kv_heads


def _scales(k_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None):
    """(k_scale, v_scale, quantized?) as kernel arguments: a quantized cache needs both scale tensors,
    [num_blocks, block_size, KVH] contiguous; an unquantized one passes its cache as a pointer never read."""
    quantized = k_cache.dtype in QMAX
    if quantized != (k_scale is not None and v_scale is not None):
        raise ValueError(f"a {k_cache.dtype} cache needs {'both' if quantized else 'no'} scale tensors")
    if not quantized:
        return k_cache, k_cache, False
    if k_scale.shape != k_cache.shape[:3] or v_scale.shape != k_scale.shape or not (
            k_scale.is_contiguous() and v_scale.is_contiguous()) or k_scale.dtype != torch.float32:
        raise ValueError(f"scales must be contiguous fp32 {tuple(k_cache.shape[:3])}")
    return k_scale, v_scale, True


def store_kv_cache_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                          v_scale: torch.Tensor | None = None) -> None:
    """Write new K/V ([T, KVH, D], any strides) into the cache at `slot_mapping` ([T] flat slot ids).

    Like `store_kv_cache`, plus: a negative slot (a padding token) is skipped.
    """
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    if k_cache.shape[2:] != (num_kv_heads, head_dim) or head_dim & (head_dim - 1):
        raise ValueError(f"k {tuple(k.shape)} does not fit cache {tuple(k_cache.shape)} (head_dim a power of 2)")
    if k_cache.stride(1) * k_cache.shape[1] != k_cache.stride(0) or v_cache.stride(1) * v_cache.shape[1] != \
            v_cache.stride(0):
        raise ValueError("each cache block's slots must be laid out back to back")
    k_scale, v_scale, quantized = _scales(k_cache, k_scale, v_scale)
    k = k if k.stride(2) == 1 else k.contiguous()
    v = v if v.stride(2) == 1 else v.contiguous()
    _kernels().store_kv[(num_tokens,)](
        k, v, k_cache, v_cache, k_scale, v_scale, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, BLOCK_H=_next_power_of_2(num_kv_heads), HEAD_DIM=head_dim,
        QMAX=QMAX[k_cache.dtype] if quantized else 0.0)


MIN_SPLIT_TOKENS = 64  # the decode kernel's splits are at least this long (whole pages); H100, 8B shape, batch 1:
# 128-1024 cached tokens in 32 splits of 16-32 took 6.5-8.5 us per layer, in splits of 64 5.3-7.4


def choose_num_splits(batch_size: int, num_kv_heads: int, max_model_len: int, block_size: int = 16,
                      num_sms: int = 132, max_splits: int = 64) -> int:
    """How many context splits paged_decode_attention should use: enough programs for about two per SM
    (batch_size * num_kv_heads * splits >= 2 * num_sms), but every split at least one page of max_model_len.
    A power of two, so that a server meets few kernel variants (warm_up_kernels compiles them all at start)."""
    wanted = -(-2 * num_sms // max(1, batch_size * num_kv_heads))
    pages = -(-max_model_len // block_size)
    splits = max(1, min(wanted, pages, max_splits))
    return 1 << (splits.bit_length() - 1)  # the power of two at or below


def _decode_tiles(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages): on H100 (bf16, D 128) 64/4/3 was within 2% of the best of a sweep, at
    2.7-3.0 TB/s once batch * kv_heads * splits fills the GPU."""
    if dtype == torch.float32 or head_dim > 128:
        return 32, 4, 2
    return 64, 4, 3


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           num_splits: int, block_n: int | None = None, k_scale: torch.Tensor | None = None,
                           v_scale: torch.Tensor | None = None, query_len: int = 1,
                           rope: tuple | None = None, launch_early: bool = False) -> torch.Tensor:
    """`query_len` new tokens per sequence (1: decode; more: a verification step), the last of each
    sequence's seq_lens[b] cached tokens, causal: q [B * query_len, H, D] -> the same shape.
    rope = (k, v, cos, sin, positions, slot_mapping) (query_len 1, a 16/32-bit cache in q's dtype): q, k [B, KVH,
    D] and v are not yet rotated nor stored, and the kernel does rope_store_kv_triton's work as well (the new
    token's K/V in the cache afterwards).
    launch_early (PDL): the kernels let the next one launch at their start rather than after the attention's
    loop: for a next GEMV that streams its weights before its wait (stream_gemv, batch-1 INT4 o projection;
    H200 8B: 566 -> 576 tok/s), whose CTAs then copy while the attention still runs. A GEMV that does nothing
    before its wait only loses by it (Triton's, INT8: 414 -> 412).

    Reads no device value on the host and launches a grid that depends only on B and num_splits, so it can be
    captured in a CUDA graph and replayed with other seq_lens / block_tables. seq_len 0 gives zeros.
    """
    head_dim, group = _check_cache(q, k_cache, v_cache)
    rows, num_heads = q.shape[:2]
    batch = rows // query_len
    if rows != batch * query_len or seq_lens.shape[0] != batch or block_tables.shape[0] != batch:
        raise ValueError(f"decode needs {query_len} queries per sequence: q has {rows} rows, seq_lens "
                         f"{seq_lens.shape[0]}, block_tables {block_tables.shape[0]}")
    k_scale, v_scale, quantized = _scales(k_cache, k_scale, v_scale)
    q = q if q.stride(2) == 1 else q.contiguous()
    if rope is not None:
        k_new, v_new, cos, sin, positions, slots = rope
        kv_shape = (batch, k_cache.shape[2], head_dim)
        if query_len != 1 or quantized or k_cache.dtype != q.dtype or k_new.shape != kv_shape or \
                v_new.shape != kv_shape or cos.shape[-1] != head_dim // 2:
            raise ValueError("RoPE in the decode kernel takes one new token per sequence, k and v [B, KVH, D], "
                             "cos/sin tables [positions, D / 2] and a 16/32-bit cache in q's dtype")
        k_new, v_new, cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (k_new, v_new, cos, sin))
    else:
        k_new = v_new = cos = sin = positions = slots = q  # placeholders
    block_g = max(16, _next_power_of_2(group * query_len))
    tile_n, num_warps, num_stages = _decode_tiles(head_dim, q.dtype)
    block_n = block_n or tile_n
    kernels = _kernels()
    min_split = -(-MIN_SPLIT_TOKENS // k_cache.shape[1]) * k_cache.shape[1]
    out = torch.empty(rows, num_heads, head_dim, dtype=q.dtype, device=q.device)
    if num_splits == 1:  # the one split is the answer: write it straight to out
        partial, lse = out, out
        partial_strides = (out.stride(0), out.stride(1), 0)
    else:
        partial = torch.empty(rows, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(rows, num_heads, num_splits, dtype=torch.float32, device=q.device)
        partial_strides = partial.stride()[:3]
    kernels.decode[(batch, k_cache.shape[2], num_splits)](
        q, k_cache, v_cache, k_scale, v_scale, block_tables, seq_lens, partial, lse, k_new, v_new, cos, sin,
        positions, slots, scale, q.stride(0),
        q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), block_tables.stride(0), *partial_strides, lse.stride(0), lse.stride(1),
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1), cos.stride(0), sin.stride(0),
        ROPE=rope is not None,
        GROUP=group, BLOCK_G=block_g, HEAD_DIM=head_dim, PAGE_SIZE=k_cache.shape[1],
        NUM_KV_HEADS=k_cache.shape[2], KV_QUANT=quantized, BLOCK_N=block_n,
        DOT_PRECISION=_dot_precision(q.dtype), WRITE_LSE=num_splits > 1, QLEN=query_len,
        MIN_SPLIT=min_split, num_warps=num_warps, EARLY=launch_early,
        num_stages=num_stages, **pdl.launch_options(q.device))
    if num_splits > 1:
        kernels.merge[(rows, num_heads)](
            partial, lse, out, seq_lens, partial.stride(0), partial.stride(1), partial.stride(2), lse.stride(0),
            lse.stride(1), out.stride(0), out.stride(1), num_splits, query_len,
            BLOCK_S=_next_power_of_2(num_splits), HEAD_DIM=head_dim, PAGE_SIZE=k_cache.shape[1],
            MIN_SPLIT=min_split, num_warps=4, EARLY=launch_early, **pdl.launch_options(q.device))
    return out


def _prefill_tiles(head_dim: int, dtype: torch.dtype, max_query_len: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages), from a sweep on H100 (bf16, Triton 3.6): 128x128 tiles
    reach ~320-400 TFLOP/s on long head_dim-128 prompts; 64x64 is best or close for short chunks and D 64."""
    if dtype == torch.float32 or head_dim > 128:
        return 64, 32, 4, 2
    if head_dim == 128 and max_query_len >= 2048:
        return 128, 128, 8, 3
    return 64, 64, 4, 3


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            meta: AttentionMetadata, scale: float, block_m: int | None = None,
                            block_n: int | None = None, k_scale: torch.Tensor | None = None,
                            v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of a varlen batch of new tokens (prefill, chunked prefill, decodes) over the cache."""
    head_dim, group = _check_cache(q, k_cache, v_cache)
    k_scale, v_scale, quantized = _scales(k_cache, k_scale, v_scale)
    q = q if q.stride(2) == 1 else q.contiguous()
    tile_m, tile_n, num_warps, num_stages = _prefill_tiles(head_dim, q.dtype, meta.max_query_len)
    block_m, block_n = block_m or tile_m, block_n or tile_n
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    batch, num_heads = meta.block_tables.shape[0], q.shape[1]
    _kernels().prefill[(-(-meta.max_query_len // block_m), batch, num_heads)](
        q, k_cache, v_cache, k_scale, v_scale, meta.block_tables, meta.seq_lens, meta.query_start_loc, out, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0),
        v_cache.stride(1), v_cache.stride(2), meta.block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=head_dim, PAGE_SIZE=k_cache.shape[1], NUM_KV_HEADS=k_cache.shape[2],
        KV_QUANT=quantized, BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_PRECISION=_dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages)
    return out


MULTI_QUERY_ROWS = 64  # the decode kernel takes up to this many (token, query head) rows per kv head


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           meta: AttentionMetadata, scale: float, k_scale: torch.Tensor | None = None,
                           v_scale: torch.Tensor | None = None, launch_early: bool = False) -> torch.Tensor:
    """Drop-in for `paged_attention`: q [T, H, D] -> [T, H, D]; flash-decoding when every query is a decode or
    the step is a verification (every sequence k + 1 new tokens: one kernel variant, compiled at start).
    launch_early: as paged_decode_attention's, for a decode step."""
    scales = dict(k_scale=k_scale, v_scale=v_scale)
    q_len, q_lens = meta.max_query_len, meta.query_lens_cpu
    if q_len == 1 or (meta.verification and q_len * q.shape[1] // k_cache.shape[2] <= MULTI_QUERY_ROWS):
        # flash-decoding: each K/V tile read once for all query heads (and new tokens) of a kv head, the context
        # split across programs
        num_splits = choose_num_splits(len(q_lens), k_cache.shape[2], meta.max_seq_len, k_cache.shape[1])
        return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, num_splits,
                                      query_len=q_len, launch_early=launch_early and q_len == 1, **scales)
    # a mixed batch: its leading decodes (the runner puts them first) go to the GQA-aware decode kernel, which
    # reads each K/V page once for all query heads; the prefill kernel would read it once per head
    num_decodes = 0
    for q_len in meta.query_lens_cpu:
        if q_len != 1:
            break
        num_decodes += 1
    if num_decodes == 0:
        return paged_prefill_attention(q, k_cache, v_cache, meta, scale, **scales)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    d = num_decodes
    num_splits = choose_num_splits(d, k_cache.shape[2], max(meta.seq_lens_cpu[:d]), k_cache.shape[1])
    out[:d] = paged_decode_attention(q[:d], k_cache, v_cache, meta.block_tables[:d], meta.seq_lens[:d], scale,
                                     num_splits, **scales)
    rest = dataclasses.replace(
        meta, slot_mapping=meta.slot_mapping[d:], block_tables=meta.block_tables[d:], seq_lens=meta.seq_lens[d:],
        query_start_loc=meta.query_start_loc[d:] - d, seq_lens_cpu=meta.seq_lens_cpu[d:],
        query_lens_cpu=meta.query_lens_cpu[d:], max_seq_len=max(meta.seq_lens_cpu[d:]))
    out[d:] = paged_prefill_attention(q[d:], k_cache, v_cache, rest, scale, **scales)
    return out


def decode_attention_rope(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          meta: AttentionMetadata, scale: float, launch_early: bool = False) -> torch.Tensor:
    """A decode step (every sequence one new token) from q, k, v before RoPE: rope_store_kv_triton then
    paged_attention_triton, in one kernel (a 16/32-bit cache in q's dtype)."""
    num_splits = choose_num_splits(len(meta.query_lens_cpu), k_cache.shape[2], meta.max_seq_len, k_cache.shape[1])
    return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, num_splits,
                                  rope=(k, v, cos, sin, positions, meta.slot_mapping), launch_early=launch_early)


def warm_up_kernels(k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, dtype: torch.dtype,
                    max_splits: int = 64, k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None, verify_query_len: int = 0,
                    rope_tables: tuple[torch.Tensor, torch.Tensor] | None = None, launch_early: bool = False) -> None:
    """Compile now the attention kernel variants that serving meets later (each first use of a variant costs
    about a second of Triton compilation, which the request that meets it would wait for): decode with every
    split count choose_num_splits can return (and verification's k + 1 tokens per sequence, one split and
    several; and, given the model's RoPE tables (cos, sin), decode steps outside CUDA graphs with RoPE inside,
    see decode_attention_rope; each also with launch_early where given), and prefill with each tile shape. Reads the
    cache, writes nothing to it."""
    device, head_dim = k_cache.device, k_cache.shape[-1]
    scales = dict(k_scale=k_scale, v_scale=v_scale)
    q = torch.zeros(1, num_heads, head_dim, dtype=dtype, device=device)
    table = torch.zeros(1, 1, dtype=torch.int32, device=device)
    seq_lens = torch.ones(1, dtype=torch.int32, device=device)
    with_rope = rope_tables is not None and k_scale is None and k_cache.dtype == dtype
    kv = torch.zeros(1, k_cache.shape[2], head_dim, dtype=dtype, device=device)
    no_slot = torch.full((1,), -1, dtype=torch.int32, device=device)  # stores nothing; int32 as eager steps
    splits = 1
    while splits <= max_splits:
        for early in {False, launch_early}:
            paged_decode_attention(q, k_cache, v_cache, table, seq_lens, 1.0, splits, launch_early=early, **scales)
            if with_rope:
                paged_decode_attention(q, k_cache, v_cache, table, seq_lens, 1.0, splits,
                                       rope=(kv, kv, *rope_tables, no_slot + 1, no_slot), launch_early=early)
        splits *= 2
    if verify_query_len > 1 and verify_query_len * num_heads // k_cache.shape[2] <= MULTI_QUERY_ROWS:
        qv = torch.zeros(verify_query_len, num_heads, head_dim, dtype=dtype, device=device)
        lens = torch.full((1,), verify_query_len, dtype=torch.int32, device=device)
        for splits in (1, 2):
            paged_decode_attention(qv, k_cache, v_cache, table, lens, 1.0, splits, query_len=verify_query_len,
                                   **scales)
    starts = torch.tensor([0, 1], dtype=torch.int32, device=device)
    for max_query_len in (1, 4096):  # the rows past the one real query are masked out
        meta = AttentionMetadata(slot_mapping=seq_lens, block_tables=table, seq_lens=seq_lens,
                                 query_start_loc=starts, seq_lens_cpu=[1], query_lens_cpu=[1],
                                 max_query_len=max_query_len, max_seq_len=1)
        paged_prefill_attention(q, k_cache, v_cache, meta, 1.0, **scales)
