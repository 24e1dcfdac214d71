"""Rotary position embedding, NeoX layout (the halves of each head are rotated), and Qwen3's per-head q/k
RMSNorm fused in front of it: torch references, then the Triton fast path."""
from __future__ import annotations

import functools

import torch

from tuili.ops import pdl
from tuili.ops.rmsnorm import rms_norm


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, H, D], k: [T, KVH, D], cos/sin: [T, D/2] (fp32). Returns rotated q, k in their dtype."""

    def rotate(x: torch.Tensor) -> torch.Tensor:
        c, s = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)

    return rotate(q), rotate(k)


def rope_rows(cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables' rows at `positions` as full-width [T, 1, D] factors in `dtype`: (cos, cos) and (-sin, sin)."""
    c, s = cos[positions], sin[positions]
    return torch.cat((c, c), -1)[:, None, :].to(dtype), torch.cat((-s, s), -1)[:, None, :].to(dtype)


def rotate_rows(x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor) -> torch.Tensor:
    """apply_rope on one [T, heads, D] tensor with the rows of rope_rows (fewer ops per layer; the same
    roundings: x1 c - x2 s is x1 c + x2 (-s))."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos2 + torch.cat((x2, x1), dim=-1) * sin2


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                 cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3: RMSNorm each head of q and k (weights: [D]), then apply_rope. Shapes as in apply_rope."""
    return apply_rope(rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps), cos, sin)


# --- Triton ------------------------------------------------------------------------------------------------
# triton.language, bound when the kernels are first built: importing this module must not need Triton, and
# TRITON_INTERPRET is read when a kernel is jitted, so tests can still set it after tuili is imported.
tl = None


def _norm_rope_heads(x_ptr, out_ptr, weight_ptr, t, stride_t, stride_h, num_heads, cos, sin, offs_d, mask_d,
                     half, eps, NORM: tl.constexpr, BLOCK_H: tl.constexpr, TO_SLOT: tl.constexpr = False,
                     out_stride_h=0):
    # All heads of token t of one tensor as two [BLOCK_H, BLOCK_HALF] tiles (first and second half of each
    # head), so the rotation needs no data movement across lanes. cos/sin: [1, BLOCK_HALF] fp32.
    heads = tl.arange(0, BLOCK_H)[:, None]
    mask = (heads < num_heads) & mask_d[None, :]
    src = x_ptr + t * stride_t + heads * stride_h + offs_d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    if NORM:  # rounded as rms_norm is: normalise in fp32, cast to x's dtype, scale by the weight, cast again
        rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * half) + eps)[:, None]
        w1 = tl.load(weight_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(weight_ptr + half + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        x1 = ((x1 * rstd).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
        x2 = ((x2 * rstd).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
    # each product rounded to x's dtype before the sum, as the reference (torch ops in x's dtype) does
    o1 = (x1 * cos).to(dtype).to(tl.float32) - (x2 * sin).to(dtype).to(tl.float32)
    o2 = (x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)
    if TO_SLOT:  # one token's heads at out_ptr, out_stride_h apart (a KV cache slot)
        dst = out_ptr + heads * out_stride_h + offs_d[None, :]
    else:  # a contiguous [T, heads, D] output
        dst = out_ptr + (t * num_heads + heads) * (2 * half) + offs_d[None, :]
    tl.store(dst, o1.to(dtype), mask=mask)
    tl.store(dst + half, o2.to(dtype), mask=mask)


def _norm_rope_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, q_weight_ptr, k_weight_ptr, cos_ptr, sin_ptr, pos_ptr,
                      stride_qt, stride_qh, stride_kt, stride_kh, stride_cos, stride_sin,
                      num_heads, num_kv_heads, half, eps,
                      NORM: tl.constexpr, HAS_POS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KVH: tl.constexpr,
                      BLOCK_HALF: tl.constexpr):
    # q: [T, H, D], k: [T, KVH, D], head dim contiguous, token/head strides given (views of a fused qkv
    # are fine); q_out/k_out: the same shapes, contiguous; weights: [D]; cos/sin: [T, D/2], last dim
    # contiguous, or (HAS_POS) the whole [max_position, D/2] tables, read at row pos[t]. One program per
    # token: its cos/sin are loaded once for all q and k heads.
    t = tl.program_id(0).to(tl.int64)
    row = tl.load(pos_ptr + t).to(tl.int64) if HAS_POS else t
    offs_d = tl.arange(0, BLOCK_HALF)
    mask_d = offs_d < half
    dtype = q_out_ptr.dtype.element_ty  # the reference casts cos/sin to x's dtype
    cos = tl.load(cos_ptr + row * stride_cos + offs_d, mask=mask_d, other=0.0).to(dtype).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + row * stride_sin + offs_d, mask=mask_d, other=0.0).to(dtype).to(tl.float32)[None, :]
    _norm_rope_heads(q_ptr, q_out_ptr, q_weight_ptr, t, stride_qt, stride_qh, num_heads, cos, sin, offs_d,
                     mask_d, half, eps, NORM, BLOCK_H)
    _norm_rope_heads(k_ptr, k_out_ptr, k_weight_ptr, t, stride_kt, stride_kh, num_kv_heads, cos, sin, offs_d,
                     mask_d, half, eps, NORM, BLOCK_KVH)


def _rope_store_kernel(q_ptr, k_ptr, v_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, cos_ptr, sin_ptr, pos_ptr,
                       slot_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos,
                       stride_sin, stride_kc_slot, stride_kc_h, stride_vc_slot, stride_vc_h, num_heads, half,
                       NUM_KV_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KVH: tl.constexpr,
                       BLOCK_HALF: tl.constexpr, HEAD_DIM: tl.constexpr, PDL: tl.constexpr):
    # apply_rope_triton of token t (tables read at pos[t]) with its rotated k and its v stored straight into the
    # KV cache at slot[t] (store_kv_cache_triton's layout; a negative slot, padding, stores nothing): one kernel
    # where a decode step ran two. q_out: [T, H, D] contiguous.
    if PDL:  # launched early (ops/pdl.py): wait for the projections
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    t = tl.program_id(0).to(tl.int64)
    row = tl.load(pos_ptr + t).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask_d = offs_d < half
    dtype = q_out_ptr.dtype.element_ty
    cos = tl.load(cos_ptr + row * stride_cos + offs_d, mask=mask_d, other=0.0).to(dtype).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + row * stride_sin + offs_d, mask=mask_d, other=0.0).to(dtype).to(tl.float32)[None, :]
    _norm_rope_heads(q_ptr, q_out_ptr, q_ptr, t, stride_qt, stride_qh, num_heads, cos, sin, offs_d, mask_d,
                     half, 0.0, False, BLOCK_H)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        _norm_rope_heads(k_ptr, k_cache_ptr + slot * stride_kc_slot, k_ptr, t, stride_kt, stride_kh, NUM_KV_HEADS,
                         cos, sin, offs_d, mask_d, half, 0.0, False, BLOCK_KVH, True, stride_kc_h)
        heads = tl.arange(0, BLOCK_KVH)[:, None]
        offs = tl.arange(0, HEAD_DIM)[None, :]
        v = tl.load(v_ptr + t * stride_vt + heads * stride_vh + offs, mask=heads < NUM_KV_HEADS)
        tl.store(v_cache_ptr + slot * stride_vc_slot + heads * stride_vc_h + offs, v, mask=heads < NUM_KV_HEADS)


@functools.cache
def _kernel():
    """The jitted kernels (and their helper, which they find by name in this module), built on first use."""
    global tl, _norm_rope_heads
    import triton
    import triton.language

    tl = triton.language
    _norm_rope_heads = triton.jit(_norm_rope_heads)
    return triton.jit(_norm_rope_kernel), triton.jit(_rope_store_kernel)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _launch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            weights: tuple[torch.Tensor, torch.Tensor] | None, eps: float,
            positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    (num_tokens, num_heads, head_dim), num_kv_heads = q.shape, k.shape[1]
    if head_dim % 2 or k.shape[0] != num_tokens or k.shape[2] != head_dim or k.dtype != q.dtype:
        raise ValueError(f"q {tuple(q.shape)} {q.dtype} and k {tuple(k.shape)} {k.dtype} must share T, an even "
                         f"head_dim and dtype")
    q_out, k_out = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype,
                                                                                     device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    q, k, cos, sin = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, cos, sin))
    q_weight, k_weight = (q, k) if weights is None else (w.contiguous() for w in weights)
    half = head_dim // 2
    block_h, block_kvh, block_half = _pow2(num_heads), _pow2(num_kv_heads), _pow2(half)
    tile = 2 * max(block_h, block_kvh) * block_half
    num_warps = 4 if tile <= 2048 else 8 if tile <= 8192 else 16
    _kernel()[0][(num_tokens,)](
        q, k, q_out, k_out, q_weight, k_weight, cos, sin, q if positions is None else positions,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0), num_heads, num_kv_heads,
        half, eps, NORM=weights is not None, HAS_POS=positions is not None, BLOCK_H=block_h, BLOCK_KVH=block_kvh,
        BLOCK_HALF=block_half, num_warps=num_warps)
    return q_out, k_out


def apply_rope_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton apply_rope: q/k may be strided views (of a fused qkv); returns new contiguous q, k. With
    `positions`, cos/sin are the whole tables and row positions[t] is read (no gather kernel before)."""
    return _launch(q, k, cos, sin, None, 0.0, positions)


def qk_norm_rope_triton(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                        eps: float, cos: torch.Tensor, sin: torch.Tensor,
                        positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton qk_norm_rope in one launch: q/k may be strided views; returns new contiguous q, k."""
    return _launch(q, k, cos, sin, (q_weight, k_weight), eps, positions)


def rope_store_kv_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         slot_mapping: torch.Tensor) -> torch.Tensor:
    """apply_rope_triton (tables read at `positions`) and store_kv_cache_triton of the rotated k and v into a
    16/32-bit cache [blocks, block_size, KVH, D], in one kernel: returns the rotated q (new, contiguous)."""
    (num_tokens, num_heads, head_dim), num_kv_heads = q.shape, k.shape[1]
    if head_dim % 2 or head_dim & (head_dim - 1) or k.shape != v.shape or k.shape[0] != num_tokens or \
            k_cache.shape[2:] != (num_kv_heads, head_dim) or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q {tuple(q.shape)}, k/v {tuple(k.shape)} and cache {tuple(k_cache.shape)} "
                         f"{k_cache.dtype} do not fit (head_dim a power of 2, the cache in q's dtype)")
    if k_cache.stride(1) * k_cache.shape[1] != k_cache.stride(0) or v_cache.stride(1) * v_cache.shape[1] != \
            v_cache.stride(0):
        raise ValueError("each cache block's slots must be laid out back to back")
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return q_out
    q, k, v, cos, sin = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, cos, sin))
    half = head_dim // 2
    block_h, block_kvh, block_half = _pow2(num_heads), _pow2(num_kv_heads), _pow2(half)
    tile = 2 * block_h * block_half
    num_warps = 4 if tile <= 2048 else 8 if tile <= 8192 else 16
    _kernel()[1][(num_tokens,)](
        q, k, v, q_out, k_cache, v_cache, cos, sin, positions, slot_mapping, q.stride(0), q.stride(1), k.stride(0),
        k.stride(1), v.stride(0), v.stride(1), cos.stride(0), sin.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(1), v_cache.stride(2), num_heads, half, NUM_KV_HEADS=num_kv_heads, BLOCK_H=block_h,
        BLOCK_KVH=block_kvh, BLOCK_HALF=block_half, HEAD_DIM=head_dim, num_warps=num_warps,
        **pdl.launch_options(q.device))
    return q_out
