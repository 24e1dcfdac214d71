"""Where a batch-1 decode step's time goes on the GPU: torch.profiler over a few steps of a dummy model.

usage: python scripts/profile_decode.py [shape] [batch] [int8|int4]   (the kernel table, GPU-busy vs wall time)"""
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from tuili import LLM, SamplingParams

shape = sys.argv[1] if len(sys.argv) > 1 else "llama-3.2-1b"
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 1
quantization = sys.argv[3] if len(sys.argv) > 3 else None
for mode in ("on", "off") if quantization is None else ("on",):
    llm = LLM(shape, load_format="dummy", gpu_memory_utilization=0.5, max_num_seqs=8, async_scheduling=mode,
              quantization=quantization)
    engine = llm.engine
    prompts = [[7] * 128 for _ in range(batch)]
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    for _ in range(20):  # prefill and a few decode steps before measuring
        engine.step()
    steps = 64
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"== {shape} batch {batch} async_scheduling={mode}: {1e3 * wall / steps:.3f} ms/step wall, "
          f"{gpu_us / 1e3 / steps:.3f} ms/step of GPU kernels ({100 * gpu_us / 1e6 / wall:.0f}% busy)")
    print(events.table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
    for i in range(batch):
        engine.abort_request(f"r{i}")
    del llm, engine
    torch.cuda.empty_cache()
