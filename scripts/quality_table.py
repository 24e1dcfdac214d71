"""Issue 6's quality table: perplexity, agreement with the unquantized model, size and CPU decode speed of every
weight format and KV cache dtype, for the default model and for a random model of the same shape.

    python scripts/make_gguf_variants.py --out /tmp/variants
    python scripts/quality_table.py --variants /tmp/variants --out docs/benchmarks [--max-tokens 16384]
    python scripts/quality_table.py --variants /tmp/variants --out docs/benchmarks --speed-only   # idle machine

Perplexity: `tuili eval ppl`'s computation on the first --max-tokens tokens of the shipped prose (windows of
1024). Agreement: `tuili eval agreement`'s (tuili/bench/quality.py) against the fp32 reference. Speed: batch-1
decode of 128 tokens after the chat prompt, best of 2 (--speed-only: best of 3, re-measured alone, since the
other measurements take minutes and the machine may not stay idle). Prints a markdown table; writes
quality_<model>.json. (Before 9f9918f, INT8-group layers (Q8_0, Q6_K) also kept a float copy on the CPU, which the
weights column did not count; tuili's int8_gemv reads them now.)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch

from tuili import LLM
from tuili.bench.latency import CHAT_PROMPT, time_tuili
from tuili.bench.perplexity import DEFAULT_TEXT, perplexity
from tuili.bench.quality import agreement, prompt_ids
from tuili.loader.source import default_model_path


def weight_bytes(llm: LLM) -> int:
    seen, total = set(), 0
    for p in llm.engine.model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def measure(name: str, kwargs: dict, reference: LLM, text_ids: list[int], prompts: list[list[int]],
            chat: list[int], file: str | None) -> dict:
    start = time.perf_counter()
    llm = LLM(**kwargs)
    ppl, count = perplexity(llm, text_ids, 1024)
    row = {"name": name, "engine_args": kwargs, "perplexity": ppl, "tokens_scored": count,
           **agreement(reference, llm, prompts), "weight_MB": weight_bytes(llm) / 1e6,
           "kv_bytes_per_token": llm.engine.runner.bytes_per_block() // llm.engine.cache_config.block_size,
           "file_MB": os.path.getsize(file) / 1e6 if file else None,
           "decode_tok_s": time_tuili(llm, [chat], 128, 2)["decode_tok_s"]}
    row["seconds"] = time.perf_counter() - start
    del llm
    gc.collect()
    return row


def table(rows: list[dict]) -> str:
    ref = rows[0]["perplexity"]
    lines = ["| weights / KV cache | perplexity | vs reference | top-1 agreement | identical answers | weights MB | "
             "KV bytes/token | decode tok/s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['perplexity']:.3f} | {100 * (r['perplexity'] / ref - 1):+.2f}% | "
                     f"{100 * r['top1_agreement']:.1f}% | {100 * r['exact_answers']:.0f}% | {r['weight_MB']:.0f} | "
                     f"{r['kv_bytes_per_token']} | {r['decode_tok_s']:.1f} |")
    return "\n".join(lines)


def remeasure_speed(ns: argparse.Namespace) -> None:
    chat = None
    for key in ("default", "random"):
        if ns.only and key != ns.only:
            continue
        path = os.path.join(ns.out, f"quality_{key}.json")
        with open(path) as f:
            report = json.load(f)
        for row in report["rows"]:
            llm = LLM(**row["engine_args"])
            if chat is None:
                chat = LLM(default_model_path(), kv_cache_memory=0.01).encode_chat(
                    [{"role": "user", "content": CHAT_PROMPT}])
            row["decode_tok_s"] = time_tuili(llm, [chat], 128, 3)["decode_tok_s"]
            print(f"{key}: {row['name']}: {row['decode_tok_s']:.1f} tok/s", flush=True)
            del llm
            gc.collect()
        report["speed_remeasured_alone"] = True
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        print(table(report["rows"]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", required=True, help="folder of scripts/make_gguf_variants.py's files")
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--only", default=None, help="default | random")
    parser.add_argument("--speed-only", action="store_true",
                        help="re-measure decode tok/s of the rows in the JSON files (on an otherwise idle machine)")
    ns = parser.parse_args()
    if ns.speed_only:
        return remeasure_speed(ns)
    torch.manual_seed(0)
    path = default_model_path()
    stem = os.path.basename(path).rsplit(".", 2)[0]
    common = dict(kv_cache_memory=0.25)
    reference = LLM(path, dtype="float32", gguf_dequantize=True, **common)
    tokenizer = reference.get_tokenizer()
    with open(DEFAULT_TEXT, encoding="utf-8") as f:
        text_ids = tokenizer.encode(f.read(), add_special_tokens=False)[:ns.max_tokens]
    prompts = prompt_ids(reference)
    chat = reference.encode_chat([{"role": "user", "content": CHAT_PROMPT}])

    models = {
        "default": (reference, [
            ("Q4_1 dequantized (`--gguf-dequantize`), fp32: the reference", dict(path=path, dtype="float32",
                                                                                gguf_dequantize=True), path),
            ("Q4_1 dequantized, bf16", dict(path=path, gguf_dequantize=True), path),
            ("Q4_1 kept packed (the default: INT4 g32 offsets)", dict(path=path), path),
            ("INT8 per channel (`--quantization int8`)", dict(path=path, quantization="int8"), None),
            ("INT4 g128 offsets (`--quantization int4`)", dict(path=path, quantization="int4"), None),
            ("INT4 g32 offsets", dict(path=path, quantization="int4", quant_group_size=32), None),
            *[(f"GGUF {v} kept packed", dict(path=os.path.join(ns.variants, f"{stem}.{v}.gguf")),
               os.path.join(ns.variants, f"{stem}.{v}.gguf")) for v in ("Q8_0", "Q6_K", "Q4_K_M", "Q4_K", "Q4_0")],
            ("Q4_1 packed + FP8 KV cache (`--kv-cache-dtype fp8`)", dict(path=path, kv_cache_dtype="fp8"), None),
            ("Q4_1 packed + INT8 KV cache (`--kv-cache-dtype int8`)", dict(path=path, kv_cache_dtype="int8"), None),
        ]),
    }
    dummy = dict(path="smollm2-135m", load_format="dummy", seed=0)
    random_ref = None if ns.only == "default" else LLM("smollm2-135m", load_format="dummy", seed=0, dtype="float32",
                                                       **common)
    models["random"] = (random_ref, [
        ("random weights, fp32: the reference", dict(dummy, dtype="float32"), None),
        ("bf16", dict(dummy), None),
        ("INT8 per channel", dict(dummy, quantization="int8"), None),
        ("INT4 g128 offsets", dict(dummy, quantization="int4"), None),
        ("INT4 g32 offsets", dict(dummy, quantization="int4", quant_group_size=32), None),
        ("bf16 + FP8 KV cache", dict(dummy, kv_cache_dtype="fp8"), None),
        ("bf16 + INT8 KV cache", dict(dummy, kv_cache_dtype="int8"), None),
    ])
    for key, (ref, rows) in models.items():
        if ns.only and key != ns.only:
            continue
        results = []
        for name, kwargs, file in rows:
            kwargs = {"model": kwargs.pop("path"), **kwargs, **common}
            results.append(measure(name, kwargs, ref, text_ids, prompts, chat, file))
            r = results[-1]
            print(f"{key}: {name}: ppl {r['perplexity']:.3f}, top-1 {r['top1_agreement']:.3f}, "
                  f"{r['decode_tok_s']:.1f} tok/s ({r['seconds']:.0f} s)", flush=True)
        with open(os.path.join(ns.out, f"quality_{key}.json"), "w") as f:
            json.dump({"max_tokens": ns.max_tokens, "device": "cpu", "threads": torch.get_num_threads(),
                       "rows": results}, f, indent=2)
        print(table(results), flush=True)


if __name__ == "__main__":
    main()
