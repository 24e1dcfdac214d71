"""Linear layers, plain and fused (QKV, gate/up), whose parameters load checkpoint shards themselves."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tuili.ops import cpu_kernels, quant_matmul


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"weight shape mismatch: model has {tuple(param.shape)}, checkpoint {tuple(loaded.shape)}")
    param.data.copy_(loaded)


class Linear(nn.Module):
    """y = x W^T (+ b)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = default_weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = default_weight_loader
        self.qweight = self.scales = self.offsets = None
        self.group_size = 0
        self._triton = False
        self._cpu_int4 = self._cpu_int8 = self._cpu_dense = self._cpu_gemv = None

    def set_quantized(self, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None = None,
                      group_size: int = 0) -> None:
        """Replace the float weight by packed weights (formats: tuili/ops/quant_matmul.py): INT8 per output
        channel (qweight int8 [N, K], scales [N]) or per group (scales [N, groups]), or INT4 per group (qweight
        uint8 [N, K/2], scales and offsets [N, groups])."""
        self.weight = None
        self.qweight = nn.Parameter(qweight, requires_grad=False)
        layout = quant_matmul.group_major if group_size else (lambda t: t)
        self.scales = nn.Parameter(layout(scales), requires_grad=False)
        self.offsets = None if offsets is None else nn.Parameter(layout(offsets), requires_grad=False)
        self.group_size = group_size
        self._cpu_int4 = self._cpu_int8 = self._cpu_dense = self._cpu_gemv = None

    def use_triton(self, enabled: bool) -> None:
        """Quantized layers on CUDA: the dequant-fused Triton matmul (else the torch reference)."""
        self._triton = enabled

    def cpu_int4(self) -> tuple:
        """This INT4 layer in the layout of torch's packed CPU kernel ((packed, scales_and_offsets), or () where
        torch lacks it), made on first use: a saved checkpoint fills qweight after set_quantized."""
        if self._cpu_int4 is None:
            self._cpu_int4 = quant_matmul.int4_cpu_pack(self.qweight, self.scales, self.offsets, self.group_size) or ()
        return self._cpu_int4

    def cpu_gemv(self) -> tuple:
        """This INT4 layer in the layout of tuili's own CPU kernel (cpu_kernels.pack_int4), or () where that
        kernel does not run here or does not take the shape; made on first use."""
        if self._cpu_gemv is None:
            ok = self.qweight.device.type == "cpu" and cpu_kernels.available()
            packed = ok and cpu_kernels.pack_int4(self.qweight, self.scales, self.offsets, self.group_size)
            self._cpu_gemv = packed or ()
        return self._cpu_gemv

    def cpu_int8(self) -> tuple:
        """An INT8-groups layer (GGUF Q8_0, Q6_K) for tuili's CPU kernel (int8_gemv): (qweight, the scales
        row-major), or () where that kernel does not run here or does not take the shape or dtype (bf16 / fp32
        scales, x in theirs); made on first use."""
        if self._cpu_int8 is None:
            n, k = self.qweight.shape
            ok = self.qweight.device.type == "cpu" and self.group_size in (16, 32) and k % 32 == 0 \
                and self.scales.shape == (n, k // self.group_size) \
                and self.scales.dtype in (torch.bfloat16, torch.float32) and cpu_kernels.available()
            self._cpu_int8 = (self.qweight.contiguous(), self.scales.contiguous()) if ok else ()
        return self._cpu_int8

    def cpu_dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The float copy of an INT8-groups layer that the CPU multiplies with where tuili's kernel does not run
        (not x86-64 with AVX2; torch has no kernel for it)."""
        if self._cpu_dense is None or self._cpu_dense.dtype != dtype:
            self._cpu_dense = quant_matmul.dequantize_int8(self.qweight, self.scales, self.group_size, dtype)
        return self._cpu_dense

    def _quantized_forward(self, x: torch.Tensor) -> torch.Tensor:
        qweight, int8 = self.qweight, self.qweight.dtype == torch.int8
        if qweight.is_cuda and self._triton:
            return quant_matmul.quant_linear_triton(x, qweight, self.scales, self.offsets, self.group_size, self.bias)
        if qweight.device.type == "cpu":  # torch's packed CPU kernels (int8: decode-sized batches only)
            if int8 and not self.group_size and hasattr(torch, "_weight_int8pack_mm"):
                return quant_matmul.int8_linear_cpu(x, qweight, self.scales, self.bias)
            if int8 and (packed8 := self.cpu_int8()) and x.dtype == self.scales.dtype:  # INT8 groups (Q8_0, Q6_K)
                w, s = packed8
                out = cpu_kernels.int8_gemv(x.contiguous(), w, s) if x.shape[0] <= cpu_kernels.INT8_ROWS \
                    else cpu_kernels.int8_dense(x, w, s)
                return out if self.bias is None else out + self.bias
            if int8:  # INT8 groups where tuili's kernel does not run: a float copy, made once
                return cpu_kernels.dense_linear(x, self.cpu_dense(x.dtype), self.bias)
            # tuili's kernel where x has the dtype the layer packs to (fp32 scales: fp32, else bf16)
            packed = torch.float32 if self.scales.dtype == torch.float32 else torch.bfloat16
            rows = cpu_kernels.GEMV_ROWS if x.dtype == torch.bfloat16 else cpu_kernels.GEMV_ROWS_F32
            if x.dtype == packed and x.shape[0] <= rows and self.cpu_gemv():
                out = cpu_kernels.int4_gemv(x.contiguous(), self._cpu_gemv, self.group_size)
                return out if self.bias is None else out + self.bias
            if x.dtype == packed == torch.bfloat16 and x.shape[0] > cpu_kernels.DENSE_ROWS and self.cpu_gemv():
                out = cpu_kernels.int4_dense(x, self._cpu_gemv, self.group_size)
                return out if self.bias is None else out + self.bias
            # bf16: the kernel wins at any row count; fp32 (a much slower path of it): for one row only
            if self.cpu_int4() and x.dtype == self.scales.dtype and (x.shape[0] == 1 or x.dtype == torch.bfloat16):
                return quant_matmul.int4_linear_cpu(x, *self._cpu_int4, self.group_size, self.bias)
        if int8:
            return quant_matmul.int8_linear(x, qweight, self.scales, self.bias, self.group_size)
        return quant_matmul.int4_linear(x, qweight, self.scales, self.offsets, self.group_size, self.bias)

    def forward_gated(self, x: torch.Tensor, act) -> torch.Tensor:
        """self(act(x)) for a gated MLP's down projection (act: silu_and_mul): a quantized layer on CUDA computes
        the activation inside its GEMV as it loads x (one kernel fewer per layer)."""
        if self.qweight is not None and self.qweight.is_cuda and self._triton:
            return self.forward_fused(x, silu_mul=True)
        return self(act(x))

    def forward_fused(self, x: torch.Tensor, silu_mul: bool = False, norm: tuple | None = None,
                      residual: torch.Tensor | None = None, next_norm: nn.Module | None = None):
        """A quantized layer's GEMV with a decoder layer's residual add and RMSNorm inside (quant_linear_triton's
        norm= and residual=): residual (h) with next_norm (an RMSNorm) returns (h, h * next_norm.weight, sums of
        squares); norm=(RMSNorm, sums of squares) takes such an h * weight as x."""
        return quant_matmul.quant_linear_triton(
            x, self.qweight, self.scales, self.offsets, self.group_size, self.bias, silu_mul=silu_mul,
            norm=None if norm is None else (norm[0].eps, norm[1]), residual=residual,
            norm_weight=None if next_norm is None else next_norm.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gemv = self._cpu_gemv
        if gemv and x.dtype == torch.bfloat16 == gemv[1].dtype and self.bias is None and x.is_contiguous():
            if x.shape[0] <= cpu_kernels.GEMV_ROWS:  # as directly as it goes, as below
                return torch.ops.tuili.int4_gemv(x, *gemv, self.group_size)
            if x.shape[0] > cpu_kernels.DENSE_ROWS:
                return cpu_kernels.int4_dense(x, gemv, self.group_size)
        fast = self._cpu_int4
        if fast and x.dtype == fast[1].dtype and x.dtype == torch.bfloat16 and self.bias is None \
                and fast[1].shape[0] * self.group_size == x.shape[1] and x.is_contiguous():
            # the CPU INT4 kernel as directly as it goes: per-call Python here is a good part of a CPU step
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, fast[0], self.group_size, fast[1])
        if self.qweight is not None:
            return self._quantized_forward(x)
        if x.device.type == "cpu":
            return cpu_kernels.dense_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several linears with the same input fused into one matmul; checkpoint shards load into their rows.

    `shard_sizes` maps each shard id (e.g. "q", "k", "v" or 0, 1 for gate/up) to its output size, in order.
    """

    def __init__(self, in_features: int, shard_sizes: dict, bias: bool = False) -> None:
        super().__init__(in_features, sum(shard_sizes.values()), bias)
        self.shards, offset = {}, 0
        for shard_id, size in shard_sizes.items():
            self.shards[shard_id] = (offset, size)
            offset += size
        self.weight.weight_loader = self._load_shard
        if self.bias is not None:
            self.bias.weight_loader = self._load_shard

    def _load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard_id) -> None:
        offset, size = self.shards[shard_id]
        default_weight_loader(nn.Parameter(param.data.narrow(0, offset, size), requires_grad=False), loaded)
