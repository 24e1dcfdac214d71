"""INT4 g128 matmuls of 17+ rows on the GPU: the weight dequantized then cuBLAS (dequantize_int4_triton + F.linear,
the path before int4_gemm_triton) against int4_gemm_triton's tile configs, on Llama-3.1-8B's four decoder shapes,
each over 8 layers' random weights in one CUDA graph (weights from DRAM, not L2). Device only.

usage: python scripts/sweep_int4_gemm.py OUT.json '[17, 32, 64, 128, 512]' [--mma] [--rule-only]
(--mma: int4_mma's GEMM too, its split rule and forced splits and stages, up to 64 rows, and its GEMV up to 16;
--rule-only: of the Triton kernel's configs only the rule's)"""
import json
import os
import sys

import torch
import torch.nn.functional as F

from tuili.ops import int4_mma
from tuili.ops import quant_matmul as qm
from tuili.quant import quantize_groupwise

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gemv_layers import graph_us  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
LAYERS = 8


def configs(m: int) -> list:
    """The best configs of the first sweep (the weight as the mma's B operand), then out^T = W x^T ones (the
    weight as A, x's rows the mma's N: 16, 32 or 64)."""
    out = [(64, 128, 256, 1, 8, 3), (64, 32, 256, 1, 4, 4), (32, 32, 256, 1, 4, 4), (64, 64, 256, 1, 8, 4)]
    for bm in sorted({min(64, max(16, 1 << (m - 1).bit_length())), 32 if m <= 32 else 64}):
        for bn, bk, warps, stages in ((64, 256, 4, 3), (128, 256, 4, 3), (128, 256, 8, 3), (64, 128, 4, 4),
                                      (128, 128, 4, 4), (128, 128, 8, 4), (64, 256, 4, 4)):
            out.append((bm, bn, bk, 1, warps, stages, True))
    return out


def main():
    dev = torch.device("cuda")
    res = {"device": torch.cuda.get_device_name(0), "commit": os.environ.get("TUILI_COMMIT", ""), "runs": []}
    weights = {}
    for name, (n, k) in SHAPES.items():
        q, s, o = quantize_groupwise(torch.randn(n, k, device=dev), 128)
        # copies, not new draws: quantizing 8 x 218M values would take most of the call
        weights[name] = [(q.clone(), qm.group_major(s.to(torch.bfloat16)), qm.group_major(o.to(torch.bfloat16)))
                         for _ in range(LAYERS)]
    for m in json.loads(sys.argv[2]):
        summary = {"m": m, "dequant_cublas": 0.0, "best": 0.0, "rule": 0.0}
        for name, (n, k) in SHAPES.items():
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            ws = weights[name]
            base = graph_us(lambda: [F.linear(x, qm.dequantize_int4_triton(*w, 128, x.dtype)) for w in ws], LAYERS)
            rule = qm._int4_gemm_tiles(m, n, k, 128)
            times = {}
            for tiles in dict.fromkeys([rule, *([] if "--rule-only" in sys.argv else configs(m))]):
                try:
                    times[tiles] = graph_us(lambda: [qm.int4_gemm_triton(x, *w, 128, tiles=tiles) for w in ws], LAYERS)
                except Exception as e:  # out of shared memory / registers: skip the config
                    print(f"m={m} {name} {tiles}: {type(e).__name__}", flush=True)
            if "--mma" in sys.argv and m <= int4_mma.GEMM_ROWS:
                counts = qm._split_counts(dev)
                for splits, stages in ((None, None), (1, None), (2, None), (4, None), (8, None), (None, 3), (None, 4)):
                    times[("mma", splits, stages)] = graph_us(
                        lambda: [int4_mma.int4_gemm(x, *w, counts, splits=splits, stages=stages) for w in ws], LAYERS)
                for ps in (False, True):  # x's rows as the mma's A: weight pairs dequantized, or the scales after
                    times[("mma_ps", ps)] = graph_us(
                        lambda: [int4_mma.int4_gemm(x, *w, counts, post_scale=ps, swap=False) for w in ws], LAYERS)
                if m <= 2:  # what quant_linear_triton runs for 1-2 rows: the Triton GEMV
                    times[("linear",)] = graph_us(lambda: [qm.quant_linear_triton(x, *w, 128) for w in ws], LAYERS)
                if m <= 16:  # the weights as A
                    times[("mma_swap",)] = graph_us(
                        lambda: [int4_mma.int4_gemm(x, *w, counts, swap=True) for w in ws], LAYERS)
                summary["mma"] = summary.get("mma", 0.0) + times[("mma", None, None)]
                if m <= int4_mma.MAX_ROWS:  # the GEMV quant_linear_triton runs for 3-16 rows
                    times[("gemv",)] = graph_us(lambda: [int4_mma.int4_gemv(x, *w, counts) for w in ws], LAYERS)
                    summary["gemv"] = summary.get("gemv", 0.0) + times[("gemv",)]
                ref = F.linear(x, qm.dequantize_int4_triton(*ws[0], 128, x.dtype)).float()
                err = ((int4_mma.int4_gemm(x, *ws[0], counts).float() - ref).norm() / ref.norm()).item()
                print(f"m={m} {name}: mma {times[('mma', None, None)]:.2f} us, relative error {err:.2e}", flush=True)
            best = min(times, key=times.get)
            rec = dict(m=m, shape=name, dequant_cublas_us=round(base, 2), rule=rule, rule_us=round(times[rule], 2),
                       mma_rel_err=err if "--mma" in sys.argv and m <= int4_mma.GEMM_ROWS else None,
                       best=best, best_us=round(times[best], 2),
                       all={str(t): round(v, 2) for t, v in sorted(times.items(), key=lambda kv: kv[1])})
            print(json.dumps({k: v for k, v in rec.items() if k != "all"}), flush=True)
            res["runs"].append(rec)
            summary["dequant_cublas"] += base
            summary["best"] += times[best]
            summary["rule"] += times[rule]
        print("per layer (us):", json.dumps({k: round(v, 1) for k, v in summary.items()}), flush=True)
        res.setdefault("per_layer", []).append(summary)
    with open(sys.argv[1], "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
