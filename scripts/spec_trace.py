"""Where the GPU waits during speculative decoding (dummy 8B, batch 1, k = 4, the replay proposer at acceptance 1):
the host phases of each step are labelled, and every interval in which no GPU kernel or copy runs is charged to
the labels the host was inside then. Device only.

usage: python scripts/spec_trace.py [shape] [--plain]   (--plain: the same for plain decoding, async scheduling)"""
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from tuili import LLM, SamplingParams
from tuili.bench.spec import ReplayProposer

shape = next((a for a in sys.argv[1:] if not a.startswith("--")), "llama-3.1-8b")
plain = "--plain" in sys.argv
llm = LLM(model=shape, load_format="dummy", speculative_method="ngram", gpu_memory_utilization=0.5, max_num_seqs=8)
eng = llm.engine


def label(obj, name, tag):
    fn = getattr(obj, name)

    def wrapped(*a, **kw):
        with record_function(tag):
            return fn(*a, **kw)
    setattr(obj, name, wrapped)


runner = eng.runner
for obj, name in ((eng, "step"), (eng, "_collect"), (eng, "_launch"), (eng.scheduler, "schedule"),
                  (runner, "finish"), (runner, "_metadata"), (runner, "_forward"), (runner.sampler, "verify"),
                  (runner.sampler, "__call__"), (eng, "make_output"), (eng, "_append_token")):
    label(obj, name, f"{type(obj).__name__}.{name}")
if runner.graphs is not None:
    label(runner.graphs, "run", "graphs.run")
    for key, graph in runner.graphs.graphs.items():
        label(graph, "replay", "cudaGraph.replay")
label(eng.model, "compute_logits", "compute_logits")

prompt = torch.randint(0, eng.model_config.vocab_size, (64,), generator=torch.Generator().manual_seed(0)).tolist()
sp = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
ref = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
if plain:
    eng.proposer = None
else:
    eng.proposer = ReplayProposer([prompt], [ref], eng.model_config.vocab_size)
    label(eng.proposer, "propose", "propose")
llm.generate([prompt], sp, use_tqdm=False)
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    torch.cuda.synchronize()
    start = time.perf_counter()
    llm.generate([prompt], sp, use_tqdm=False)
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
steps = eng.spec_stats.steps if not plain else 64
events = prof.events()
gpu = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
cpu = [(e.name, e.time_range.start, e.time_range.end) for e in events
       if e.device_type == torch.autograd.DeviceType.CPU and "." in e.name or e.name in ("propose", "compute_logits")]
busy, idle = 0.0, []
cur_s, cur_e = gpu[0]
for s, e in gpu[1:]:
    if s > cur_e:
        busy += cur_e - cur_s
        if s - cur_e > 2:
            idle.append((cur_e, s))
        cur_s, cur_e = s, e
    else:
        cur_e = max(cur_e, e)
busy += cur_e - cur_s
charged = defaultdict(float)
for s, e in idle:
    for name, cs, ce in cpu:
        overlap = min(e, ce) - max(s, cs)
        if overlap > 0:
            charged[name] += overlap
total_idle = sum(e - s for s, e in idle)
mode = "plain decoding (async)" if plain else "speculative, k = 4, acceptance 1"
print(f"== {shape}, batch 1, {mode}: {steps} steps, {1e3 * wall / steps:.3f} ms/step wall, "
      f"GPU busy {busy / 1e3 / steps:.3f} ms/step, idle {total_idle / 1e3 / steps:.3f} ms/step "
      f"in {len(idle)} gaps > 2 us")
print("GPU idle time charged to each host label it overlaps (labels nest; ms per step):")
for name, t in sorted(charged.items(), key=lambda kv: -kv[1]):
    print(f"  {name:32s} {t / 1e3 / steps:.3f}")
print("largest gaps (us) and the innermost label at their start:")
for s, e in sorted(idle, key=lambda g: g[0] - g[1])[:12]:
    inside = [(cs, name) for name, cs, ce in cpu if cs <= s < ce]
    print(f"  {e - s:8.1f}  {max(inside)[1] if inside else '-'}")
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=50))
