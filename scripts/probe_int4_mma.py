"""The tensor-core INT4 GEMV (tuili/ops/int4_mma.py) against the Triton kernels: errors against the torch
reference (plain and fused forms, 1-16 rows), then time per call on the 8B's decode shapes for 1-16 rows of x
(bench_gemv_layers' CUDA-graph timing, many weights per graph), over K splits and batch sizes.

usage: python scripts/probe_int4_mma.py OUT.json"""
import json
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, "scripts")
from bench_gemv_layers import SHAPES, graph_us  # noqa: E402

from tuili.ops import int4_mma  # noqa: E402
from tuili.ops.activation import silu_and_mul  # noqa: E402
from tuili.ops.quant_matmul import _split_counts, group_major, int4_linear, quant_linear_triton  # noqa: E402
from tuili.quant import quantize_groupwise  # noqa: E402

ROWS = (1, 2, 3, 4, 5, 8, 9, 12, 16)


def layer(n: int, k: int, sym: bool = False):
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    q, s, z = quantize_groupwise(w, 128, symmetric=sym, ranges=(1.0,))
    return q, group_major(s), None if z is None else group_major(z)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def errors() -> list:
    out = []
    counts = _split_counts(torch.device("cuda"))
    for name in ("qkv", "o", "gate_up", "down"):
        n, k = SHAPES[name]
        for sym in (False, True):
            q, s, z = layer(n, k, sym)
            for m in ROWS:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ref = int4_linear(x.float(), q, s.float(), None if z is None else z.float(), 128)
                rec = dict(shape=name, sym=sym, m=m, mma_vs_ref=rel(int4_mma.int4_gemv(x, q, s, z, counts), ref),
                           triton_vs_ref=rel(quant_linear_triton(x, q, s, z, 128), ref))
                out.append(rec)
                print(rec, flush=True)
    # fused forms against torch: down (silu * up in, residual add and the next norm's inputs out), then gate_up
    # with that norm
    n, k = SHAPES["down"]
    q, s, z = layer(n, k)
    n2, k2 = SHAPES["gate_up"]
    q2, s2, z2 = layer(n2, k2)
    nw = torch.rand(n, device="cuda", dtype=torch.bfloat16) + 0.5
    for m in ROWS:
        gu = torch.randn(m, 2 * k, device="cuda", dtype=torch.bfloat16)
        h = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        h_ref = (int4_linear(silu_and_mul(gu), q, s, z, 128) + h).float()
        hw_ref = (h_ref * nw.float()).to(torch.bfloat16)
        h_out, hw, ss = int4_mma.int4_gemv(gu, q, s, z, counts, silu_mul=True, residual=h.clone(), norm_weight=nw)
        y = int4_mma.int4_gemv(hw, q2, s2, z2, counts, norm=(1e-5, ss))
        y_ref = int4_linear(F.rms_norm(h_ref.to(torch.bfloat16), (n,), nw, 1e-5), q2, s2, z2, 128)
        rec = dict(form="down silu_mul + add, gate_up norm", m=m, h=rel(h_out, h_ref), hw=rel(hw, hw_ref),
                   ss=abs(ss.sum().item() / (h_ref * h_ref).sum().item() - 1), gate_up=rel(y, y_ref))
        print(rec, flush=True)
        out.append(rec)
    return out


def timings() -> list:
    out = []
    counts = _split_counts(torch.device("cuda"))
    for name in ("qkv", "o", "gate_up", "down"):
        n, k = SHAPES[name]
        copies = max(2, min(16, (400 << 20) // (n * k)))
        ws = [layer(n, k) for _ in range(copies)]
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            rec = dict(shape=name, m=m, triton_us=graph_us(lambda: [quant_linear_triton(x, *w, 128) for w in ws],
                                                           copies))
            rec["mma_auto_us"] = graph_us(lambda: [int4_mma.int4_gemv(x, *w, counts) for w in ws], copies)
            for splits in (1, 2, 4, 8, 16):  # (UNROLL 4 lost on most shapes; the kernel is built with 2 now)
                if k // 128 < splits * int4_mma.UNROLL:
                    continue
                rec[f"mma_s{splits}_u{int4_mma.UNROLL}_us"] = graph_us(
                    lambda: [int4_mma.int4_gemv(x, *w, counts, splits=splits) for w in ws], copies)
            best = min((v, key) for key, v in rec.items() if key.startswith("mma_s"))
            print(json.dumps(dict(shape=name, m=m, triton=rec["triton_us"], auto=rec["mma_auto_us"], best=best)),
                  flush=True)
            out.append(rec)
    return out


if __name__ == "__main__":
    result = dict(device=torch.cuda.get_device_name(), errors=errors(), timings=timings())
    with open(sys.argv[1], "w") as f:
        json.dump(result, f, indent=1)
