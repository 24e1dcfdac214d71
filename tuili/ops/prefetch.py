"""Weights into the L2 while a small decode step attends (Hopper).

At batch 1 a decode layer reads its weights in four GEMVs; between the qkv and the o projection the decode
attention and its merge run for ~8 us reading almost nothing (a few hundred cached tokens), and DRAM idles. The
o projection's weights and the first part of gate/up's do not depend on that attention, so they can be on their
way into the L2 meanwhile, and the GEMVs read them from there (INT4 g128 batch 1, H100, scripts/probe_l2_prefetch.py:
o 6.5 us from DRAM, 5.2 after a prefetch of its weights; gate/up 29.4, 25.3 with half of them prefetched).

The prefetch kernel asks for the bytes with Hopper's bulk prefetch (`cp.async.bulk.prefetch.L2`: no registers,
nothing written), but a kernel completes only once its requests have landed, so it must not sit in the decode
step's chain of kernels (where the attention would wait ~8 us for it): `issue` launches it on a side stream that
forks after the qkv projection (the caller's stream at that point) and `join` (once per forward) merges the side
stream back, which a CUDA graph captures as a parallel branch.
"""
from __future__ import annotations

import functools
import os

import torch

tl = None  # triton.language, bound by _kernel()
MAX_ROWS = 2  # forwards of up to this many tokens prefetch (8B INT4, H100: batch 2 743.6 -> 754.5 tok/s, batch 8
# 1433.2 -> 1401.9: from 3 rows on, the INT4 GEMV runs on the tensor cores, and DRAM is busier through attention);
# not one row whose o GEMV streams its own weights during the attention (LlamaAttention.attend)
AHEAD = 15 << 20  # bytes of gate/up after all of o's (8B, H100: INT4 ~24 MB in all, INT8 ~32: see ranges)
CHUNK = 4096  # bytes per bulk prefetch (16 KB: the same; 64 KB slower)
PROGRAMS = 16  # programs that issue them (they stay resident until their bytes land: 66 programs, or 4, slower)


def _prefetch_l2(addr, nbytes, p, nprog, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Ask the L2 for the nbytes bytes at device address addr (16-byte aligned, nbytes a multiple of 16): chunk c
    of CHUNK bytes is program c % nprog's, one chunk per thread per pass (BLOCK = the program's threads, so no
    request is issued twice)."""
    chunks = tl.cdiv(nbytes, CHUNK)
    for c0 in range(0, chunks, nprog * BLOCK):
        c = c0 + p + nprog * tl.arange(0, BLOCK)
        size = tl.where(c < chunks, tl.minimum(nbytes - c.to(tl.int64) * CHUNK, CHUNK), 0).to(tl.int32)
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.u32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
            "=r,l,r", [addr + c.to(tl.int64) * CHUNK, size], dtype=tl.int32, is_pure=False, pack=1)


def _prefetch_kernel(addr0, bytes0, addr1, bytes1, addr2, bytes2, addr3, bytes3, CHUNK: tl.constexpr,
                     BLOCK: tl.constexpr):
    p, nprog = tl.program_id(0), tl.num_programs(0)
    _prefetch_l2(addr0, bytes0, p, nprog, CHUNK, BLOCK)
    _prefetch_l2(addr1, bytes1, p, nprog, CHUNK, BLOCK)
    _prefetch_l2(addr2, bytes2, p, nprog, CHUNK, BLOCK)
    _prefetch_l2(addr3, bytes3, p, nprog, CHUNK, BLOCK)


@functools.cache
def _kernel():
    global tl, _prefetch_l2
    import triton
    import triton.language as tl

    _prefetch_l2 = triton.jit(_prefetch_l2)
    return triton.jit(_prefetch_kernel, do_not_specialize=[f"{n}{i}" for n in ("addr", "bytes") for i in range(4)])


@functools.cache
def supported(index: int) -> bool:
    """Bulk prefetch: compute capability 9.0 or later (and not Triton's CPU interpreter)."""
    return torch.cuda.get_device_capability(index)[0] >= 9 and os.environ.get("TRITON_INTERPRET") != "1"


def ranges(tensors: list[torch.Tensor | None], budget: int) -> tuple[tuple[int, int], ...]:
    """(address, bytes) of the first `budget` bytes of `tensors` in order, for `issue`: CUDA tensors on a GPU
    that supports it, contiguous, 16-byte aligned, cut to multiples of 16 bytes; at most 4 ranges. Addresses:
    the tensors must stay where they are while the ranges are used (a model's weights after loading).

    A layer asks for all of o's bytes and AHEAD more of gate/up's. Measured in the engine (8B batch 1, H100,
    tok/s): INT4 with a flat budget 16 MB 484.5, 20 490.1, 24 492.0, 32 485.2, 40 484.3; INT8 16 MB 319.3, 24
    325.6, 32 327.1; o + 15 MB (INT4 23.9 MB, INT8 31.8 MB): INT4 491.8 against 491.5 / 491.1 at 24, INT8 327.4 /
    327.4 against 325.4 / 325.4."""
    out = []
    for t in tensors:
        if t is None or not t.is_cuda or not supported(t.device.index) or not t.is_contiguous() \
                or t.data_ptr() % 16:
            continue
        nbytes = min(t.numel() * t.element_size(), budget) // 16 * 16
        if nbytes:
            out.append((t.data_ptr(), nbytes))
            budget -= nbytes
    return tuple(out[:4])


_side: dict[int, torch.cuda.Stream] = {}
_pending: set[int] = set()


def issue(prefetch: tuple[tuple[int, int], ...], device: torch.device) -> None:
    """Launch the prefetch of `prefetch` (from `ranges`) on `device`'s side stream, after what the current
    stream has queued so far; `join` must follow before the forward returns (and before a graph capture ends)."""
    if not prefetch:
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    side = _side.get(index)
    if side is None:
        side = _side[index] = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    args = [n for r in (*prefetch, *[(prefetch[0][0], 0)] * (4 - len(prefetch))) for n in r]
    with torch.cuda.stream(side):
        _kernel()[(PROGRAMS,)](*args, CHUNK=CHUNK, BLOCK=128, num_warps=4)
    _pending.add(index)


def join(device: torch.device) -> None:
    """Make the current stream wait for the prefetches `issue` launched (a no-op if none)."""
    if device.type != "cuda" or not _pending:
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index in _pending:
        _pending.discard(index)
        torch.cuda.current_stream(device).wait_stream(_side[index])
