"""Does the GPU start a CUDA graph before cudaGraphLaunch returns? Graphs of many short kernels, launched on an
idle GPU whole or in pieces: host time of the launch calls, and the time from the first call until the GPU is
done, against the graph's GPU time (back-to-back replays). Then the 8B decode graph the same way. Device only."""
import time

import torch


def timed(fn, n=50):
    fn(); torch.cuda.synchronize()
    launch = done = 0.0
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter(); fn(); t1 = time.perf_counter(); torch.cuda.synchronize(); t2 = time.perf_counter()
        launch += t1 - t0; done += t2 - t0
    return 1e3 * launch / n, 1e3 * done / n


def back_to_back(fn, n=50):
    fn(); torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0) / n


x = torch.zeros(1 << 20, device="cuda")
total = 640
for pieces in (1, 2, 4, 8):
    graphs = []
    for _ in range(pieces):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(total // pieces):
                x.mul_(1.0001).add_(1e-6)
        graphs.append(g)

    def run():
        for g in graphs:
            g.replay()
    launch, done = timed(run)
    gpu = back_to_back(run)
    print(f"synthetic {2 * total} kernels in {pieces} graph(s): launch calls {launch:.3f} ms, idle->done {done:.3f} ms, "
          f"back-to-back {gpu:.3f} ms/replay")

from tuili import LLM  # noqa: E402

llm = LLM(model="llama-3.1-8b", load_format="dummy", gpu_memory_utilization=0.5, max_num_seqs=8,
          speculative_method="ngram")
graphs = llm.engine.runner.graphs
for key in ((1, 1), (5, 1)):
    g = graphs.graphs[key]
    launch, done = timed(g.replay)
    print(f"8B graph {key}: launch call {launch:.3f} ms, idle->done {done:.3f} ms, "
          f"back-to-back {back_to_back(g.replay):.3f} ms/replay")

# the engine's speculative steps without a profiler: host time per phase (perf_counter), per step
from collections import defaultdict  # noqa: E402

from tuili import SamplingParams  # noqa: E402
from tuili.bench.spec import ReplayProposer  # noqa: E402

eng = llm.engine
spent = defaultdict(float)


def clock(obj, name, tag):
    fn = getattr(obj, name)

    def wrapped(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            spent[tag] += time.perf_counter() - t
    setattr(obj, name, wrapped)


prompt = torch.randint(0, 128256, (64,), generator=torch.Generator().manual_seed(0)).tolist()
sp = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
ref = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
for obj, name in ((eng, "step"), (eng, "_collect"), (eng, "_launch"), (eng.scheduler, "schedule"),
                  (eng.runner, "launch"), (eng.runner, "_forward"), (eng.runner, "finish"),
                  (eng.runner, "_metadata"), (eng.runner.graphs, "run"), (eng.runner.sampler, "verify"),
                  (eng.model, "compute_logits")):
    clock(obj, name, f"{type(obj).__name__}.{name}")
for mode in ("plain", "spec"):
    eng.proposer = ReplayProposer([prompt], [ref], 128256) if mode == "spec" else None
    eng.scheduler.config.speculative_disable_batch_size = 8 if mode == "spec" else 0  # plain: no lookahead
    if mode == "spec":
        clock(eng.proposer, "propose", "propose")
    llm.generate([prompt], sp, use_tqdm=False)
    eng.add_request("probe", prompt, sp)
    eng.step()  # the prefill, not counted
    torch.cuda.synchronize()
    spent.clear()
    s0 = eng.spec_stats.steps
    steps, t0 = 0, time.perf_counter()
    while eng.has_unfinished_requests():
        eng.step()
        steps += 1
    torch.cuda.synchronize(); wall = time.perf_counter() - t0
    print(f"{mode}: {steps} steps ({eng.spec_stats.steps - s0} verifications), {1e3 * wall / steps:.3f} ms/step")
    for tag, t in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"  {tag:28s} {1e3 * t / steps:.3f} ms/step")
