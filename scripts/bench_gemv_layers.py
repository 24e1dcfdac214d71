"""Batch-1 decode matmuls as the engine runs them: one CUDA graph that calls the quantized matmul on `copies`
different weights of one shape in a row (more bytes than L2 holds, no launch gaps, as in a layer stack), replayed;
time per call and GB/s for each tile config, against cuBLAS bf16 on the same shape the same way. Steadier than
timing one kernel alone (scripts/sweep_quant_matmul.py), whose numbers swing with clocks and the cache.

usage: python scripts/bench_gemv_layers.py OUT.json [int8|int4 ...] [--auto] [--shapes=qkv,o] [--rows=M]
    [--no-products]
(--auto: only `_tiles`' choice; --rows: M rows of x, default 1 (batch-1 decode); TILES: the configs to time, see
`configs`; --no-products: INT4's integer products replaced by a bit cast of the words, wrong results: what the same
loads, scales and x cost without them)"""
import itertools
import json
import os
import sys

import torch

from tuili.ops.quant_matmul import _tiles, group_major, quant_linear_triton
from tuili.quant import quantize_groupwise, quantize_per_channel

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}


def graph_us(fn, calls: int, replays: int = 20) -> float:
    """Mean microseconds per call of `fn` (which makes `calls` calls) replayed as one CUDA graph."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()  # compile and warm outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (replays * calls))
    return sorted(times)[len(times) // 2]


def configs(method: str) -> list:
    """Tile configs to time: TILES='{"int4": [[1, 16, 512, 1, 4, 3], ...], "int8": [...]}' or a default grid."""
    if "TILES" in os.environ:
        return [tuple(t) for t in json.loads(os.environ["TILES"]).get(method, [])]
    block_ks = (512, 1024)
    return [(1, bn, bk, s, 4, st) for bn, bk, s, st in itertools.product((16, 32, 64), block_ks, (1, 2, 4, 8), (1, 3))
            if bn * bk <= 32768]


def main(out: str, methods: list[str], auto_only: bool, shapes: list[str], rows: int = 1) -> None:
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    results = []
    for (name, (n, k)), method in itertools.product(SHAPES.items(), methods):
        if name not in shapes or (name == "lm_head" and method == "int4"):
            continue  # INT4 models keep the LM head in INT8
        copies = max(2, min(16, (400 << 20) // (n * k)))  # ~400 MB of weights per graph: far past L2
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        weights = []
        for _ in range(copies):
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            if method == "int8":
                q, s = quantize_per_channel(w)
                weights.append((q, s, None, 0))
            else:  # scales and offsets group-major, as the layers keep them
                q, s, z = quantize_groupwise(w, 128)
                weights.append((q, group_major(s), group_major(z), 128))
        q, s, z, g = weights[0]
        nbytes = q.numel() * q.element_size() + s.numel() * 2 * (2 if z is not None else 1)
        auto = _tiles(rows, n, k, g, sms)
        rec = dict(shape=name, n=n, k=k, method=method, rows=rows, bytes=nbytes, copies=copies, auto_tiles=auto)
        rec["auto_us"] = graph_us(lambda: [quant_linear_triton(x, *a) for a in weights], copies)
        if not auto_only:
            timings = []
            for tiles in configs(method):
                try:
                    us = graph_us(lambda: [quant_linear_triton(x, *a, tiles=tiles) for a in weights], copies)
                except Exception as e:  # out of resources for a big tile: skip that config
                    print(name, method, tiles, "failed:", str(e)[:80], flush=True)
                    continue
                timings.append((tiles, round(us, 2)))
            timings.sort(key=lambda t: t[1])
            rec["best_tiles"], rec["best_us"] = timings[0] if timings else (None, None)
            rec["all"] = timings
        wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        rec["cublas_bf16_us"] = graph_us(lambda: torch.nn.functional.linear(x, wb), 1)
        rec["auto_GB_s"] = nbytes / rec["auto_us"] / 1e3
        print(json.dumps({key: (v[:10] if key == "all" else v) for key, v in rec.items()}), flush=True)
        results.append(rec)
    with open(out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=1)


if __name__ == "__main__":
    if "--no-products" in sys.argv:
        import triton
        import triton.language as tl

        import tuili.ops.quant_matmul as qm

        def _no_products(words, xf, BLOCK_W: tl.constexpr):
            return words.to(tl.float32, bitcast=True)

        qm._kernels()
        qm._dp2a_terms = triton.jit(_no_products)  # looked up when _gemv_tile compiles
    args = [a for a in sys.argv[2:] if not a.startswith("--")]
    shapes = next((a.split("=")[1].split(",") for a in sys.argv if a.startswith("--shapes=")), list(SHAPES))
    rows = int(next((a.split("=")[1] for a in sys.argv if a.startswith("--rows=")), 1))
    main(sys.argv[1], args or ["int8", "int4"], "--auto" in sys.argv, shapes, rows)
