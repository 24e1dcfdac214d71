"""GGUF quantized blocks kept packed: each block type transcoded, without a float copy, into the packed format
tuili's kernels read (tuili/ops/quant_matmul.py).

  Q8_0  32 x int8, scale d               w = d * q                    -> INT8, groups of 32
  Q6_K  256: 16 x (16 x 6-bit), int8 sc  w = d * sc_j * (q - 32)      -> INT8, groups of 16
  Q4_0  32 x 4-bit, scale d              w = d * q - 8 d              -> INT4, groups of 32, symmetric
  Q4_1  32 x 4-bit, d, m                 w = d * q + m                -> INT4, groups of 32, offsets
  Q4_K  256: 8 x (32 x 4-bit), 6-bit sc/m w = d sc_j * q - dmin m_j   -> INT4, groups of 32, offsets

Each is exact: the integers are copied, the scales (and offsets) are products of the block's fp16 factors,
rounded once to the model's dtype (fp32: exact; bf16 keeps 8 of the fp16 factors' 11 significant bits). Layers
that llama.cpp stores separately and tuili fuses (q/k/v, gate/up) need one format for all their shards: Q4_0
with Q4_1/Q4_K shards takes explicit offsets (exact); shards of different bit widths (Q4_K_M's q/k in Q4_K with
v in Q6_K) go to INT8 groups of 16: exactly for Q8_0, Q6_K and Q4_0 (q - 8), by requantizing the dequantized
values for Q4_1 and Q4_K (an error below half an INT8 step of each 16 weights).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class PackedFormat:
    bits: int            # 8 or 4
    group_size: int      # inputs per scale (0: one per output channel, INT8 only)
    offsets: bool        # INT4: offsets stored (else symmetric: offset -8 * scale)

    def __str__(self) -> str:
        kind = "per channel" if not self.group_size else f"g{self.group_size}"
        return f"int{self.bits} {kind}" + (" offsets" if self.offsets else "")


NATIVE = {
    "Q8_0": PackedFormat(8, 32, False), "Q6_K": PackedFormat(8, 16, False),
    "Q4_0": PackedFormat(4, 32, False), "Q4_1": PackedFormat(4, 32, True), "Q4_K": PackedFormat(4, 32, True),
}
MIXED = PackedFormat(8, 16, False)


def common_format(formats: list[PackedFormat]) -> PackedFormat:
    """One format for the shards of a fused layer."""
    if len(set(formats)) == 1:
        return formats[0]
    if all(f.bits == 4 and f.group_size == 32 for f in formats):
        return PackedFormat(4, 32, True)
    return MIXED


def _f16(raw: np.ndarray) -> np.ndarray:
    """Little-endian fp16 bytes ([..., 2] uint8) -> float32 [...]."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """[N, K] values 0..15 -> [N, K/2] uint8, k = 2j in the low nibble of byte j (tuili's INT4 layout)."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)


def _unpack(raw: np.ndarray, qtype: str, n: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Raw blocks ([N, bytes per row] uint8) -> (q [N, K] integers, scales [N, groups], offsets or None), fp32."""
    if qtype == "Q8_0":
        b = raw.reshape(n, k // 32, 34)
        return b[..., 2:].view(np.int8).reshape(n, k), _f16(b[..., 0:2]), None
    if qtype in ("Q4_0", "Q4_1"):
        head = 2 if qtype == "Q4_0" else 4
        b = raw.reshape(n, k // 32, head + 16)
        qs = b[..., head:]                                          # element j: low nibble, j + 16: high
        q = np.concatenate((qs & 15, qs >> 4), axis=-1).reshape(n, k)
        d = _f16(b[..., 0:2])
        return q, d, (None if qtype == "Q4_0" else _f16(b[..., 2:4]))
    if qtype == "Q4_K":
        b = raw.reshape(n, k // 256, 144)
        d, dmin, sc_raw, qs = _f16(b[..., 0:2]), _f16(b[..., 2:4]), b[..., 4:16].astype(np.uint8), b[..., 16:]
        sc = np.empty((*sc_raw.shape[:2], 8), dtype=np.float32)
        m = np.empty_like(sc)
        sc[..., :4], m[..., :4] = sc_raw[..., 0:4] & 63, sc_raw[..., 4:8] & 63
        sc[..., 4:] = (sc_raw[..., 8:12] & 15) | ((sc_raw[..., 0:4] >> 6) << 4)
        m[..., 4:] = (sc_raw[..., 8:12] >> 4) | ((sc_raw[..., 4:8] >> 6) << 4)
        qs = qs.reshape(n, k // 256, 4, 1, 32)                      # 4 chunks of 64: low nibbles, then high
        q = np.concatenate((qs & 15, qs >> 4), axis=3).reshape(n, k)
        scales = (d[..., None] * sc).reshape(n, -1)
        return q, scales, (-(dmin[..., None] * m)).reshape(n, -1)
    if qtype == "Q6_K":
        b = raw.reshape(n, k // 256, 210)
        ql, qh = b[..., :128].reshape(n, -1, 2, 64), b[..., 128:192].reshape(n, -1, 2, 1, 32)
        sc, d = b[..., 192:208].view(np.int8).astype(np.float32), _f16(b[..., 208:210])
        # per half of 128: elements l, l+32, l+64, l+96 (l < 32) take ql's low nibbles of bytes l, l+32 and the
        # high nibbles of the same, each with 2 bits of qh[l] (bits 0-1, 2-3, 4-5, 6-7)
        low = np.concatenate((ql & 15, ql >> 4), axis=-1).reshape(n, -1, 2, 4, 32)
        high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 3
        q = (low | (high << 4)).astype(np.int16) - 32
        return q.reshape(n, k), (d[..., None] * sc).reshape(n, -1), None
    raise ValueError(f"GGUF type {qtype} has no packed form in tuili")


def transcode(raw: np.ndarray, qtype: str, n: int, k: int, fmt: PackedFormat, dtype: torch.dtype,
              permute=None) -> dict[str, torch.Tensor]:
    """A GGUF tensor's blocks -> {"qweight", "scales"[, "offsets"]} in `fmt` (scales in `dtype`). `permute` (rows
    -> rows, numpy) reorders output rows (llama.cpp's q/k interleaving)."""
    native = NATIVE[qtype]
    exact_int8 = fmt == MIXED and qtype in ("Q8_0", "Q4_0")  # groups of 32 -> 16: each scale twice
    if fmt == native or (qtype == "Q4_0" and fmt == PackedFormat(4, 32, True)) or exact_int8:
        q, scales, offsets = _unpack(raw, qtype, n, k)
        if fmt.offsets and offsets is None:
            offsets = -8.0 * scales
        if exact_int8:
            q = q.astype(np.int16) - (8 if qtype == "Q4_0" else 0)
            scales = np.repeat(scales, 2, axis=1)
        if permute is not None:
            q, scales = permute(q), permute(scales)
            offsets = None if offsets is None else permute(offsets)
        out = {"qweight": torch.from_numpy(_pack_nibbles(q) if fmt.bits == 4 else q.astype(np.int8)),
               "scales": torch.from_numpy(np.ascontiguousarray(scales)).to(dtype)}
        if offsets is not None:
            out["offsets"] = torch.from_numpy(np.ascontiguousarray(offsets)).to(dtype)
        return out
    # Q4_1 / Q4_K in a fused layer with 8-bit shards (common_format gives MIXED): requantize
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from tuili.quant.int8 import quantize_groupwise_int8

    assert fmt == MIXED, (qtype, fmt)
    w = dequantize(raw, GGMLQuantizationType[qtype]).reshape(n, k)
    w = torch.from_numpy(np.ascontiguousarray(permute(w) if permute is not None else w)).float()
    qweight, scales = quantize_groupwise_int8(w, fmt.group_size)
    return {"qweight": qweight, "scales": scales.to(dtype)}


# ---- writing K-quant blocks (the gguf package writes Q8_0/Q4_0/Q4_1 but not these): for test files and the
# quality table's GGUF variants. Plain min/max fits, not llama.cpp's searched ones (which are a little better).

def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)[..., None].view(np.uint8)


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """[N, K] float (K % 256 == 0) -> Q6_K blocks [N, K / 256 * 210] uint8."""
    n, k = w.shape
    x = w.astype(np.float32).reshape(n, k // 256, 16, 16)
    scale = np.abs(x).max(-1) / 31.5                                    # per 16: q in -32..31
    d = np.maximum(np.abs(scale).max(-1), 1e-12) / 127                  # per 256: int8 sub-scales
    d = d.astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(scale / d[..., None]), -128, 127)
    step = (d[..., None] * sc)[..., None]
    q = np.clip(np.round(np.divide(x, step, out=np.zeros_like(x), where=step != 0)), -32, 31).astype(np.int16) + 32
    q = q.reshape(n, k // 256, 2, 4, 32).astype(np.uint8)            # halves of 128: 4 runs of 32 (see _unpack)
    ql = (q[..., 0:2, :] & 15) | ((q[..., 2:4, :] & 15) << 4)         # bytes l, l + 32: runs 0/2 and 1/3
    qh = (q[..., 0, :] >> 4) | ((q[..., 1, :] >> 4) << 2) | ((q[..., 2, :] >> 4) << 4) | ((q[..., 3, :] >> 4) << 6)
    out = np.concatenate((ql.reshape(n, -1, 128), qh.reshape(n, -1, 64), sc.astype(np.int8).view(np.uint8),
                          _f16_bytes(d)), axis=-1)
    return out.reshape(n, -1)


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """[N, K] float (K % 256 == 0) -> Q4_K blocks [N, K / 256 * 144] uint8."""
    n, k = w.shape
    x = w.astype(np.float32).reshape(n, k // 256, 8, 32)
    lo = np.minimum(x.min(-1), 0.0)                                     # w = d sc q - dmin m, m >= 0
    scale = (x.max(-1) - lo) / 15
    d = (np.maximum(scale.max(-1), 1e-12) / 63).astype(np.float16).astype(np.float32)
    dmin = (np.maximum((-lo).max(-1), 1e-12) / 63).astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(scale / d[..., None]), 0, 63)
    m = np.clip(np.round(-lo / dmin[..., None]), 0, 63)
    step = (d[..., None] * sc)[..., None]
    shifted = x + (dmin[..., None] * m)[..., None]
    q = np.clip(np.round(np.divide(shifted, step, out=np.zeros_like(x), where=step != 0)), 0, 15).astype(np.uint8)
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    scales = np.concatenate((                                           # the 12-byte 6-bit packing of _unpack
        (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6),
        (m[..., :4] & 63) | ((m[..., 4:] >> 4) << 6),
        (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4)), axis=-1)
    q = q.reshape(n, k // 256, 4, 2, 32)                                # chunks of 64: low nibbles, high nibbles
    qs = (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(n, -1, 128)
    out = np.concatenate((_f16_bytes(d), _f16_bytes(dmin), scales, qs), axis=-1)
    return out.reshape(n, -1)
