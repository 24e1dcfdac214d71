"""SiLU-and-mul for gated MLPs: torch reference, then the Triton fast path."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2 * d] = [gate | up] -> silu(gate) * up: [T, d]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


# --- Triton ------------------------------------------------------------------------------------------------
# triton.language, bound when the kernel is first built: importing this module must not need Triton, and
# TRITON_INTERPRET is read when a kernel is jitted, so tests can still set it after tuili is imported.
tl = None

_BLOCK = 1024  # columns per program: 8 per thread at 4 warps, wide enough for 16-byte loads


def _silu_and_mul_kernel(x_ptr, out_ptr, d, stride_x, BLOCK: tl.constexpr):
    # x: [T, 2d] = [gate | up], last dim contiguous, row stride given; out: [T, d] contiguous.
    # Grid: (T, cdiv(d, BLOCK)), one block of columns of one row per program.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    act = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)  # F.silu's result is rounded before the product
    tl.store(out_ptr + row * d + cols, (act * up).to(dtype), mask=mask)


@functools.cache
def _kernel():
    """The jitted kernel, built on first use."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    return triton.jit(_silu_and_mul_kernel)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """Triton silu_and_mul: x [..., 2d] (last dim contiguous, else copied) -> [..., d] in x's dtype."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dim ([gate | up]), got {x.shape[-1]}")
    d = x.shape[-1] // 2
    x2d = x.reshape(-1, 2 * d)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    out = torch.empty(*x.shape[:-1], d, dtype=x.dtype, device=x.device)
    if x2d.shape[0] == 0 or d == 0:
        return out
    block = min(_BLOCK, 1 << (d - 1).bit_length())
    _kernel()[(x2d.shape[0], -(-d // block))](x2d, out, d, x2d.stride(0), BLOCK=block,
                                              num_warps=max(1, block // 256))
    return out
