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
    """One quantized linear while tuning: its codes as floats, its scales and offsets as s0 * (1 + a) and
    o0 + s0 * b with a, b trained (zero at the start: the rounding's own parameters)."""

    def __init__(self, module, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                 group: int) -> None:
        from tuili.ops.quant_matmul import unpack_int4

        self.module, self.qweight, self.group = module, qweight, group
        self.weight = module.weight
        n, k = module.weight.shape
        self.k = k
        int4 = qweight.dtype == torch.uint8
        codes = (unpack_int4(qweight) if int4 else qweight).float()
        groups = scales.shape[1] if scales.dim() == 2 else 1
        size = group or k
        self.codes = F.pad(codes, (0, groups * size - k)).view(n, groups, size)
        self.s0 = scales.float().view(n, groups)
        self.o0 = None if offsets is None else offsets.float().view(n, groups)
        self.symmetric_int4 = int4 and offsets is None  # symmetric INT4: the offset is -8 * scale
        self.a = torch.zeros_like(self.s0, requires_grad=True)
        self.b = None if self.o0 is None else torch.zeros_like(self.s0, requires_grad=True)
        self.params = [self.a] + ([self.b] if self.b is not None else [])

    def scales_offsets(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        s = self.s0 * (1 + self.a)
        return s, None if self.o0 is None else self.o0 + self.s0 * self.b

    def materialize(self) -> None:
        s, o = self.scales_offsets()
        w = self.codes * s[..., None]
        if o is not None:
            w = w + o[..., None]
        elif self.symmetric_int4:
            w = w - 8.0 * s[..., None]
        del self.module.weight
        self.module.weight = w.flatten(1)[:, :self.k]

    def restore(self) -> None:
        del self.module.weight
        self.module.weight = self.weight

    @torch.no_grad()
    def result(self, dtype: torch.dtype) -> tuple:
        s, o = self.scales_offsets()
        shape = (-1,) if not self.group else s.shape
        return (self.qweight, s.to(dtype).reshape(shape), None if o is None else o.to(dtype).reshape(shape),
                self.group)
