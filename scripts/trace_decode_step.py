"""A decode step's GPU timeline: batch 1 of a dummy model (default llama-3.1-8b) through the engine, 16 steps under
torch.profiler; prints wall vs traced time and writes one step's kernels in order (duration, gap to the previous
one's end: negative where PDL overlaps them) and their totals.

usage: python scripts/trace_decode_step.py int4|int8|none OUT.txt [shape] [--no-l2-prefetch]"""
import json
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from tuili import LLM, SamplingParams

args = [a for a in sys.argv[1:] if a != "--no-l2-prefetch"]
quant, out = args[0], args[1]
shape = args[2] if len(args) > 2 else "llama-3.1-8b"
llm = LLM(shape, load_format="dummy", gpu_memory_utilization=0.5, max_num_seqs=8,
          quantization=None if quant == "none" else quant, no_l2_prefetch="--no-l2-prefetch" in sys.argv)
engine = llm.engine
engine.add_request("r0", [7] * 128, SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
for _ in range(30):
    engine.step()
steps = 16
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps
prof.export_chrome_trace("/tmp/trace_decode_step.json")
with open("/tmp/trace_decode_step.json") as f:
    events = [e for e in json.load(f)["traceEvents"] if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
events.sort(key=lambda e: e["ts"])
busy, start, end = 0.0, None, None
for e in events:  # the union of the kernels' intervals
    if end is None or e["ts"] > end:
        busy += 0 if end is None else end - start
        start, end = e["ts"], e["ts"] + e["dur"]
    else:
        end = max(end, e["ts"] + e["dur"])
busy += end - start
span = events[-1]["ts"] + events[-1]["dur"] - events[0]["ts"]
lines = [f"{shape} {quant}: wall {wall * 1e3:.3f} ms/step (profiled); traced span {span / steps / 1e3:.3f} ms/step, "
         f"kernels busy {busy / steps / 1e3:.3f} ms/step, {len(events) / steps:.1f} kernels/step"]
n = len(events) // steps
prev_end, totals = None, {}
for e in events[-2 * n:-n]:  # one step, not the last
    gap = 0.0 if prev_end is None else e["ts"] - prev_end
    lines.append(f"{e['ts']:.1f} dur {e['dur']:7.2f} gap {gap:6.2f} {e['name'][:90]}")
    prev_end = max(prev_end or 0.0, e["ts"] + e["dur"])
    t = totals.setdefault(e["name"][:60], [0, 0.0])
    t[0] += 1
    t[1] += e["dur"]
lines.append("== totals over the step: calls, us, kernel")
lines += [f"{c:5d} {d:9.1f} us  {k}" for k, (c, d) in sorted(totals.items(), key=lambda t: -t[1][1])]
with open(out, "w") as f:
    f.write("\n".join(lines) + "\n")
print(lines[0])
