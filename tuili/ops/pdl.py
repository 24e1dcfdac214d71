"""Programmatic dependent launch (PDL, Hopper and later) for the kernels of a decode step.

A batch-1 decode step is a chain of short kernels (6 per layer), each of which would otherwise be launched only
once the one before has finished. Launched with PDL, a kernel's programs are placed on the SMs as soon as every
program of the kernel before it has called `gdc_launch_dependents` (or exited), and wait in `gdc_wait` for that
kernel to finish and its writes to be visible: the launch overlaps the previous kernel's tail. Each kernel
launched so calls `gdc_wait` before it writes anything or reads what the kernel before it may write (the decode
attention and its merge read the step's lengths, positions and slots first, written before the kernel before them;
a decode split with no keys exits without waiting, split 0 always waits), so a kernel's completion still implies
every earlier one's (kernels without PDL in between wait as usual). The long kernels (GEMVs, decode attention) let
the next one launch only after their main loop: waiting programs beside a running loop slowed it (-5% per step on
the 8B INT4 model, H100), and prefetching the next GEMV's first weight tiles into L2 before its wait cost more
than it saved. Exceptions, where the next kernel works before its wait: stream_gemv lets its successor launch at
once, and the decode attention and its merge do so ahead of a streaming o GEMV (their `launch_early`), which
then copies its first stages while the attention runs. CUDA graphs capture the launches as programmatic edges.
"""
from __future__ import annotations

import functools

import torch


@functools.cache
def _supported(index: int) -> bool:
    import triton.language as tl
    return torch.cuda.get_device_capability(index)[0] >= 9 and hasattr(tl.extra.cuda, "gdc_wait")


def launch_options(device: torch.device) -> dict:
    """Keyword arguments for a kernel launch on `device`: the kernel's PDL constexpr, and Triton's launch_pdl
    where the device has PDL (CUDA, compute capability 9.0 or later)."""
    index = device.index if device.index is not None else torch.cuda.current_device() if device.type == "cuda" else 0
    if device.type == "cuda" and _supported(index):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}
