"""Issue 7's pipeline report: teacher vs pruned vs distilled, on the text the distillation held out.

    tuili prune --ratio 0.5 --out P && tuili distill --student P --out D --steps 250 --lr 8e-4
    python scripts/compress_report.py --pruned P --distilled D --json docs/benchmarks/compress_smollm2.json

Perplexity on the held-out tail of the shipped prose (the last 5% of its 256-token windows, which `tuili distill`
never trains on), top-1 agreement with the teacher over the fixed prompts (tuili/bench/quality.py), parameters,
file size, and batch-1 CPU decode speed (bf16; the teacher also as shipped, Q4_1 kept packed).
"""
from __future__ import annotations

import argparse
import gc
import json
import os

from safetensors.torch import load_file

from tuili import LLM
from tuili.bench.latency import CHAT_PROMPT, time_tuili
from tuili.bench.perplexity import perplexity
from tuili.bench.quality import agreement, prompt_ids
from tuili.compress.common import text_token_ids
from tuili.loader.source import default_model_path


def folder_params(path: str) -> int:
    return sum(t.numel() for t in load_file(os.path.join(path, "model.safetensors")).values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pruned", required=True)
    parser.add_argument("--distilled", required=True)
    parser.add_argument("--seq-len", type=int, default=256, help="the distillation's window (its held-out split)")
    parser.add_argument("--json", required=True)
    ns = parser.parse_args()
    teacher_path = default_model_path()
    reference = LLM(teacher_path, dtype="float32", gguf_dequantize=True, kv_cache_memory=0.1)
    ids = text_token_ids(reference.get_tokenizer())
    windows = len(ids) // ns.seq_len
    held = max(1, windows // 20)
    tail = ids[(windows - held) * ns.seq_len:windows * ns.seq_len]
    prompts = prompt_ids(reference)
    chat = reference.encode_chat([{"role": "user", "content": CHAT_PROMPT}])
    teacher_params = sum(p.numel() for p in reference.engine.model.parameters())
    rows = []
    for name, kwargs, params, file in [
        ("teacher, as shipped (Q4_1 kept packed)", dict(model=teacher_path), teacher_params, teacher_path),
        ("teacher, dequantized to bf16", dict(model=teacher_path, gguf_dequantize=True), teacher_params, None),
        ("pruned to half (tuili prune --ratio 0.5)", dict(model=ns.pruned), folder_params(ns.pruned),
         os.path.join(ns.pruned, "model.safetensors")),
        ("pruned + distilled (tuili distill)", dict(model=ns.distilled), folder_params(ns.distilled),
         os.path.join(ns.distilled, "model.safetensors")),
        ("pruned + distilled, --quantization int8", dict(model=ns.distilled, quantization="int8"),
         folder_params(ns.distilled), None),
    ]:
        llm = LLM(**kwargs, kv_cache_memory=0.1)
        ppl, count = perplexity(llm, tail, ns.seq_len)
        row = {"name": name, "engine_args": kwargs, "params": params, "bf16_MB": 2 * params / 1e6,
               "file_MB": os.path.getsize(file) / 1e6 if file else None, "heldout_ppl": ppl, "tokens_scored": count,
               **agreement(reference, llm, prompts), "decode_tok_s": time_tuili(llm, [chat], 128, 3)["decode_tok_s"]}
        rows.append(row)
        print(f"{name}: {params:,} params, ppl {ppl:.2f}, top-1 {row['top1_agreement']:.1%}, "
              f"{row['decode_tok_s']:.1f} tok/s", flush=True)
        del llm
        gc.collect()
    with open(os.path.join(ns.distilled, "distill.json")) as f:
        distill = json.load(f)
    report = {"rows": rows, "heldout_tokens": len(tail), "distill": {k: v for k, v in distill.items()
                                                                      if k != "train_kl"}}
    with open(ns.json, "w") as f:
        json.dump(report, f, indent=2)
    print("| model | parameters | file MB | held-out perplexity | top-1 agreement | identical answers | "
          "decode tok/s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        file = f"{r['file_MB']:.0f}" if r["file_MB"] else "-"
        print(f"| {r['name']} | {r['params'] / 1e6:.1f} M | {file} | {r['heldout_ppl']:.2f} | "
              f"{100 * r['top1_agreement']:.1f}% | {100 * r['exact_answers']:.0f}% | {r['decode_tok_s']:.1f} |")


if __name__ == "__main__":
    main()
