"""`tuili bench latency`: batch-B decode speed and prefill time, against the memory roofline and HF transformers
run on the same weights in the same process (workloads 1 and 5 of BENCHMARKS.md)."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import time

import torch

from tuili.bench.roofline import (attention_flops, environment, kv_bytes_per_token, matmul_params,
                                  measure_bandwidth, measure_matmul_rate, sync, weight_bytes)
from tuili.config import EngineArgs
from tuili.engine.llm import LLM
from tuili.sampling_params import SamplingParams

CHAT_PROMPT = "Write a short story about a dragon who learns to read."


def time_tuili(llm: LLM, prompts: list[list[int]], output_len: int, repeats: int, temperature: float = 0.0,
               top_p: float = 1.0) -> dict:
    params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    best = None
    for _ in range(repeats):
        outs = llm.generate(prompts, params, use_tqdm=False)
        first = max(o.metrics.first_token_time for o in outs)
        start = min(o.metrics.arrival_time for o in outs)
        end = max(o.metrics.finish_time for o in outs)
        run = {"ttft_s": first - start, "decode_s": end - first}
        if best is None or run["decode_s"] < best["decode_s"]:
            best = run
    steps = output_len - 1
    return {**best, "decode_tok_s": len(prompts) * steps / best["decode_s"],
            "ms_per_step": 1e3 * best["decode_s"] / steps}


def hf_reference_model(llm: LLM):
    """HF transformers' model with the very weights tuili runs (GGUF or folder loaded by HF; dummy copied)."""
    from transformers import AutoModelForCausalLM

    engine = llm.engine
    name = engine.model_name
    if engine.args.load_format != "dummy" and name.endswith(".gguf"):
        folder, file = os.path.split(name)
        # HF keeps GGUF weights packed and computes in float32: its fastest setting whatever tuili's dtype
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    elif engine.args.load_format != "dummy":
        model = AutoModelForCausalLM.from_pretrained(name, dtype=engine.dtype, local_files_only=True)
    else:
        with torch.device(engine.device):
            model = AutoModelForCausalLM.from_config(engine.model_config, dtype=engine.dtype)
        model.load_state_dict(engine.model.hf_state_dict(), strict=False)
    return model.to(engine.device).eval()


@torch.no_grad()
def time_hf(model, prompts: list[list[int]], output_len: int, repeats: int, device: torch.device,
            temperature: float = 0.0, top_p: float = 1.0) -> dict:
    """HF generate, greedy (or sampled: temperature, top_p, no top-k), fixed length; TTFT from a 1-token
    generate, decode rate from the rest."""
    ids = torch.tensor(prompts, device=device)
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)

    def run(n: int) -> float:
        sync(device)
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        sync(device)
        return time.perf_counter() - start

    run(4)
    ttft = min(run(1) for _ in range(repeats))
    total = min(run(output_len) for _ in range(repeats))
    steps = output_len - 1
    return {"ttft_s": ttft, "decode_s": total - ttft, "decode_tok_s": len(prompts) * steps / (total - ttft),
            "ms_per_step": 1e3 * (total - ttft) / steps}


def time_llama_cpp(path: str, prompt: list[int], output_len: int, repeats: int, threads: int,
                   temperature: float = 0.0, top_p: float = 1.0) -> dict:
    """llama.cpp through llama-cpp-python (installed in the benchmark's environment only: tuili does not depend
    on it) on the same GGUF file, batch 1 on the CPU with as many threads as torch: the same prompt tokens,
    greedy (or sampled as tuili: temperature, top_p, no top-k or min-p), output_len tokens whatever they are; TTFT
    to the first token, decode rate from the rest."""
    from llama_cpp import Llama

    model = Llama(model_path=path, n_ctx=len(prompt) + output_len + 16, n_batch=512, n_threads=threads,
                  n_threads_batch=threads, verbose=False)

    sampling = dict(top_k=1, temp=0.0) if temperature == 0 else \
        dict(top_k=0, top_p=top_p, min_p=0.0, temp=temperature, repeat_penalty=1.0)

    def run(n: int) -> tuple[float, float]:
        model.reset()  # no prompt reuse between runs
        start = time.perf_counter()
        for i, _ in enumerate(model.generate(prompt, **sampling)):
            if i == 0:
                first = time.perf_counter()
            if i + 1 == n:
                break
        return first - start, time.perf_counter() - first

    run(4)
    ttft, decode = min((run(output_len) for _ in range(repeats)), key=lambda r: r[1])
    steps = output_len - 1
    return {"ttft_s": ttft, "decode_s": decode, "decode_tok_s": steps / decode, "ms_per_step": 1e3 * decode / steps,
            "threads": threads}


def run_latency(ns: argparse.Namespace, engine_args: EngineArgs) -> int:
    if ns.llama_cpp and ns.batch_size != 1:
        raise ValueError("--llama-cpp times batch 1 only")
    if ns.llama_cpp and importlib.util.find_spec("llama_cpp") is None:
        raise ValueError("--llama-cpp needs llama-cpp-python in this environment (pip install llama-cpp-python; "
                         "tuili does not depend on it)")
    llm = LLM(**dataclasses.asdict(engine_args))
    engine = llm.engine
    if ns.llama_cpp and (engine.args.load_format == "dummy" or not engine.model_name.endswith(".gguf")):
        raise ValueError("--llama-cpp needs a GGUF model file (the default model is one)")
    if ns.input_len is None:
        if engine.tokenizer is None:
            raise ValueError("this model has no tokenizer: give --input-len")
        prompt = llm.encode_chat([{"role": "user", "content": CHAT_PROMPT}])
        prompts = [prompt] * ns.batch_size
    else:
        gen = torch.Generator().manual_seed(0)
        vocab = engine.model_config.vocab_size
        prompts = torch.randint(0, vocab, (ns.batch_size, ns.input_len), generator=gen).tolist()
    input_len = len(prompts[0])
    model, device = engine.model, engine.device
    bandwidth = measure_bandwidth(device)
    matmul_rate = measure_matmul_rate(device, engine.dtype)
    sampling = dict(temperature=ns.temperature, top_p=ns.top_p)
    ours = time_tuili(llm, prompts, ns.output_len, ns.repeats, **sampling)
    # decode: bytes per step at the mean context; prefill: FLOPs of the whole batch of prompts
    step_bytes = weight_bytes(model) + kv_bytes_per_token(model, engine.dtype) * ns.batch_size * (
        input_len + ns.output_len // 2)
    prefill_flops = ns.batch_size * (2.0 * matmul_params(model) * input_len
                                     + attention_flops(model, input_len, input_len))
    ours["achieved_GB_s"] = step_bytes / (ours["ms_per_step"] / 1e3) / 1e9
    ours["mbu"] = ours["achieved_GB_s"] * 1e9 / bandwidth
    ours["prefill_TFLOP_s"] = prefill_flops / ours["ttft_s"] / 1e12
    ours["prefill_mfu"] = prefill_flops / ours["ttft_s"] / matmul_rate
    report = {
        "workload": "latency", **environment(device), "model": engine.model_name,
        "dtype": str(engine.dtype).removeprefix("torch."), "batch_size": ns.batch_size, "input_len": input_len,
        "output_len": ns.output_len, "sampling": sampling, "engine_args": dataclasses.asdict(engine_args),
        "bandwidth_GB_s": bandwidth / 1e9, "matmul_TFLOP_s": matmul_rate / 1e12,
        "decode_floor_tok_s": ns.batch_size * bandwidth / step_bytes, "tuili": ours,
    }
    print(f"device {report['device']}: copy {bandwidth / 1e9:.0f} GB/s, matmul {matmul_rate / 1e12:.1f} TFLOP/s; "
          f"model {engine.model_name} ({report['dtype']}), batch {ns.batch_size}, prompt {input_len}, "
          f"{ns.output_len} new tokens; decode floor {report['decode_floor_tok_s']:.0f} tok/s")
    _print_row("tuili", ours)
    if not ns.no_hf:
        hf_len = ns.hf_output_len or min(ns.output_len, 64)  # HF eager is slow; its rate is steady
        hf = time_hf(hf_reference_model(llm), prompts, hf_len, ns.repeats, engine.device, **sampling)
        hf["output_len"] = hf_len
        report["hf_transformers"] = hf
        report["speedup_vs_hf"] = ours["decode_tok_s"] / hf["decode_tok_s"]
        _print_row("HF transformers", hf)
        print(f"tuili decode is {report['speedup_vs_hf']:.2f}x HF transformers")
    if ns.llama_cpp:
        peer = time_llama_cpp(engine.model_name, prompts[0], ns.output_len, ns.repeats, torch.get_num_threads(),
                              **sampling)
        report["llama_cpp"] = peer
        report["ratio_vs_llama_cpp"] = ours["decode_tok_s"] / peer["decode_tok_s"]
        _print_row("llama.cpp", peer)
        print(f"tuili decode is {report['ratio_vs_llama_cpp']:.2f}x llama.cpp on the same file")
    from tuili.bench.plot import latency_plot, save_report

    save_report(report, ns.json, ns.plot, latency_plot)
    return 0


def _print_row(name: str, r: dict) -> None:
    decode = f", {r['achieved_GB_s']:.0f} GB/s, MBU {100 * r['mbu']:.0f}%" if "mbu" in r else ""
    prefill = f" = {r['prefill_TFLOP_s']:.1f} TFLOP/s, MFU {100 * r['prefill_mfu']:.0f}%" if "prefill_mfu" in r else ""
    print(f"  {name:16s} decode {r['decode_tok_s']:8.1f} tok/s ({r['ms_per_step']:.2f} ms/step{decode}); "
          f"prefill (TTFT) {1e3 * r['ttft_s']:.1f} ms{prefill}")
