"""Would one persistent kernel per decoder layer beat a chain of PDL-launched kernels? A probe (device only): the
o -> gate_up -> down GEMVs of a batch-1 decode step (the fused GEMV's tiles, `_gemv_tile`, with the residual adds
and the norm inside) as one kernel whose programs all stay resident and meet at grid barriers between the phases,
against the engine's three launches, over 32 layers' random INT4 / INT8 weights (Llama-3.1-8B shapes) in one
CUDA graph: us per layer for each grid size (programs per SM) and register cap, whether the two give the same
bits, and the barriers alone (no phases) against an empty launch.

usage: python scripts/probe_persistent_layer.py OUT.json '[{"cap": 2}, {"phases": 0, "sync": true}, ...]'
(variant keys: cap = programs per SM at most, maxnreg, block_n, phases = bit mask of o / gate_up / down, sync,
poll_load)"""
import json
import os
import sys

import torch
import triton
import triton.language as tl

from tuili.ops import quant_matmul as qm
from tuili.quant import quantize_groupwise, quantize_per_channel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gemv_layers import graph_us  # noqa: E402

qm._kernels()
_gemv_tile = qm._gemv_tile


@triton.jit
def _grid_sync(bar_ptr, err_ptr, nprog, POLL_LOAD: tl.constexpr):
    """All programs of the grid meet here (every one resident). bar [count, generation]: the last to arrive resets
    the count and bumps the generation, the others poll it (atomics, or volatile loads and one acquire after);
    a program that polls for ~seconds gives up and counts itself in err (a hang would lose the device call)."""
    tl.debug_barrier()
    gen = tl.atomic_add(bar_ptr + 1, 0, sem="relaxed", scope="gpu")
    arrived = tl.atomic_add(bar_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == nprog - 1:
        tl.atomic_xchg(bar_ptr, 0, sem="relaxed", scope="gpu")
        tl.atomic_add(bar_ptr + 1, 1, sem="release", scope="gpu")
    else:
        cur = gen
        spins = 0
        while (cur == gen) & (spins < 4000000):
            if POLL_LOAD:
                cur = tl.load(bar_ptr + 1, volatile=True)
            else:
                cur = tl.atomic_add(bar_ptr + 1, 0, sem="acquire", scope="gpu")
            spins += 1
        if POLL_LOAD:
            tl.atomic_add(bar_ptr + 1, 0, sem="acquire", scope="gpu")
        if spins >= 4000000:
            tl.atomic_add(err_ptr, 1)
    tl.debug_barrier()


@triton.jit
def _phase(pid, nprog, tiles_n, splits, x, qw, s, o, out, part, count, ss, nw, hw, N, K, sqn, ssn, ssg,
           kps, num_ss, eps, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr,
           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr, FIXUP: tl.constexpr,
           STAGES: tl.constexpr, SILU_MUL: tl.constexpr, PAIRED: tl.constexpr, NORM: tl.constexpr,
           ADD: tl.constexpr, BLOCK_SS: tl.constexpr):
    for t in range(pid, tiles_n * splits, nprog):
        _gemv_tile(0, t % tiles_n, t // tiles_n, 1, tiles_n, splits, x, qw, s, o, out, part, count, ss, nw, hw,
                   N, K, 0, sqn, ssn, ssg, N, kps, num_ss, eps, BITS, GROUP, HAS_OFFSET, BLOCK_N, BLOCK_K, False,
                   True, BLOCK_W, FIXUP, True, STAGES, SILU_MUL, PAIRED, NORM, ADD, BLOCK_SS, False)


@triton.jit
def layer_tail_kernel(bar_ptr, err_ptr, a_ptr, h_ptr, eps,
                      oq, os_, oo, ss1, nw1, hw1,
                      gq, gs, go, gu_ptr,
                      dq, ds, do, part, count, ss2, nw2, hw2,
                      H, F, o_sqn, o_ssg, g_sqn, g_ssg, d_sqn, d_ssg, d_splits, d_kps,
                      BITS: tl.constexpr, GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr, BLOCK_N: tl.constexpr,
                      BK_H: tl.constexpr, BK_F: tl.constexpr, STAGES: tl.constexpr, PAIRED: tl.constexpr,
                      FIXUP_D: tl.constexpr, BLOCK_SS: tl.constexpr, PHASES: tl.constexpr, SYNC: tl.constexpr,
                      POLL_LOAD: tl.constexpr,
                      PDL: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    PER: tl.constexpr = 32 // BITS
    if PDL:
        tl.extra.cuda.gdc_wait()
    tiles_h = tl.cdiv(H, BLOCK_N)
    tiles_f = tl.cdiv(2 * F, BLOCK_N)
    if PHASES & 1:  # o: h += attn @ Wo^T; hw1 = h * nw1; ss1
        _phase(pid, nprog, tiles_h, 1, a_ptr, oq, os_, oo, h_ptr, part, count, ss1, nw1, hw1, H, H, o_sqn, 1, o_ssg,
               H, 1, eps, BITS, GROUP, HAS_OFFSET, BLOCK_N, BK_H, BK_H // PER, False, STAGES, False, PAIRED,
               False, True, 1)
    if SYNC:
        _grid_sync(bar_ptr, err_ptr, nprog, POLL_LOAD)
    if PHASES & 2:  # gate_up = rms_norm(h) @ Wgu^T
        _phase(pid, nprog, tiles_f, 1, hw1, gq, gs, go, gu_ptr, part, count, ss1, nw1, hw1, 2 * F, H, g_sqn, 1,
               g_ssg, H, tiles_h, eps, BITS, GROUP, HAS_OFFSET, BLOCK_N, BK_H, BK_H // PER, False, STAGES, False,
               PAIRED, True, False, BLOCK_SS)
    if SYNC:
        _grid_sync(bar_ptr, err_ptr, nprog, POLL_LOAD)
    if PHASES & 4:  # h += silu(gate) * up @ Wd^T; hw2, ss2
        _phase(pid, nprog, tiles_h, d_splits, gu_ptr, dq, ds, do, h_ptr, part, count, ss2, nw2, hw2, H, F, d_sqn,
               1, d_ssg, d_kps, 1, eps, BITS, GROUP, HAS_OFFSET, BLOCK_N, BK_F, BK_F // PER, FIXUP_D, STAGES, True,
               PAIRED, False, True, 1)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


def make_layer(method, H, F, dev):
    def q(n, k):
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        if method == "int8":
            qw, s = quantize_per_channel(w)
            return qw, s, None, 0
        qw, s, z = quantize_groupwise(w, 128)
        return qw, qm.group_major(s), qm.group_major(z), 128
    return dict(o=q(H, H), gu=q(2 * F, H), d=q(H, F), nw1=torch.rand(H, device=dev, dtype=torch.bfloat16) + 0.5,
                nw2=torch.rand(H, device=dev, dtype=torch.bfloat16) + 0.5)


def baseline_layer(L, a, h, phases=7):
    if phases == 2:
        return qm.quant_linear_triton(a, *L["gu"])
    _, hw, ss = qm.quant_linear_triton(a, *L["o"], residual=h, norm_weight=L["nw1"])
    gu = qm.quant_linear_triton(hw, *L["gu"], norm=(1e-5, ss))
    return qm.quant_linear_triton(gu, *L["d"], silu_mul=True, residual=h, norm_weight=L["nw2"])


class Persistent:
    """The persistent layer-tail kernel's buffers, arguments and grid (programs per SM from its registers and
    shared memory, at most occ_cap)."""

    def __init__(self, method, H, F, dev, occ_cap, maxnreg=None, phases=7, sync=True, block_n=None, poll_load=False):
        self.method, self.H, self.F = method, H, F
        self.bits = 8 if method == "int8" else 4
        self.block_n = block_n or (16 if method == "int8" else 32)
        self.maxnreg, self.phases, self.sync, self.poll_load = maxnreg, phases, sync, poll_load
        self.bk_h = min(512 if method == "int8" else 1024, H)
        self.bk_f = min(1024, F)
        self.splits = 1 if method == "int8" else 2
        self.kps = -(-F // (self.splits * self.bk_f)) * self.bk_f
        self.tiles_h = H // self.block_n
        self.bar = torch.zeros(2, dtype=torch.int32, device=dev)
        self.err = torch.zeros(1, dtype=torch.int32, device=dev)
        self.count = torch.zeros(self.tiles_h, dtype=torch.int32, device=dev)
        self.part = torch.empty(self.splits, 1, H, dtype=torch.float32, device=dev)
        self.ss1 = torch.empty(1, self.tiles_h, dtype=torch.float32, device=dev)
        self.ss2 = torch.empty(1, self.tiles_h, dtype=torch.float32, device=dev)
        self.hw1 = torch.empty(1, H, dtype=torch.bfloat16, device=dev)
        self.hw2 = torch.empty(1, H, dtype=torch.bfloat16, device=dev)
        self.gu = torch.empty(1, 2 * F, dtype=torch.bfloat16, device=dev)
        self.occ_cap = occ_cap
        self.grid = None

    def args(self, L, a, h):
        (oq, os_, oo, g), (gq, gs, go, _), (dq, ds, do, _) = L["o"], L["gu"], L["d"]
        has_off = oo is not None
        sg = lambda s: s.stride(1) if s.dim() == 2 else 0  # noqa: E731
        cast = lambda t: t.view(torch.int32)  # noqa: E731
        args = (self.bar, self.err, a, h, 1e-5, cast(oq), os_, oo if has_off else os_, self.ss1, L["nw1"], self.hw1,
                cast(gq), gs, go if has_off else gs, self.gu, cast(dq), ds, do if has_off else ds, self.part,
                self.count, self.ss2, L["nw2"], self.hw2, self.H, self.F, oq.stride(0) // (4 // oq.element_size()),
                sg(os_), gq.stride(0) // (4 // gq.element_size()), sg(gs), dq.stride(0) // (4 // dq.element_size()),
                sg(ds), self.splits, self.kps)
        kw = dict(BITS=self.bits, GROUP=g, HAS_OFFSET=has_off, BLOCK_N=self.block_n, BK_H=self.bk_h, BK_F=self.bk_f,
                  STAGES=3, PAIRED=self.bits == 4, FIXUP_D=self.splits > 1,
                  BLOCK_SS=triton.next_power_of_2(self.tiles_h), PHASES=self.phases, SYNC=self.sync, PDL=True,
                  POLL_LOAD=self.poll_load, num_warps=4)
        if self.maxnreg:
            kw["maxnreg"] = self.maxnreg
        return args, kw

    def __call__(self, L, a, h):
        args, kw = self.args(L, a, h)
        if self.grid is None:
            k = layer_tail_kernel.warmup(*args, grid=(1,), launch_pdl=True, **kw)
            k._init_handles()
            regs = -(-(self.maxnreg or k.n_regs) * 32 // 256) * 256 * kw["num_warps"]
            occ = min(65536 // regs, 233472 // (k.metadata.shared + 1024), 64 // kw["num_warps"])
            sms = torch.cuda.get_device_properties(0).multi_processor_count
            self.grid = sms * min(occ, self.occ_cap)
            self.info = dict(n_regs=k.n_regs, shared=k.metadata.shared, occ=occ, grid=self.grid, spills=k.n_spills)
            print(self.method, self.info, flush=True)
        layer_tail_kernel[(self.grid,)](*args, launch_pdl=True, **kw)
        return h, self.hw2, self.ss2


def main():
    dev = torch.device("cuda")
    H, F, layers = 4096, 14336, 32
    res = {"device": torch.cuda.get_device_name(0), "commit": os.environ.get("TUILI_COMMIT", "")}
    variants = json.loads(sys.argv[2])
    for method in ("int4", "int8"):
        torch.manual_seed(0)
        Ls = [make_layer(method, H, F, dev) for _ in range(layers)]
        a = torch.randn(1, H, device=dev, dtype=torch.bfloat16)
        h0 = torch.randn(1, H, device=dev, dtype=torch.bfloat16)
        hb = h0.clone()
        _, hwb, ssb = baseline_layer(Ls[0], a, hb)
        for v in variants:
            if v.get("method", method) != method:
                continue
            try:
                P = Persistent(method, H, F, dev, v.get("cap", 2), v.get("maxnreg"), v.get("phases", 7),
                               v.get("sync", True), v.get("block_n"), v.get("poll_load", False))
                hp = h0.clone()
                _, hwp, ssp = P(Ls[0], a, hp)
                torch.cuda.synchronize()
                rec = dict(method=method, **v, **P.info, err=int(P.err.item()))
                if v.get("phases", 7) == 7:
                    rec.update(h_equal=bool(torch.equal(hb, hp)), hw_equal=bool(torch.equal(hwb, hwp)),
                               ss_equal=bool(torch.equal(ssb, ssp)))
                h = h0.clone()
                rec["us_per_layer"] = graph_us(lambda: [P(L, a, h) for L in Ls], layers)
                rec["err_after"] = int(P.err.item())
            except Exception as e:
                rec = dict(method=method, **v, error=str(e)[:300])
            print(json.dumps(rec), flush=True)
            res.setdefault("runs", []).append(rec)
        for ph in (7, 2):
            h = h0.clone()
            base = graph_us(lambda: [baseline_layer(L, a, h, ph) for L in Ls], layers)
            print(method, "baseline phases", ph, "us/layer", base, flush=True)
            res.setdefault("baseline_us_per_layer", {})[f"{method}_{ph}"] = base
    with open(sys.argv[1], "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
