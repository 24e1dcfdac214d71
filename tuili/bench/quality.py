"""`tuili eval agreement`: how often a quantized (or otherwise changed) model picks the reference model's tokens.

Over a fixed set of chat prompts, the reference answers greedily; then (a) teacher-forced top-1 agreement: at
each position of the reference's answers, does the model under test rank the reference's token first, and
the mean |log-prob difference| of those tokens; (b) exact answers: the fraction of prompts whose greedy answer
is the reference's, token for token. (a) is the fairer figure: one early flip makes (b) differ everywhere after.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json

import torch

from tuili.config import INT4_GROUP_SIZE, EngineArgs
from tuili.engine.llm import LLM
from tuili.sampling_params import SamplingParams

PROMPTS = [
    "What is the capital of France? Answer in one sentence.", "Name three primary colors.",
    "Write a haiku about autumn.", "What is 12 times 12?", "Who wrote Romeo and Juliet?",
    "Explain photosynthesis to a ten-year-old.", "Give me three tips for better sleep.",
    "Translate 'thank you very much' into Spanish.", "What causes the seasons on Earth?",
    "Write a short poem about the sea.", "List the first five prime numbers.",
    "Why is the sky blue?", "Summarize the plot of Cinderella in two sentences.",
    "What is the boiling point of water in Fahrenheit?", "Suggest a name for a friendly robot.",
    "How many legs does a spider have?",
]


def prompt_ids(llm: LLM, prompts: list[str] | None = None) -> list[list[int]]:
    """The fixed prompts through the chat template (or, for a model without one, as plain text)."""
    tokenizer = llm.get_tokenizer()
    if tokenizer is None:
        raise ValueError("agreement over the fixed prompts needs a tokenizer")
    prompts = prompts or PROMPTS
    if getattr(tokenizer, "chat_template", None):
        return [llm.encode_chat([{"role": "user", "content": p}]) for p in prompts]
    return [tokenizer.encode(p) for p in prompts]


def reference_run(reference: LLM, prompts: list[list[int]], max_tokens: int = 32) -> dict:
    """The reference's side of `agreement`: its greedy answers and its log-probs of them (teacher-forced)."""
    greedy = SamplingParams(temperature=0, max_tokens=max_tokens)
    answers = [o.outputs[0].token_ids for o in reference.generate(prompts, greedy, use_tqdm=False)]
    forced = [p + a for p, a in zip(prompts, answers)]
    scored = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    logprobs = [[out.prompt_logprobs[pos][ids[pos]].logprob for pos in range(len(p), len(ids))]
                for p, ids, out in zip(prompts, forced, reference.generate(forced, scored, use_tqdm=False))]
    return {"prompts": prompts, "answers": answers, "logprobs": logprobs, "max_tokens": max_tokens}


def compare(llm: LLM, ref: dict) -> dict:
    """`llm` against a `reference_run` (see the module's docstring)."""
    prompts, answers = ref["prompts"], ref["answers"]
    mine = [o.outputs[0].token_ids for o in llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=ref["max_tokens"]), use_tqdm=False)]
    forced = [p + a for p, a in zip(prompts, answers)]
    outs = llm.generate(forced, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    agree = diffs = count = 0
    for ids, prompt, ref_lps, got in zip(forced, prompts, ref["logprobs"], outs):
        for pos, ref_lp in zip(range(len(prompt), len(ids)), ref_lps):
            mine_lp = got.prompt_logprobs[pos][ids[pos]]
            agree += mine_lp.rank == 1
            diffs += abs(mine_lp.logprob - ref_lp)
            count += 1
    return {"top1_agreement": agree / max(count, 1), "mean_abs_logprob_diff": diffs / max(count, 1),
            "positions": count, "exact_answers": sum(a == b for a, b in zip(answers, mine)) / len(prompts),
            "prompts": len(prompts)}


def agreement(reference: LLM, llm: LLM, prompts: list[list[int]], max_tokens: int = 32) -> dict:
    """Compare `llm` with `reference` on token-id `prompts` (see the module's docstring)."""
    return compare(llm, reference_run(reference, prompts, max_tokens))


def run_agreement(ns: argparse.Namespace, engine_args: EngineArgs) -> int:
    ref_args = dataclasses.replace(engine_args, quantization=None, quant_group_size=INT4_GROUP_SIZE,
                                   quant_symmetric=False, kv_cache_dtype="auto", gguf_dequantize=True,
                                   dtype=ns.reference_dtype, model=ns.reference_model or engine_args.model)
    reference = LLM(**dataclasses.asdict(ref_args))
    ref = reference_run(reference, prompt_ids(reference), ns.max_tokens)
    del reference  # one engine at a time: each takes its share of GPU memory for its KV cache
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    report = compare(LLM(**dataclasses.asdict(engine_args)), ref)
    print(f"top-1 agreement {report['top1_agreement']:.1%} over {report['positions']} positions "
          f"(mean |d logprob| {report['mean_abs_logprob_diff']:.3f}); identical greedy answers "
          f"{report['exact_answers']:.0%} of {report['prompts']} prompts")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0
