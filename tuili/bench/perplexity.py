"""`tuili eval ppl`: perplexity of a model (quantized or not) on a text file, through the engine itself.

The text is cut into windows of `context` tokens; in each window every token after the first is scored given
the ones before it (the engine's prompt logprobs), and perplexity = exp(-mean log-probability) over all
scored tokens. Windows do not overlap, so the figure is comparable across runs with the same --context.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time

from tuili.config import EngineArgs
from tuili.engine.llm import LLM
from tuili.sampling_params import SamplingParams

DEFAULT_TEXT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "prose.txt")


def perplexity(llm: LLM, token_ids: list[int], context: int) -> tuple[float, int]:
    """(perplexity, tokens scored) of `token_ids` in windows of `context` tokens."""
    if context < 2:
        raise ValueError(f"context must be >= 2 tokens, got {context}")
    windows = [token_ids[i:i + context] for i in range(0, len(token_ids), context)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise ValueError("the text is too short to score (fewer than 2 tokens)")
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    total, count = 0.0, 0
    for window, out in zip(windows, llm.generate(windows, params)):
        for pos in range(1, len(window)):
            total += out.prompt_logprobs[pos][window[pos]].logprob
            count += 1
    return math.exp(-total / count), count


def run_ppl(ns: argparse.Namespace, engine_args: EngineArgs) -> int:
    import json

    path = ns.file or DEFAULT_TEXT
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    llm = LLM(**dataclasses.asdict(engine_args))
    tokenizer = llm.get_tokenizer()
    if tokenizer is None:
        raise ValueError("this model has no tokenizer: perplexity on text needs one (--tokenizer)")
    ids = tokenizer.encode(text, add_special_tokens=False)
    if ns.max_tokens:
        ids = ids[:ns.max_tokens]
    context = min(ns.context, llm.engine.max_model_len - 1)
    start = time.perf_counter()
    ppl, count = perplexity(llm, ids, context)
    seconds = time.perf_counter() - start
    report = {"workload": "perplexity", "model": llm.engine.model_name, "text": os.path.basename(path),
              "dtype": str(llm.engine.dtype).removeprefix("torch."), "quantization": llm.engine.quantization,
              "context": context, "tokens_scored": count, "perplexity": ppl, "seconds": seconds}
    print(f"perplexity {ppl:.3f} over {count} tokens of {report['text']} (context {context}, "
          f"{report['dtype']}, quantization {llm.engine.quantization or 'none'}; {seconds:.1f} s)")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0
