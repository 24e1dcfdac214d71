"""GPTQ (Frantar et al., 2022): INT4 rounding that minimises each layer's output error on calibration text.

Round-to-nearest (tuili/quant/int4.py) rounds every weight on its own. GPTQ rounds the columns of a weight one
at a time and moves each column's rounding error onto the columns not yet rounded, weighted by how the layer's
inputs correlate (the Hessian H = X^T X of the layer's calibration inputs X), which minimises ||X W^T - X Q^T||.
The result has exactly round-to-nearest's format (codes, group scales and offsets): the kernels do not change.

Layers go in order: every linear of a decoder layer sees the calibration inputs produced by the layers before
it *after* their quantization, so later layers correct for the earlier ones' errors.
"""
from __future__ import annotations

import torch

from tuili.quant.int4 import GROUP_SIZES, RANGES, group_params

CALIBRATION_WINDOW = 512  # tokens per calibration window (`tuili quantize --gptq`)
BLOCK = 128  # columns per lazy batch update
REFITS = 3
DAMP = 0.01  # of H's mean diagonal, added to H


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, group_size: int = 128, symmetric: bool = False,
                  dtype: torch.dtype = torch.bfloat16, damp: float = DAMP, shrink: tuple | None = None,
                  refits: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """[N, K] float weight and the [K, K] Hessian of its inputs (X^T X, any positive scale) -> quantize_groupwise's
    (qweight [N, K/2] uint8, scales [N, groups], offsets or None), scales and offsets in `dtype`.

    Each group's scale and offset first come from its weights (the range shrunk by the factor in `shrink` with
    the least rounding error, weighted by input energy); the columns are then rounded in order of decreasing
    input energy (GPTQ's act-order: the errors move onto the columns that matter less), and `refits` times the
    scales and offsets are refitted to the codes by least squares under H and the columns rounded again. `damp`
    (a fraction of H's mean diagonal) keeps H invertible. A diagonal H with shrink (1,) and no refits gives
    exactly round-to-nearest."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"INT4 group size must be one of {GROUP_SIZES}, got {group_size}")
    n, k = weight.shape
    if k % 2:
        raise ValueError(f"INT4 packs two weights per byte along the input dimension; {k} is odd")
    if hessian.shape != (k, k):
        raise ValueError(f"the Hessian must be [{k}, {k}] for a weight with {k} inputs, got {tuple(hessian.shape)}")
    shrink = RANGES if shrink is None else shrink
    refits = REFITS if refits is None else refits
    w = weight.float()
    h = hessian.double().clone()
    dead = torch.diag(h) == 0  # inputs that never moved: any code is as good; their weights are dropped
    h[dead, dead] = 1.0
    w = torch.where(dead[None, :], 0.0, w)
    h += damp * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype, device=h.device)
    importance = torch.diag(h).float()
    groups = -(-k // group_size)
    group_of = torch.arange(k, device=w.device) // group_size
    scales = torch.empty(n, groups, device=w.device)
    offsets = torch.empty(n, groups, device=w.device)
    for g in range(groups):
        cols = slice(g * group_size, min((g + 1) * group_size, k))
        scales[:, g], offsets[:, g] = group_params(w[:, cols], symmetric, dtype, shrink, importance[cols])
    perm = torch.argsort(importance, descending=True)
    # the upper Cholesky factor of H^-1 (columns in act-order): row i spreads column i's error onto the later ones
    hp = h[perm][:, perm]
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hp)), upper=True).float()
    wp, group_of, unperm = w[:, perm], group_of[perm], torch.argsort(perm)
    q = _round_columns(wp, hinv, scales[:, group_of], offsets[:, group_of])[:, unperm]
    for _ in range(refits):
        scales, offsets = _refit(w, h.float(), q, group_size, symmetric, dtype, (scales, offsets))
        q = _round_columns(wp, hinv, scales[:, group_of], offsets[:, group_of])[:, unperm]
    q = q.to(torch.uint8)
    qweight = q[:, 0::2] | (q[:, 1::2] << 4)
    return qweight.contiguous(), scales.to(dtype), None if symmetric else offsets.to(dtype)


def _round_columns(w: torch.Tensor, hinv: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                   use_triton: bool | None = None) -> torch.Tensor:
    """GPTQ's loop: codes [N, K] (float 0..15) of w [N, K], column by column, each column's rounding error moved
    onto the columns after it through hinv (the upper Cholesky factor of H^-1); scale and offset [N, K] per
    column. Lazy batches of BLOCK columns: the error reaches the later blocks in one matrix product. In torch it
    works on the transposes (a column is a contiguous row there); use_triton (default: on CUDA) rounds each
    block in one kernel (tuili/ops/gptq_round.py) instead of ~10 small ones per column."""
    if use_triton if use_triton is not None else w.is_cuda:
        from tuili.ops.gptq_round import round_block_triton

        w, q = w.clone(), torch.empty_like(w)
        for b0 in range(0, w.shape[1], BLOCK):
            b1 = min(b0 + BLOCK, w.shape[1])
            q[:, b0:b1], err = round_block_triton(w[:, b0:b1], scale[:, b0:b1], offset[:, b0:b1], hinv[b0:b1, b0:b1])
            w[:, b1:] -= err @ hinv[b0:b1, b1:]
        return q
    wt, st, ot = w.t().contiguous(), scale.t().contiguous(), offset.t().contiguous()
    k = wt.shape[0]
    q = torch.empty_like(wt)
    for b0 in range(0, k, BLOCK):
        b1 = min(b0 + BLOCK, k)
        w1, hinv1 = wt[b0:b1], hinv[b0:b1, b0:b1]
        err = torch.empty_like(w1)
        for i in range(b1 - b0):
            s, o = st[b0 + i], ot[b0 + i]
            code = torch.round((w1[i] - o) / s).clamp_(0, 15)
            q[b0 + i] = code
            e = (w1[i] - (code * s + o)) / hinv1[i, i]
            w1[i:].addr_(hinv1[i, i:], e, alpha=-1.0)
            err[i] = e
        wt[b1:] -= hinv[b0:b1, b1:].t() @ err
    return q.t()


def _refit(w: torch.Tensor, h: torch.Tensor, q: torch.Tensor, group_size: int, symmetric: bool, dtype: torch.dtype,
           previous: tuple, rows: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """The scales and offsets [N, groups] that minimise (w - deq)^T H (w - deq) per row for fixed codes q (a
    linear least-squares problem in the 2 (symmetric: 1) parameters per group), rounded to `dtype`; a row whose
    solution is not finite keeps its `previous` (scales, offsets)."""
    n, k = w.shape
    bounds = [(a, min(a + group_size, k)) for a in range(0, k, group_size)]
    groups, per = len(bounds), 1 if symmetric else 2
    onehot = torch.nn.functional.one_hot(torch.arange(k, device=w.device) // group_size, groups).float()  # [K, G]
    scales, offsets = (t.clone() for t in previous)
    h_ones = h @ onehot  # [K, groups]: H times each group's indicator (the offsets' basis vectors)
    for r0 in range(0, n, rows):  # rows at a time: H times the basis is [rows, K, per * groups]
        qc = q[r0:r0 + rows] - (8.0 if symmetric else 0.0)
        hq = torch.stack([qc[:, a:b] @ h[a:b] for a, b in bounds], dim=2)  # H times each group's codes
        hb = hq if symmetric else torch.cat((hq, h_ones[None].expand(qc.shape[0], -1, -1)), dim=2)
        # basis^T H basis: a basis vector is a group's codes (scale) or its indicator (offset), zero elsewhere
        gram = torch.einsum("nk,nkd,kg->ngd", qc, hb, onehot)
        if not symmetric:
            gram = torch.cat((gram, torch.einsum("nkd,kg->ngd", hb, onehot)), dim=1)
        rhs = torch.einsum("nkc,nk->nc", hb, w[r0:r0 + rows])
        ridge = 1e-9 * gram.diagonal(dim1=1, dim2=2).mean(dim=1) + 1e-30  # keeps a degenerate group solvable
        eye = torch.eye(per * groups, device=w.device)[None] * ridge[:, None, None]
        theta = torch.linalg.solve(gram + eye, rhs)
        ok = torch.isfinite(theta).all(dim=1)[:, None]
        s = theta[:, :groups].clamp(min=1e-8) if symmetric else theta[:, :groups]
        scales[r0:r0 + rows] = torch.where(ok, s, scales[r0:r0 + rows])
        offsets[r0:r0 + rows] = torch.where(ok, -8.0 * s if symmetric else theta[:, groups:], offsets[r0:r0 + rows])
    return scales.to(dtype).float(), offsets.to(dtype).float()


@torch.no_grad()
def gptq_model(model, windows: torch.Tensor, group_size: int, symmetric: bool, dtype: torch.dtype,
               show_progress: bool = True) -> dict:
    """GPTQ for every linear of the decoder layers of a float model (tuili's classes on torch ops, as
    tuili.compress.common.load_float_model makes it), calibrated on `windows` [B, L] of token ids. Returns
    {module: (qweight, scales, offsets, group_size)} for quantize_model; the model's float weights are left
    holding the quantized values (dequantized), as the next layers' calibration saw them."""
    from tqdm import tqdm

    from tuili.compress.common import attention_context
    from tuili.layers.linear import Linear
    from tuili.ops.quant_matmul import dequantize_int4

    b, length = windows.shape
    x = model.embed_tokens(windows.flatten()).float()
    positions = torch.arange(length, device=windows.device).repeat(b)
    residual = None
    results = {}
    with attention_context(b, length, windows.device):
        for layer in tqdm(model.layers, desc="GPTQ", unit="layer", disable=not show_progress):
            linears = [m for m in layer.modules() if isinstance(m, Linear)]
            hessians = {m: torch.zeros(m.weight.shape[1], m.weight.shape[1], device=x.device) for m in linears}

            def accumulate(module, args):
                inputs = args[0].reshape(-1, args[0].shape[-1]).float()
                hessians[module].addmm_(inputs.t(), inputs)

            hooks = [m.register_forward_pre_hook(accumulate) for m in linears]
            try:
                layer(positions, x, residual)
            finally:
                for hook in hooks:
                    hook.remove()
            for m in linears:
                qweight, scales, offsets = gptq_quantize(m.weight, hessians[m], group_size, symmetric, dtype)
                results[m] = (qweight, scales, offsets, group_size)
                m.weight.copy_(dequantize_int4(qweight, scales, offsets, group_size))
            x, residual = layer(positions, x, residual)  # the next layer's inputs, through the quantized ones
    return results


