"""What the H100 can stream, as ceilings for the batch-1 GEMVs (issue 6): (1) a plain streaming read (xor of int32
words over 2 GiB, programs x block x stages swept) beside torch's copy and sum; (2) loads only (xor of words; no
products, no scales, no x) of the 8B's INT4 weight shapes, 16 copies per shape in one CUDA graph, one short
program per row tile (as the GEMV) against a flattened persistent loop over (row tile, K tile) with 1-4 programs
per SM.

usage: python scripts/probe_stream_ceiling.py OUT.json"""
import json
import os
import sys

import torch
import triton
import triton.language as tl

from tuili.bench.roofline import measure_bandwidth

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gemv_layers import graph_us  # noqa: E402  (one CUDA graph of many calls, replayed)


@triton.jit
def read_kernel(p, out, n_per_prog, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    base = p + pid.to(tl.int64) * n_per_prog
    acc = tl.zeros([BLOCK], tl.int32)
    for i in tl.range(0, n_per_prog, BLOCK, num_stages=STAGES):
        acc ^= tl.load(base + i + tl.arange(0, BLOCK))
    tl.store(out + pid * BLOCK + tl.arange(0, BLOCK), acc)


@triton.jit
def launched(w_ptr, out_ptr, K_WORDS, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = w_ptr + rn[:, None].to(tl.int64) * K_WORDS
    acc = tl.zeros([BLOCK_N, BLOCK_W], tl.int32)
    for k in tl.range(0, K_WORDS, BLOCK_W, num_stages=STAGES):
        acc ^= tl.load(rows + k + tl.arange(0, BLOCK_W)[None, :])
    tl.store(out_ptr + rn, tl.xor_sum(acc, axis=1))


@triton.jit
def flat(w_ptr, out_ptr, K_WORDS, n_iters, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    KT = K_WORDS // BLOCK_W
    # whole tiles per program, contiguous: tiles [t0, t1)
    tiles = n_iters // KT
    t0 = pid * tiles // P
    t1 = (pid + 1) * tiles // P
    acc = tl.zeros([BLOCK_N, BLOCK_W], tl.int32)
    for it in tl.range(t0 * KT, t1 * KT, num_stages=STAGES):
        tile = it // KT
        k = (it % KT) * BLOCK_W
        rn = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        acc ^= tl.load(w_ptr + rn[:, None].to(tl.int64) * K_WORDS + k + tl.arange(0, BLOCK_W)[None, :])
        if it % KT == KT - 1:
            tl.store(out_ptr + rn, tl.xor_sum(acc, axis=1))
            acc = tl.zeros([BLOCK_N, BLOCK_W], tl.int32)

def timed(fn, reps=10):
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    ts = []
    for _ in range(reps):
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    return sorted(ts)[len(ts) // 2]


def read_ceiling(sms: int) -> dict:
    n = 1 << 29  # 2 GiB of int32
    a = torch.randint(-2**31, 2**31 - 1, (n,), dtype=torch.int32, device="cuda")
    res = {"copy_TB_s": measure_bandwidth(torch.device("cuda")) / 1e12,
           "torch_sum_TB_s": 4 * n / timed(lambda: a.view(torch.float32).sum()) / 1e12}
    best = []
    for per_sm in (1, 2, 4, 8, 16):
        for block in (1024, 2048, 4096):
            for stages in (2, 3, 4, 6):
                progs = sms * per_sm
                npp = n // progs // block * block
                out = torch.empty(progs * block, dtype=torch.int32, device="cuda")
                t = timed(lambda: read_kernel[(progs,)](a, out, npp, BLOCK=block, STAGES=stages,
                                                        num_warps=4 if block <= 2048 else 8))
                best.append((4 * npp * progs / t / 1e12, per_sm, block, stages))
    res["triton_read_best"] = sorted(best, reverse=True)[:8]  # (TB/s, programs per SM, block, stages)
    return res


def int4_shapes(sms: int) -> list[dict]:
    res = []
    for name, n, k in (("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)):
        kw = k // 8
        ws = [torch.randint(-2**31, 2**31 - 1, (n, kw), dtype=torch.int32, device="cuda") for _ in range(16)]
        out = torch.empty(n, dtype=torch.int32, device="cuda")
        nbytes = n * kw * 4
        for bn, bw, st in ((32, 128, 3), (16, 256, 3), (16, 128, 4), (32, 128, 4)):
            t = graph_us(lambda: [launched[(n // bn,)](w, out, kw, BLOCK_N=bn, BLOCK_W=bw, STAGES=st, num_warps=4)
                                  for w in ws], len(ws))
            res.append(dict(shape=name, kind="launched", tile=[bn, bw, st], us=round(t, 2),
                            TB_s=round(nbytes / t / 1e6, 3)))
            for per_sm in (1, 2, 3, 4):
                progs = min(sms * per_sm, n // bn)
                iters = (n // bn) * (kw // bw)
                t = graph_us(lambda: [flat[(progs,)](w, out, kw, iters, BLOCK_N=bn, BLOCK_W=bw, STAGES=st,
                                                     num_warps=4) for w in ws], len(ws))
                res.append(dict(shape=name, kind=f"flat{per_sm}", tile=[bn, bw, st], us=round(t, 2),
                                TB_s=round(nbytes / t / 1e6, 3)))
        print(json.dumps([r for r in res if r["shape"] == name]), flush=True)
    return res


if __name__ == "__main__":
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    result = {"device": torch.cuda.get_device_name(), **read_ceiling(sms), "int4_loads_only": int4_shapes(sms)}
    with open(sys.argv[1], "w") as f:
        json.dump(result, f, indent=1)
