"""`tuili bench throughput`: the offline workload (256 requests, prompt and output lengths uniform in
[100, 1024], seed 0, ignore EOS, all submitted at once), with the roofline time of every engine step and
HF transformers' static batches on the same weights as the peer."""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from tuili.bench.latency import hf_reference_model
from tuili.bench.roofline import (environment, kv_bytes_per_token, matmul_params, measure_bandwidth,
                                  measure_matmul_rate, sync, weight_bytes)
from tuili.config import EngineArgs
from tuili.engine.llm import LLM
from tuili.sampling_params import SamplingParams


def workload(num: int, low: int, high: int, vocab: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    gen = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(low, high + 1, (num,), generator=gen).tolist()
    output_lens = torch.randint(low, high + 1, (num,), generator=gen).tolist()
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in prompt_lens]
    return prompts, output_lens


def run_throughput(ns: argparse.Namespace, engine_args: EngineArgs) -> int:
    llm = LLM(**dataclasses.asdict(engine_args))
    engine = llm.engine
    model, device, dtype = engine.model, engine.device, engine.dtype
    prompts, output_lens = workload(ns.num_requests, ns.min_len, ns.max_len, engine.model_config.vocab_size)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in output_lens]
    bandwidth = measure_bandwidth(device)
    matmul_rate = measure_matmul_rate(device, dtype)
    llm.generate(prompts[:8], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)

    engine.step_log = steps = []
    sync(device)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=True)
    sync(device)
    wall = time.perf_counter() - start
    engine.step_log = None

    out_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    in_tokens = sum(len(p) for p in prompts)
    # roofline per step: max(bytes / bandwidth, FLOPs / matmul rate); bytes = weights + KV read + KV written
    w_bytes, kv_tok, n_params = weight_bytes(model), kv_bytes_per_token(model, dtype), matmul_params(model)
    attn = model.layers[0].self_attn
    attn_flops_per_pair = 4.0 * len(model.layers) * attn.num_heads * attn.head_dim
    roofline = 0.0
    decode_time = decode_bytes = 0.0
    for s in steps:
        nbytes = w_bytes + kv_tok * (s.context_tokens + s.num_tokens)
        flops = 2.0 * n_params * s.num_tokens + attn_flops_per_pair * s.attention_pairs
        roofline += max(nbytes / bandwidth, flops / matmul_rate)
        if s.num_tokens == s.num_seqs:  # pure decode step
            decode_time += s.seconds
            decode_bytes += nbytes
    decode_steps = [s for s in steps if s.num_tokens == s.num_seqs]
    report = {
        "workload": "throughput", **environment(device), "model": engine.model_name,
        "dtype": str(dtype).removeprefix("torch."), "num_requests": ns.num_requests,
        "length_range": [ns.min_len, ns.max_len], "engine_args": dataclasses.asdict(engine_args),
        "bandwidth_GB_s": bandwidth / 1e9, "matmul_TFLOP_s": matmul_rate / 1e12,
        "tuili": {
            "wall_s": wall, "output_tokens": out_tokens, "input_tokens": in_tokens,
            "output_tok_s": out_tokens / wall, "total_tok_s": (out_tokens + in_tokens) / wall,
            "steps": len(steps), "peak_kv_blocks": max(s.blocks_used for s in steps),
            "kv_blocks": engine.cache_config.num_blocks, "preemptions": engine.scheduler.num_preemptions,
            "mean_decode_batch": sum(s.num_seqs for s in decode_steps) / max(1, len(decode_steps)),
            "decode_mbu": decode_bytes / max(decode_time, 1e-9) / bandwidth,
            "roofline_s": roofline, "efficiency": roofline / wall,
        },
    }
    r = report["tuili"]
    print(f"device {report['device']}: copy {bandwidth / 1e9:.0f} GB/s, matmul {matmul_rate / 1e12:.0f} TFLOP/s")
    print(f"tuili: {ns.num_requests} requests in {wall:.1f} s: {r['output_tok_s']:.0f} output tok/s, "
          f"{r['total_tok_s']:.0f} total tok/s; mean decode batch {r['mean_decode_batch']:.0f}, decode MBU "
          f"{100 * r['decode_mbu']:.0f}%; roofline {roofline:.1f} s = {100 * r['efficiency']:.0f}% efficiency; "
          f"peak KV blocks {r['peak_kv_blocks']}/{r['kv_blocks']}, {r['preemptions']} preemptions")
    from tuili.bench.plot import save_report, throughput_plot

    save_report(report, ns.json, ns.plot, throughput_plot)  # saved now: the peer below may run out of time
    if ns.hf_batch_size:
        hf = hf_reference_model(llm)
        report["hf_transformers"] = {}
        for bs in ns.hf_batch_size:
            try:
                report["hf_transformers"][bs] = rate = hf_static_batch(hf, prompts, output_lens, bs, device)
            except torch.OutOfMemoryError:
                report["hf_transformers"][bs] = {"error": "out of memory"}
                print(f"HF transformers static batch {bs}: out of memory")
                torch.cuda.empty_cache()
                continue
            print(f"HF transformers static batch {bs}: {rate['output_tok_s']:.0f} output tok/s "
                  f"({rate['requests']} requests)")
            best = max(v.get("output_tok_s", 0) for v in report["hf_transformers"].values())
            report["ratio_to_hf_best_static"] = r["output_tok_s"] / best
            print(f"tuili / HF best static batch so far: {report['ratio_to_hf_best_static']:.1f}x")
            save_report(report, ns.json, None, None)
    return 0


@torch.no_grad()
def hf_static_batch(model, prompts: list[list[int]], output_lens: list[int], batch_size: int,
                    device: torch.device) -> dict:
    """HF generate on the first batch of the workload: prompts left-padded to the longest, every sequence
    generating the batch's longest output (a static batch cannot retire requests early), useful tokens counted."""
    batch = prompts[:batch_size]
    outs = output_lens[:batch_size]
    width = max(len(p) for p in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(batch):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    sync(device)
    start = time.perf_counter()
    model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=max(outs),
                   min_new_tokens=max(outs), do_sample=False, pad_token_id=0, eos_token_id=None)
    sync(device)
    wall = time.perf_counter() - start
    return {"requests": len(batch), "wall_s": wall, "output_tok_s": sum(outs) / wall}
