"""RMSNorm, plain and with the residual add fused in: torch reference, then the Triton fast path."""
from __future__ import annotations

import functools

import torch

from tuili.ops import pdl


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [T, hidden]; normalised in fp32, then scaled by `weight` in x's dtype (as HF does)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """residual += x; return (rms_norm(residual), residual)."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


# --- Triton ------------------------------------------------------------------------------------------------
# triton.language, bound when the kernel is first built: importing this module must not need Triton, and
# TRITON_INTERPRET is read when a kernel is jitted, so tests can still set it after tuili is imported.
tl = None


def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, new_residual_ptr, hidden, eps,
                     stride_x, stride_residual, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
                     PDL: tl.constexpr):
    # x, residual: [T, hidden], last dim contiguous (row strides given); weight: [hidden];
    # out, new_residual: [T, hidden] contiguous. One program per row; BLOCK = next_power_of_2(hidden).
    if PDL:  # launched early (ops/pdl.py): wait for x
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:  # the sum is rounded to x's dtype first, as the reference's `x + residual` is
        residual = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0).to(tl.float32)
        x = (x + residual).to(dtype)
        tl.store(new_residual_ptr + row * hidden + cols, x, mask=mask)
        x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / hidden + eps)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    # normalise in fp32, round to x's dtype, then scale (one more rounding): the reference's order
    y = (x * rstd).to(dtype).to(tl.float32) * weight
    tl.store(out_ptr + row * hidden + cols, y.to(dtype), mask=mask)


@functools.cache
def _kernel():
    """The jitted kernel, built on first use."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    return triton.jit(_rms_norm_kernel)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
            eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden = x.shape[-1]
    x2d = x.reshape(-1, hidden)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    new_residual = None if residual is None else torch.empty_like(out)
    if x2d.shape[0] == 0:
        return out, new_residual
    r2d = x2d
    if residual is not None:
        r2d = residual.reshape(-1, hidden)
        if r2d.stride(-1) != 1:
            r2d = r2d.contiguous()
    block = 1 << max(hidden - 1, 0).bit_length()
    num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    _kernel()[(x2d.shape[0],)](
        x2d, r2d, weight.contiguous(), out, out if new_residual is None else new_residual, hidden, eps,
        x2d.stride(0), r2d.stride(0), HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps,
        **pdl.launch_options(x.device))
    return out, new_residual


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton rms_norm: x [..., hidden] (last dim contiguous, else copied); output in x's dtype."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                              eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton fused_add_rms_norm: (rms_norm(x + residual), x + residual) in new tensors; inputs untouched."""
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"residual must match x: got {tuple(residual.shape)} {residual.dtype}, "
                         f"x is {tuple(x.shape)} {x.dtype}")
    return _launch(x, residual, weight, eps)
