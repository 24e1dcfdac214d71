"""End-to-end tuning of a quantized model's scales and offsets (`tuili quantize --tune-steps N`).

Rounding (to nearest or GPTQ) fixes each weight's code by a per-layer objective. Here the codes stay fixed and the
quantization parameters, every group's scale and offset and the INT8 head's channel scales, are trained together
by Adam to make the whole quantized model's next-token distributions match the float model's on calibration text
(KL divergence, the float model's log-probabilities computed once beforehand). This is the end-to-end step of
EfficientQAT (E2E-QP): it corrects what per-layer objectives cannot see, how the layers' errors add up. The result
has exactly the format the kernels read: nothing changes at run time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LR = 1e-3  # Adam's (cosine-decayed to 0) on the relative change of each scale and of each offset in scale units
BATCH = 2  # calibration windows per step


@torch.no_grad()
def teacher_logprobs(model, windows: torch.Tensor) -> torch.Tensor:
    """The float model's log-probabilities [B, L, vocab] of a batch of windows [B, L], one window at a time; kept
    in fp16 (8x finer than bf16 at a log-probability of -6, and -65504 is far below any the model gives)."""
    from tuili.compress.common import forward

    return torch.cat([F.log_softmax(model.compute_logits(forward(model, w[None])[0]).float(), -1)
                      .to(torch.float16)[None] for w in windows])


def tune_model(model, qc, done: dict, windows: torch.Tensor, teacher: torch.Tensor, steps: int,
               dtype: torch.dtype = torch.bfloat16, lr: float = LR, seed: int = 0, show_progress: bool = True) -> dict:
    """Tune the scales and offsets of every linear quantize_model covers (`done`: packed weights made already,
    e.g. by GPTQ; the others are rounded to nearest here) for `steps` steps of BATCH random calibration windows
    against `teacher` (teacher_logprobs of the same windows). Returns the full {module: set_quantized's
    arguments} with the tuned scales and offsets in `dtype` (the one the model will run in); the codes do not
    change."""
    from tqdm import tqdm

    from tuili.compress.common import forward
    from tuili.quant.model import quantize_weight, quantized_linears

    if steps < 1:
        raise ValueError(f"tuning needs at least one step, got {steps}")
    if teacher.shape[:2] != windows.shape:
        raise ValueError(f"teacher log-probabilities {tuple(teacher.shape)} do not match the windows "
                         f"{tuple(windows.shape)}")
    for p in model.parameters():
        p.requires_grad_(False)
    layers = []
    for m in quantized_linears(model):
        qweight, scales, offsets, group = done.get(m) or quantize_weight(m.weight, qc.for_module(model, m))
        layers.append(_Tunable(m, qweight, scales, offsets, group))
    params = [p for layer in layers for p in layer.params]
    opt = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    progress = tqdm(range(steps), desc="tuning scales", unit="step", disable=not show_progress)
    try:
        for _ in progress:
            idx = torch.randperm(len(windows), generator=gen)[:BATCH].to(windows.device)
            for layer in layers:
                layer.materialize()
            logprobs = F.log_softmax(model.compute_logits(forward(model, windows[idx]).flatten(0, 1)).float(), -1)
            loss = F.kl_div(logprobs, teacher[idx].flatten(0, 1).float(), log_target=True, reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            progress.set_postfix(kl=f"{loss.item():.4f}")
    finally:
        for layer in layers:
            layer.restore()
    return {layer.module: layer.result(dtype) for layer in layers}


class _Tunable:
    """One quantized linear while tuning: its codes (bytes), its scales and offsets as s0 * (1 + a) and
    o0 + s0 * b with a, b trained (zero at the start: the rounding's own parameters). While tuning, the module's
    forward is _DequantLinear's: its float weight is made in the forward and again in the backward, never kept,
    so that memory holds one layer's float weight at a time, not the model's (an 8B model tunes on one GPU)."""

    def __init__(self, module, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                 group: int) -> None:
        from tuili.ops.quant_matmul import unpack_int4

        self.module, self.qweight, self.group = module, qweight, group
        n, k = module.weight.shape
        self.k = k
        int4 = qweight.dtype == torch.uint8
        codes = unpack_int4(qweight) if int4 else qweight
        groups = scales.shape[1] if scales.dim() == 2 else 1
        size = group or k
        self.codes = F.pad(codes, (0, groups * size - k)).view(n, groups, size)
        self.s0 = scales.float().view(n, groups)
        self.o0 = None if offsets is None else offsets.float().view(n, groups)
        self.code_offset = 8.0 if int4 and offsets is None else 0.0  # symmetric INT4: the offset is -8 * scale
        self.a = torch.zeros_like(self.s0, requires_grad=True)
        self.b = None if self.o0 is None else torch.zeros_like(self.s0, requires_grad=True)
        self.params = [self.a] + ([self.b] if self.b is not None else [])

    def scales_offsets(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        s = self.s0 * (1 + self.a)
        return s, None if self.o0 is None else self.o0 + self.s0 * self.b

    def materialize(self) -> None:
        """Route the module's forward through this step's scales and offsets."""
        s, o = self.scales_offsets()
        bias = self.module.bias

        def forward(x: torch.Tensor) -> torch.Tensor:
            y = _DequantLinear.apply(x, self.codes, s, o, self.k, self.code_offset)
            return y if bias is None else y + bias

        self.module.forward = forward

    def restore(self) -> None:
        self.module.__dict__.pop("forward", None)

    @torch.no_grad()
    def result(self, dtype: torch.dtype) -> tuple:
        s, o = self.scales_offsets()
        shape = (-1,) if not self.group else s.shape
        return (self.qweight, s.to(dtype).reshape(shape), None if o is None else o.to(dtype).reshape(shape),
                self.group)


def _dequantize(codes: torch.Tensor, s: torch.Tensor, o: torch.Tensor | None, k: int,
                code_offset: float) -> torch.Tensor:
    """[N, groups, size] codes, [N, groups] scales and offsets (or None) -> the float weight [N, k]."""
    w = (codes.float() - code_offset) * s[..., None]
    if o is not None:
        w = w + o[..., None]
    return w.flatten(1)[:, :k]


class _DequantLinear(torch.autograd.Function):
    """y = x W^T with W = (codes - code_offset) * s + o per group, differentiable in x, s and o; W is made again
    in the backward instead of being saved."""

    @staticmethod
    def forward(ctx, x, codes, s, o, k, code_offset):
        ctx.save_for_backward(x, codes, s, o)
        ctx.k, ctx.code_offset = k, code_offset
        return F.linear(x, _dequantize(codes, s, o, k, code_offset))

    @staticmethod
    def backward(ctx, grad):
        x, codes, s, o = ctx.saved_tensors
        n, groups, size = codes.shape
        grad_x = grad @ _dequantize(codes, s, o, ctx.k, ctx.code_offset)
        grad_w = grad.reshape(-1, n).t() @ x.reshape(-1, x.shape[-1])  # [N, k]
        grad_w = F.pad(grad_w, (0, groups * size - ctx.k)).view(n, groups, size)
        grad_s = (grad_w * (codes.float() - ctx.code_offset)).sum(-1)
        grad_o = None if o is None else grad_w.sum(-1)
        return grad_x, None, grad_s, grad_o, None, None
