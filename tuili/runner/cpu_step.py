"""The CPU's counterpart of CUDA graphs: a step of one sequence (a decode, a verification, a short prompt) through
every layer as one TorchScript function.

On the CPU a small model's step is mostly per-op overhead, not arithmetic: for the default model (30 layers,
hidden 576) the packed matmuls take ~3 ms of a ~8 ms eager step, and the rest is Python, module calls and
dispatch around ~60 small ops per layer. TorchScript's interpreter runs the same ops without the Python around
them. The function below does exactly what the eager layers do, through the same norm, RoPE and attention
functions, which TorchScript compiles along (the tests compare the two bit for bit); whatever it does not
cover (batches of several sequences, longer chunks, a quantized KV cache, a layer format without a CPU kernel)
runs eagerly as before.

A decode step (one new token for each of up to NATIVE_BATCH sequences) of a quantized bf16 Llama-type model goes
further where tuili's CPU kernels build (ops/cpu_kernels.py): the same computation as one C++ call,
`decode_step`, with no interpreter and no torch op per norm, rotation or add at all (the tests compare it with
the eager layers within bf16 roundings, and its generations with theirs).
"""
from __future__ import annotations

import logging
import warnings
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from tuili.ops import cpu_kernels
from tuili.ops.attention import MAX_ONE_SEQUENCE_QUERY, attend_one_cpu
from tuili.ops.attention_metadata import AttentionMetadata
from tuili.ops.rmsnorm import rms_norm
from tuili.ops.rope import rotate_rows

logger = logging.getLogger(__name__)

# how a linear runs: F.linear, torch's packed int4 / int8 CPU kernels, tuili's (cpu_kernels) for up to GEMV_ROWS
# (GEMV4), the step's rows (GEMV8: per channel, or groups of `group` 16 or 32 inputs; a step here has at most
# MAX_ONE_SEQUENCE_QUERY <= INT8_ROWS rows) or FLOAT_ROWS (GEMV16: bf16 weights; its `group` holds that row count)
FLOAT, INT4, INT8, GEMV4, GEMV8, GEMV16 = 0, 1, 2, 3, 4, 5
NATIVE_BATCH = 8  # decode steps of up to this many sequences go through the C++ step (16: no faster than eager)
assert max(MAX_ONE_SEQUENCE_QUERY, NATIVE_BATCH) <= cpu_kernels.INT8_ROWS  # GEMV8 with groups: the kernel at any step


def _linear(x: Tensor, kind: int, w: Tensor, s: Tensor, b: Optional[Tensor], group: int) -> Tensor:
    if kind == 0 or (kind == 5 and x.size(0) > group):  # GEMV16 beyond its rows (`group`): as FLOAT
        return F.linear(x, w, b)
    if kind == 3:
        y = torch.ops.tuili.int4_gemv(x, w, s, group)
    elif kind == 4:
        y = torch.ops.tuili.int8_gemv(x, w, s)
    elif kind == 5:  # as dense_linear: tuili's GEMV up to `group` (cpu_kernels.FLOAT_ROWS) rows
        y = torch.ops.tuili.bf16_gemv(x.contiguous(), w)
    elif kind == 1:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, group, s)
    else:
        y = torch.ops.aten._weight_int8pack_mm(x, w, s)
    if b is not None:
        y = y + b
    return y


def _forward(x: Tensor, cos2: Tensor, sin2: Tensor, slots: Tensor, block_table: Tensor, length: int,
             tensors: List[List[Tensor]], biases: List[List[Optional[Tensor]]], kinds: List[List[int]],
             groups: List[List[int]], final_norm: Tensor, eps: float, num_heads: int, num_kv_heads: int,
             scale: float, qk_norm: bool) -> Tensor:
    """LlamaForCausalLM.forward after the embedding, for one sequence's new tokens x [T, hidden], through the
    eager path's own functions (TorchScript compiles them along).
    tensors[i] = [input norm, qkv w, qkv s, o w, o s, post norm, gate_up w, gate_up s, down w, down s, k cache,
    v cache, q norm, k norm]; biases[i], kinds[i], groups[i]: per linear (qkv, o, gate_up, down)."""
    residual: Optional[Tensor] = None
    for i in range(len(tensors)):
        t, b, kind, group = tensors[i], biases[i], kinds[i], groups[i]
        if residual is None:
            residual = x
            h = rms_norm(x, t[0], eps)
        else:
            residual = x + residual
            h = rms_norm(residual, t[0], eps)
        qkv = _linear(h, kind[0], t[1], t[2], b[0], group[0])
        k_cache, v_cache = t[10], t[11]
        d = k_cache.shape[3]
        q_size, kv_size = num_heads * d, num_kv_heads * d
        if qk_norm:
            q = rotate_rows(rms_norm(qkv[:, :q_size].view(-1, num_heads, d), t[12], eps), cos2, sin2)
            k = rotate_rows(rms_norm(qkv[:, q_size:q_size + kv_size].view(-1, num_kv_heads, d), t[13], eps),
                        cos2, sin2)
        else:
            qk = rotate_rows(qkv[:, :q_size + kv_size].view(-1, num_heads + num_kv_heads, d), cos2, sin2)
            q, k = qk.split([num_heads, num_kv_heads], dim=1)
        v = qkv[:, q_size + kv_size:].view(-1, num_kv_heads, d)
        k_cache.view(-1, num_kv_heads, d).index_copy_(0, slots, k.to(k_cache.dtype))
        v_cache.view(-1, num_kv_heads, d).index_copy_(0, slots, v.to(v_cache.dtype))
        o = attend_one_cpu(q, k_cache, v_cache, length, block_table, scale, None, None)
        x = _linear(o.flatten(1), kind[1], t[3], t[4], b[1], group[1])
        residual = x + residual
        h = rms_norm(residual, t[5], eps)
        gate, up = _linear(h, kind[2], t[6], t[7], b[2], group[2]).chunk(2, dim=-1)
        x = _linear(F.silu(gate) * up, kind[3], t[8], t[9], b[3], group[3])
    assert residual is not None
    return rms_norm(x + residual, final_norm, eps)


_SCRIPTED = None


def _scripted():
    global _SCRIPTED
    if _SCRIPTED is None:
        cpu_kernels.available()  # torch.ops.tuili.* exist from here on (as placeholders where they cannot run)
        with warnings.catch_warnings():  # TorchScript is deprecated in favour of torch.compile, which on the CPU
            warnings.simplefilter("ignore")  # takes ~a minute per shape and was no faster here
            _SCRIPTED = torch.jit.script(_forward)
    return _SCRIPTED


def _linear_args(linear, dtype: torch.dtype, gemv: bool):
    """(kind, weight, scales, bias, group) as the eager Linear.forward runs it on the CPU for up to GEMV_ROWS rows
    (gemv; INT4) or up to MAX_ONE_SEQUENCE_QUERY, or None where that is not one of our kernels."""
    if linear.qweight is None:
        return _float_args(linear.weight, linear.bias, dtype)
    qweight, group = linear.qweight, linear.group_size
    if qweight.dtype == torch.int8 and not group and qweight.shape[1] % 32 == 0 and cpu_kernels.available():
        return GEMV8, qweight, linear.scales, linear.bias, 0  # as int8_linear_cpu: tuili's at any row count here
    if gemv and qweight.dtype == torch.uint8 and dtype == torch.bfloat16 and linear.cpu_gemv():
        return GEMV4, *linear.cpu_gemv(), linear.bias, group
    if qweight.dtype == torch.int8 and not group and hasattr(torch, "_weight_int8pack_mm"):
        return INT8, qweight, linear.scales, linear.bias, 0
    if qweight.dtype == torch.int8:  # INT8 groups (GGUF Q8_0, Q6_K): tuili's kernel, else the eager float copy
        if linear.cpu_int8() and dtype == linear.scales.dtype:
            return GEMV8, *linear.cpu_int8(), linear.bias, group
        return _float_args(linear.cpu_dense(dtype), linear.bias, dtype)
    packed = linear.cpu_int4()
    # the eager layer's kernel condition (bf16: any row count) and no padding of a short last group
    if packed and dtype == linear.scales.dtype == torch.bfloat16 and packed[1].shape[0] * group == 2 * qweight.shape[1]:
        return INT4, packed[0], packed[1], linear.bias, group
    return None


def _float_args(weight: Tensor, bias: Optional[Tensor], dtype: torch.dtype):
    """A float layer: GEMV16 (tuili's bf16 GEMV up to FLOAT_ROWS rows, as the eager layer's dense_linear) for bf16
    weights and x where the kernel runs, else F.linear."""
    if weight.dtype == dtype == torch.bfloat16 and weight.shape[1] % 16 == 0 and weight.is_contiguous() \
            and cpu_kernels.available():
        return GEMV16, weight, torch.empty(0), bias, cpu_kernels.FLOAT_ROWS
    return FLOAT, weight, torch.empty(0), bias, 0


class CpuStep:
    """Runs one sequence's step through the scripted function, or a decode step of up to NATIVE_BATCH sequences
    through the C++ one, where it covers the model (`build`)."""

    def __init__(self, model, fn, args: dict) -> None:
        self.model, self.fn = model, fn
        self.args = args  # {True: the function's per-layer arguments for up to GEMV_ROWS rows, False: for more}
        attn = model.layers[0].self_attn
        tensors, biases, kinds, groups = args[True]
        # decode steps (one new token per sequence): the whole step as one C++ call (cpu_kernels.decode_step) where
        # it covers the model
        native = attn.q_norm is None and all(b is None for bs in biases for b in bs) and \
            all(k in (GEMV4, GEMV8, GEMV16) for ks in kinds for k in ks) and model.norm.weight.dtype == torch.bfloat16
        self.native = ([u for t in tensors for u in t[:12]], [k for ks in kinds for k in ks],
                       [g for gs in groups for g in gs]) if native else None
        self.consts = (model.norm.weight, model.norm.eps, attn.num_heads, attn.num_kv_heads, attn.attn.scale,
                       attn.q_norm is not None)
        self._rope_tables: dict[torch.dtype, tuple[Tensor, Tensor]] = {}

    @classmethod
    def build(cls, model, dtype: torch.dtype) -> "CpuStep | None":
        """After the KV cache exists; None (and the reason logged) where some layer needs the eager path."""
        args = {gemv: ([], [], [], []) for gemv in (True, False)}  # (tensors, biases, kinds, groups) per variant
        for i, layer in enumerate(model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            if attn.attn.k_scale is not None or attn.attn.k_cache.dtype != dtype:
                logger.info("CPU steps run eagerly: the KV cache is quantized")
                return None
            qk_norm = (attn.q_norm.weight, attn.k_norm.weight) if attn.q_norm is not None else \
                (layer.input_layernorm.weight,) * 2  # placeholders
            for gemv, (tensors, biases, kinds, groups) in args.items():
                linears = [_linear_args(m, dtype, gemv) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj,
                                                                  mlp.down_proj)]
                if None in linears:
                    logger.info("CPU steps run eagerly: layer %d has a weight format without a CPU kernel at %s",
                                i, dtype)
                    return None
                tensors.append([layer.input_layernorm.weight, *linears[0][1:3], *linears[1][1:3],
                                layer.post_attention_layernorm.weight, *linears[2][1:3], *linears[3][1:3],
                                attn.attn.k_cache, attn.attn.v_cache, *qk_norm])
                biases.append([a[3] for a in linears])
                kinds.append([a[0] for a in linears])
                groups.append([a[4] for a in linears])
        try:
            fn = _scripted()
        except Exception as e:  # noqa: BLE001 - a torch without (working) TorchScript: the eager path still works
            logger.warning("CPU steps run eagerly: TorchScript failed here (%s)", e)
            return None
        return cls(model, fn, args)

    def handles(self, meta: AttentionMetadata) -> bool:
        return (len(meta.query_lens_cpu) == 1 and meta.max_query_len <= MAX_ONE_SEQUENCE_QUERY) or self._native(meta)

    def _native(self, meta: AttentionMetadata) -> bool:
        """A decode step of up to NATIVE_BATCH sequences (one new token each) where the C++ step covers the model."""
        return self.native is not None and meta.is_pure_decode and len(meta.query_lens_cpu) <= NATIVE_BATCH

    def _rope_rows(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """rope.rope_rows' factors, indexed from full-width tables in `dtype` made once (the same values: the
        conversion is elementwise), two ops per step instead of eight (~0.1 ms of a ~13 ms step)."""
        if dtype not in self._rope_tables:  # [positions, 1, D]
            rotary = self.model.layers[0].self_attn.rotary
            c, s = rotary.cos[:, None, :], rotary.sin[:, None, :]
            self._rope_tables[dtype] = torch.cat((c, c), -1).to(dtype), torch.cat((-s, s), -1).to(dtype)
        cos2, sin2 = self._rope_tables[dtype]
        return cos2.index_select(0, positions), sin2.index_select(0, positions)

    def run(self, input_ids: Tensor, positions: Tensor, meta: AttentionMetadata, native: bool = True) -> Tensor:
        """The step's hidden states after the final norm; native=False: through the scripted function only (one
        sequence)."""
        x = self.model.embed_tokens(input_ids)
        cos2, sin2 = self._rope_rows(positions, x.dtype)
        norm, eps, num_heads, num_kv_heads, scale, qk_norm = self.consts
        if native and self._native(meta):
            return torch.ops.tuili.decode_step(x, cos2, sin2, meta.slot_mapping, meta.block_tables, meta.seq_lens_cpu,
                                               *self.native, norm, eps, num_heads, num_kv_heads, scale)
        return self.fn(x, cos2, sin2, meta.slot_mapping, meta.block_tables[0], meta.seq_lens_cpu[0],
                       *self.args[x.shape[0] <= cpu_kernels.GEMV_ROWS], norm, eps, num_heads, num_kv_heads, scale,
                       qk_norm)
