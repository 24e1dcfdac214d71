"""The host's critical path in a speculative step (dummy 8B, batch 1, k = 4, oracle proposer): from the moment
verification's result reaches the host to the replay call of the next step's graph, and the pieces on it; then
alternatives for the step's metadata copy. Device only."""
import time
from collections import defaultdict

import torch

from tuili import LLM, SamplingParams
from tuili.bench.spec import ReplayProposer

llm = LLM(model="llama-3.1-8b", load_format="dummy", speculative_method="ngram", gpu_memory_utilization=0.5,
          max_num_seqs=8)
eng = llm.engine
marks = defaultdict(list)


def mark(obj, name, tag):
    fn = getattr(obj, name)

    def wrapped(*a, **kw):
        marks[tag + ">"].append(time.perf_counter())
        out = fn(*a, **kw)
        marks[tag + "<"].append(time.perf_counter())
        return out
    setattr(obj, name, wrapped)


prompt = torch.randint(0, 128256, (64,), generator=torch.Generator().manual_seed(0)).tolist()
sp = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
ref = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
eng.proposer = ReplayProposer([prompt], [ref], 128256)
for obj, name, tag in ((eng.runner.sampler, "verify", "verify"), (eng, "_collect", "collect"),
                       (eng.scheduler, "schedule", "schedule"), (eng.proposer, "propose", "propose"),
                       (eng.runner, "_metadata", "metadata"), (eng.runner.graphs, "run", "graph"),
                       (eng, "step", "step")):
    mark(obj, name, tag)
graph = eng.runner.graphs.graphs[5, 1]
replay = graph.replay
graph.replay = lambda: (marks["replay"].append(time.perf_counter()), replay())
for _ in range(2):
    marks.clear()
    eng.add_request("p", prompt, sp)
    while eng.has_unfinished_requests():
        eng.step()
n = len(marks["replay"]) - 1
v_end, rep = marks["verify<"], marks["replay"]
# verification i ends, then replay i + 1 (the verify list has one entry per verification step)
path = [rep[i + 1] - v_end[i] for i in range(min(n, len(v_end) - 1))]
print(f"{n} verification steps; host path from verify's result to the next replay: "
      f"mean {1e3 * sum(path) / len(path):.3f} ms, min {1e3 * min(path):.3f} ms")
for tag in ("verify", "collect", "step", "schedule", "propose", "metadata", "graph"):
    d = [b - a for a, b in zip(marks[tag + ">"], marks[tag + "<"])]
    print(f"  {tag:10s} {1e3 * sum(d) / len(d):.3f} ms per call ({len(d)} calls)")
# segments between the marks, averaged: verify< -> collect> -> collect< -> step< -> step> -> schedule ... -> replay
order = ["verify<", "collect>", "collect<", "step<", "step>", "schedule>", "schedule<", "propose>", "propose<",
         "metadata>", "metadata<", "graph>", "replay"]
seg = defaultdict(float)
count = 0
for i in range(len(v_end) - 1):
    t = v_end[i]
    times = {"verify<": t}
    for m in order[1:]:
        later = [x for x in marks[m] if x > t]
        if not later:
            break
        times[m] = t = later[0]
    else:
        count += 1
        for a, b in zip(order, order[1:]):
            seg[f"{a} -> {b}"] += times[b] - times[a]
print("segments of the path (ms, mean):")
for k, v in seg.items():
    print(f"  {k:28s} {1e3 * v / count:.3f}")

dev = torch.device("cuda")
data = list(range(200))


def t(fn, n=2000):
    fn(); torch.cuda.synchronize(); s = time.perf_counter()
    for _ in range(n):
        fn()
    e = time.perf_counter(); torch.cuda.synchronize()
    return 1e6 * (e - s) / n


pinned = torch.empty(4096, dtype=torch.int32, pin_memory=True)
print("metadata copy, host us per call:")
print(f"  tensor + pin_memory + to   {t(lambda: torch.tensor(data, dtype=torch.int32).pin_memory().to(dev, non_blocking=True)):.1f}")
print(f"  tensor + to (pageable)     {t(lambda: torch.tensor(data, dtype=torch.int32).to(dev, non_blocking=True)):.1f}")
print(f"  tensor(device=cuda)        {t(lambda: torch.tensor(data, dtype=torch.int32, device=dev)):.1f}")
print(f"  tensor -> pinned buf + to  {t(lambda: pinned[:200].copy_(torch.tensor(data, dtype=torch.int32)).to(dev, non_blocking=True)):.1f}")
print(f"  torch.tensor only          {t(lambda: torch.tensor(data, dtype=torch.int32)):.1f}")
