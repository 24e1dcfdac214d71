"""Does a GEMV run faster when a bulk L2 prefetch (tuili/ops/prefetch.py) asked for its weights beforehand, and
does the prefetch kernel overlap the kernel after it? Device only (Hopper).

One CUDA graph per variant replays 20 x [evict the L2 (write 128 MB), variant, a ~15 us sleep, the batch-1 INT4
g128 GEMV]; the same without the GEMV is subtracted, which leaves the GEMV's time. Variants: nothing before it;
the prefetch of all (or half) of its packed weights on the same stream; the GEMV run once before (its weights
L2-resident where they fit). The step without the GEMV also shows what the prefetch kernel costs in the stream:
a kernel completes only once its prefetches have landed, so the next kernel waits for them.

usage: python scripts/probe_l2_prefetch.py OUT.json
"""
import json
import os
import sys

import torch

from tuili.ops import prefetch
from tuili.ops.quant_matmul import group_major, quant_linear_triton
from tuili.quant import quantize_groupwise

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gemv_layers import graph_us  # noqa: E402  (one CUDA graph of many calls, replayed)

REPS = 20  # repetitions per graph


def main(out: str) -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    flush = torch.empty(128 << 20, dtype=torch.uint8, device=device)
    kernel = prefetch._kernel()
    results = {"device": torch.cuda.get_device_name(device)}
    for name, (n, k) in {"o": (4096, 4096), "gate_up": (28672, 4096)}.items():
        qweight, scales, offsets = quantize_groupwise(torch.randn(n, k, device=device, dtype=torch.bfloat16), 128)
        scales, offsets = group_major(scales), group_major(offsets)
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)

        def gemv():
            quant_linear_triton(x, qweight, scales, offsets, 128, None)

        def fetch(part):
            nbytes = qweight.numel() // part // 16 * 16
            args = [qweight.data_ptr(), nbytes] + [qweight.data_ptr(), 0] * 3
            return lambda: kernel[(prefetch.PROGRAMS,)](*args, CHUNK=prefetch.CHUNK, BLOCK=128, num_warps=4)

        for variant, before in {"none": lambda: None, "prefetch_all": fetch(1), "prefetch_half": fetch(2),
                                "gemv_before": gemv}.items():
            def reps(with_gemv):
                for _ in range(REPS):
                    flush.add_(1)
                    before()
                    torch.cuda._sleep(30000)
                    if with_gemv:
                        gemv()
            with_, without = graph_us(lambda: reps(True), REPS), graph_us(lambda: reps(False), REPS)
            results[f"{name}_{variant}"] = {"gemv_us": with_ - without, "step_us": with_, "without_gemv_us": without}
            print(f"{name:8s} {variant:14s} GEMV {with_ - without:6.2f} us  (step {with_:.1f}, without the GEMV "
                  f"{without:.1f})", flush=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
