"""Where a verification step's time goes (dummy 8B, batch 1, k = 4): the decode and verification graphs replayed
alone, the LM head for 1 and 5 rows, then a torch and a Python profile of a replay-proposer generation. Device only."""
import time, torch
from tuili import LLM, SamplingParams
from tuili.bench.spec import ReplayProposer
llm = LLM(model="llama-3.1-8b", load_format="dummy", speculative_method="ngram", gpu_memory_utilization=0.5,
          max_num_seqs=8)
eng = llm.engine
g = eng.runner.graphs
def t_replay(key, n=200):
    torch.cuda.synchronize(); s = time.perf_counter()
    for _ in range(n): g.graphs[key].replay()
    torch.cuda.synchronize(); return (time.perf_counter() - s) / n * 1e3
print("graph replay ms: decode", round(t_replay((1, 1)), 3), "verify(q=5)", round(t_replay((5, 1)), 3))
h = torch.randn(5, 4096, device="cuda", dtype=torch.bfloat16)
for rows in (1, 5):
    torch.cuda.synchronize(); s = time.perf_counter()
    for _ in range(200): eng.model.compute_logits(h[:rows])
    torch.cuda.synchronize(); print("lm head rows", rows, round((time.perf_counter() - s) / 200 * 1e3, 3), "ms")
prompt = torch.randint(0, 128256, (64,), generator=torch.Generator().manual_seed(0)).tolist()
sp = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
ref = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
eng.proposer = ReplayProposer([prompt], [ref], 128256)
from torch.profiler import profile, ProfilerActivity
llm.generate([prompt], sp, use_tqdm=False)
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    llm.generate([prompt], sp, use_tqdm=False)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
import cProfile, pstats
pr = cProfile.Profile(); pr.enable(); llm.generate([prompt], sp, use_tqdm=False); pr.disable()
pstats.Stats(pr).sort_stats("cumulative").print_stats(35)
