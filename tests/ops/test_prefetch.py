"""The L2 prefetch of a small decode step's next weights (tuili/ops/prefetch.py): which bytes it asks for, and
that a CUDA graph captures it as a side branch that changes nothing (what it buys: scripts/probe_l2_prefetch.py
and the latency benchmark, on the device)."""
from __future__ import annotations

import pytest
import torch

from tuili.ops import prefetch

CUDA = torch.cuda.is_available()
HOPPER = CUDA and prefetch.supported(torch.cuda.current_device())
needs_hopper = pytest.mark.skipif(not HOPPER, reason="needs a CUDA GPU of compute capability 9.0 or later")


def test_nothing_to_prefetch_off_hopper():
    """CPU tensors give no ranges, and issue / join without ranges queue nothing."""
    assert prefetch.ranges([torch.zeros(1024), None], 1 << 20) == ()
    prefetch.issue((), torch.device("cpu"))
    prefetch.join(torch.device("cpu"))
    assert not prefetch._pending


@needs_hopper
def test_ranges_cut_to_the_budget():
    """In order, aligned, multiples of 16 bytes, empty and non-contiguous tensors skipped, at most the budget."""
    tensors = [torch.randn(4096, 1024, device="cuda"), torch.empty(0, device="cuda"),
               torch.randn(3, 7, device="cuda", dtype=torch.bfloat16), torch.randn(64, 64, device="cuda").t(),
               torch.randn(2048, 4096, device="cuda")]
    got = prefetch.ranges(tensors, budget=20 << 20)
    assert got == ((tensors[0].data_ptr(), 16 << 20), (tensors[2].data_ptr(), 32),
                   (tensors[4].data_ptr(), (4 << 20) - 32))


@needs_hopper
def test_prefetch_in_a_cuda_graph_changes_nothing():
    """issue forks a side stream off the current one and join merges it back, so a CUDA graph captures the
    prefetch as a parallel branch (an unjoined stream would fail the capture); replays compute what eager does."""
    weight = torch.randn(4096, 4096, device="cuda")
    x = torch.randn(64, 4096, device="cuda")
    ranges = prefetch.ranges([weight], 24 << 20)

    def step():
        h = x * 2
        prefetch.issue(ranges, x.device)
        out = h @ weight.t()
        prefetch.join(x.device)
        return out

    want = step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = step()
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(got, want) and torch.equal(got, (x * 2) @ weight.t())
    assert not prefetch._pending
