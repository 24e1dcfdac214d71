"""`tuili eval agreement`: how often a quantized (or otherwise changed) model picks the reference model's tokens.

Over a fixed set of chat prompts, the reference answers greedily; then (a) teacher-forced top-1 agreement: at
each position of the reference's answers, does the model under test rank the reference's token first, and
the mean |log-prob difference| of those tokens; (b) exact answers: the fraction of prompts whose greedy answer
is the reference's, token for token. (a) is the fairer figure: one early flip makes (b) differ everywhere after.
"""
from __future__ import annotations

import argparse
import dataclasses
import json

from tuili.config import EngineArgs
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


def agreement(reference: LLM, llm: LLM, prompts: list[list[int]], max_tokens: int = 32) -> dict:
    """Compare `llm` with `reference` on token-id `prompts` (see the module's docstring)."""
    greedy = SamplingParams(temperature=0, max_tokens=max_tokens)
    answers = [o.outputs[0].token_ids for o in reference.generate(prompts, greedy, use_tqdm=False)]
    mine = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    forced = [p + a for p, a in zip(prompts, answers)]
    scored = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    refs = reference.generate(forced, scored, use_tqdm=False)
    gots = llm.generate(forced, scored, use_tqdm=False)
    agree = diffs = count = 0
    for ids, n_prompt, ref, got in zip(forced, map(len, prompts), refs, gots):
        for pos in range(n_prompt, len(ids)):
            mine_lp, ref_lp = got.prompt_logprobs[pos][ids[pos]], ref.prompt_logprobs[pos][ids[pos]]
            agree += mine_lp.rank == 1
            diffs += abs(mine_lp.logprob - ref_lp.logprob)
            count += 1
    return {"top1_agreement": agree / max(count, 1), "mean_abs_logprob_diff": diffs / max(count, 1),
            "positions": count, "exact_answers": sum(a == b for a, b in zip(answers, mine)) / len(prompts),
            "prompts": len(prompts)}


def run_agreement(ns: argparse.Namespace, engine_args: EngineArgs) -> int:
    ref_args = dataclasses.replace(engine_args, quantization=None, kv_cache_dtype="auto", gguf_dequantize=True,
                                   dtype=ns.reference_dtype, model=ns.reference_model or engine_args.model)
    reference = LLM(**dataclasses.asdict(ref_args))
    llm = LLM(**dataclasses.asdict(engine_args))
    report = agreement(reference, llm, prompt_ids(reference), ns.max_tokens)
    print(f"top-1 agreement {report['top1_agreement']:.1%} over {report['positions']} positions "
          f"(mean |d logprob| {report['mean_abs_logprob_diff']:.3f}); identical greedy answers "
          f"{report['exact_answers']:.0%} of {report['prompts']} prompts")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0
