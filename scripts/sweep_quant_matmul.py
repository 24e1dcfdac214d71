"""Tile sweep of the dequant-fused Triton matmul (tuili/ops/quant_matmul.py) on the GPU, batch-1 decode shapes of
Llama-3.1-8B: time and GB/s of each config against cuBLAS bf16 on the same shape, and what `_tiles` picks.

usage: python scripts/sweep_quant_matmul.py OUT.json [m] [gemv]   (gemv: only the CUDA-core GEMV's tiles, m = 1)"""
import itertools
import json
import sys

import torch
from triton.testing import do_bench

from tuili.ops.quant_matmul import _tiles, quant_linear_triton
from tuili.quant import quantize_groupwise, quantize_per_channel

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}


def main(out: str, m: int = 1, gemv_only: bool = False) -> None:
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    results = []
    for (name, (n, k)), method in itertools.product(SHAPES.items(), ("int8", "int4")):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        if method == "int8":
            q, s = quantize_per_channel(w)
            args, group, nbytes = (q, s, None, 0), 0, q.numel() + s.numel() * 2
        else:
            q, s, z = quantize_groupwise(w, 128)
            args, group, nbytes = (q, s, z, 128), 128, q.numel() + 4 * s.numel()
        cublas_us = do_bench(lambda: torch.nn.functional.linear(x, w)) * 1e3
        best, timings = None, []
        block_ks = (128, 256, 512) if method == "int8" else (64, 128)
        configs = [(1, bn, bk, splits, warps, stages) for bn, bk, splits, (warps, stages) in itertools.product(
            (8, 16, 32, 64), block_ks, (1, 2, 4, 8), ((4, 3), (4, 4), (8, 4), (2, 4)))]
        configs += [(16, 64, 256 if method == "int8" else 128, splits, 4, 4) for splits in (1, 4, 8)]
        if gemv_only:  # the GEMV on int32 words: wider K tiles pay for INT8
            if name == "lm_head" and method == "int4":
                continue  # INT4 models keep the LM head in INT8
            block_ks = (256, 512) if method == "int8" else (128,)
            configs = [(1, bn, bk, splits, warps, 4) for bn, bk, splits, warps in itertools.product(
                (16, 32, 64, 128, 256), block_ks, (1, 2, 4, 8), (4, 8)) if bn * bk <= 65536]
        for tiles in configs:
            try:
                us = do_bench(lambda: quant_linear_triton(x, *args, tiles=tiles), warmup=5, rep=20) * 1e3
            except Exception as e:  # out of resources for a big tile: skip that config
                print(name, method, tiles, "failed:", str(e)[:80])
                continue
            timings.append((tiles, round(us, 2)))
            if best is None or us < best[1]:
                best = (tiles, us)
        auto = _tiles(m, n, k, group, sms)
        auto_us = do_bench(lambda: quant_linear_triton(x, *args)) * 1e3
        rec = dict(shape=name, n=n, k=k, m=m, method=method, bytes=nbytes, cublas_bf16_us=cublas_us,
                   cublas_GB_s=2 * n * k / cublas_us / 1e3, best_tiles=best[0], best_us=best[1],
                   best_GB_s=nbytes / best[1] / 1e3, auto_tiles=auto, auto_us=auto_us, auto_GB_s=nbytes / auto_us / 1e3)
        print(json.dumps(rec), flush=True)
        rec["all"] = timings
        results.append(rec)
    with open(out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1, "gemv" in sys.argv[3:])
