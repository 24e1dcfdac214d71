"""`tuili bench spec`: speculative decoding's decode speed-up and acceptance (BENCHMARKS.md's speculative target).

One engine with the proposer under test; at each batch size the same prompts run with speculation forced off
(the baseline, same weights, same process) and forced on, greedy, and the outputs are compared token for
token (in fp32 they must be identical; in bf16 a verification pass of k + 1 rows rounds differently from
one-row decode steps, so a near-tie can flip, as in any engine). `--noise` swaps each proposed token for a
random one with that probability: a controlled way to set the acceptance rate and draw speed-up against it.
`--replay` replaces the engine's proposer by an oracle that proposes the target's own greedy output (no draft
cost): random-weight models (the device's dummy 8B) write no text an n-gram or a small draft could predict,
so this is how their verification cost is measured against acceptance. The oracle's text is that of a run
whose every step is a verification of k random proposals, not the plain run's: in bf16 a random model's
greedy text is chaotic, and a k + 1-row verification pass rounds differently from a one-row decode step, so
the plain run's text would stop matching within a few tokens; a verification row computes the same whatever
the other rows hold, so the reference run's text is what the replay runs verify. The batch-size sweep shows
where speculation stops paying, which is what the engine's `--speculative-disable-batch-size` rule is set from.
"""
from __future__ import annotations

import argparse
import dataclasses

import torch

from tuili.bench.roofline import environment
from tuili.config import EngineArgs
from tuili.engine.llm import LLM
from tuili.engine.llm_engine import SpecStats
from tuili.sampling_params import SamplingParams


class NoisyProposer:
    """Wraps a proposer: each proposed token is replaced by a random one with probability `noise` (greedy
    requests only: a sampled request's draft tokens must be drawn from the q it reports)."""

    def __init__(self, inner, noise: float, vocab_size: int, seed: int = 0) -> None:
        self.inner, self.noise, self.vocab_size = inner, noise, vocab_size
        self.gen = torch.Generator().manual_seed(seed)

    def propose(self, items) -> None:
        self.inner.propose(items)
        for item in items:
            tokens = list(item.draft_token_ids)
            for j in range(len(tokens)):
                if torch.rand((), generator=self.gen) < self.noise:
                    tokens[j] = int(torch.randint(self.vocab_size, (), generator=self.gen))
            item.set_drafts(tokens, item.draft_probs)


class ReplayProposer:
    """Proposes, at each sequence's current output length, the tokens a reference run generated there."""

    def __init__(self, prompts: list[list[int]], outputs: list[list[int]], vocab_size: int) -> None:
        self.reference = {tuple(p): o for p, o in zip(prompts, outputs)}
        self.gen = torch.Generator().manual_seed(1)
        self.vocab_size = vocab_size

    def propose(self, items) -> None:
        for item in items:
            seq = item.seq
            ref = self.reference[tuple(seq.token_ids[:seq.num_prompt_tokens])]
            n = seq.num_output_tokens
            tokens = ref[n:n + item.num_lookahead]
            tokens += torch.randint(self.vocab_size, (item.num_lookahead - len(tokens),), generator=self.gen).tolist()
            item.set_drafts(tokens)


def bench_prompts(llm: LLM, ns: argparse.Namespace) -> list[list[int]]:
    """The fixed chat prompts of `tuili eval agreement` (or the --prompt ones), or random ones (--input-len)
    repeated --repeat times (n-gram proposals on a model without a tokenizer)."""
    if ns.input_len is None:
        from tuili.bench.quality import prompt_ids

        return prompt_ids(llm, ns.prompt)[: ns.num_prompts]
    gen = torch.Generator().manual_seed(0)
    vocab = llm.engine.model_config.vocab_size
    return [torch.randint(0, vocab, (ns.input_len,), generator=gen).tolist() * ns.repeat
            for _ in range(ns.num_prompts)]


def measure(llm: LLM, prompts: list[list[int]], batch_size: int, params: SamplingParams,
            speculate: bool) -> tuple[dict, list[list[int]]]:
    """Decode tok/s over the prompts, `batch_size` at a time (first token to finish, i.e. after prefill), and
    the outputs."""
    engine = llm.engine
    engine.scheduler.config.speculative_disable_batch_size = batch_size if speculate else 0
    engine.spec_stats = SpecStats()
    tokens, seconds, outputs = 0, 0.0, []
    for i in range(0, len(prompts), batch_size):
        outs = llm.generate(prompts[i:i + batch_size], params, use_tqdm=False)
        outputs += [o.outputs[0].token_ids for o in outs]
        tokens += sum(len(o.outputs[0].token_ids) - 1 for o in outs)
        seconds += max(o.metrics.finish_time for o in outs) - min(o.metrics.first_token_time for o in outs)
    stats = engine.spec_stats.as_dict() if speculate else {}
    return {"decode_tok_s": tokens / seconds, "tokens": tokens, "seconds": seconds, **stats}, outputs


def ideal_speedup(spec: dict, base: dict) -> float:
    """The speed-up if every step cost exactly a plain decode step, plus the proposing time: T tokens (after
    each first one) took T - A steps where A proposals were accepted, so ideal = T / ((T - A) + proposing time
    / decode step). When every step verifies, T / (T - A) = 1 + accepted per step, which for independent
    acceptances with probability a is (1 - a^(k+1)) / (1 - a): BENCHMARKS.md's theoretical speed-up (and the
    proposing time its 1 + k c) at the a the run measured."""
    tokens, accepted = spec["tokens"], spec["accepted"]
    return tokens / ((tokens - accepted) + spec["draft_seconds"] * base["tokens"] / base["seconds"])


def run_spec(ns: argparse.Namespace, engine_args: EngineArgs) -> int:
    if engine_args.speculative_method is None:
        raise ValueError("bench spec needs a proposer: --speculative-method ngram or --speculative-model DIR")
    if ns.noise and any(ns.noise) and engine_args.speculative_method == "draft" and not ns.replay:
        raise ValueError("--noise needs --replay or the ngram proposer: a draft model has already written K/V for "
                         "the tokens it proposed")
    llm = LLM(**dataclasses.asdict(engine_args))
    engine = llm.engine
    prompts = bench_prompts(llm, ns)
    params = SamplingParams(temperature=0, max_tokens=ns.output_len, ignore_eos=ns.ignore_eos)
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)  # warm-up
    proposer = engine.proposer
    vocab = engine.model_config.vocab_size
    runs = []
    print(f"{engine.model_name}: {'replay (oracle)' if ns.replay else engine_args.speculative_method} proposer"
          f"{' ' + engine_args.speculative_model if engine_args.speculative_model else ''}, "
          f"k = {engine_args.num_speculative_tokens}, {len(prompts)} prompts, {ns.output_len} new tokens")
    for batch_size in ns.batch_size or [1]:
        base, base_out = measure(llm, prompts, batch_size, params, speculate=False)
        inner = proposer
        if ns.replay:  # the reference: verification steps only, every proposal random (module docstring)
            engine.proposer = NoisyProposer(ReplayProposer(prompts, base_out, vocab), 1.0, vocab)
            _, reference = measure(llm, prompts, batch_size, params, speculate=True)
            inner = ReplayProposer(prompts, reference, vocab)
        for noise in ns.noise or [0.0]:
            engine.proposer = NoisyProposer(inner, noise, vocab) if noise else inner
            spec, spec_out = measure(llm, prompts, batch_size, params, speculate=True)
            engine.proposer = proposer
            row = {"batch_size": batch_size, "noise": noise, "baseline": base, "speculative": spec,
                   "speedup": spec["decode_tok_s"] / base["decode_tok_s"],
                   "ideal_speedup": ideal_speedup(spec, base),
                   "identical_outputs": sum(a == b for a, b in zip(spec_out, base_out)) / len(base_out)}
            runs.append(row)
            print(f"  batch {batch_size:3d} noise {noise:.2f}: {base['decode_tok_s']:8.1f} -> "
                  f"{spec['decode_tok_s']:8.1f} tok/s ({row['speedup']:.2f}x, "
                  f"{100 * row['speedup'] / row['ideal_speedup']:.0f}% of the ideal {row['ideal_speedup']:.2f}x), "
                  f"acceptance "
                  f"{spec['acceptance_rate']:.2f}, {spec['mean_accepted_length']:.2f} accepted per step, draft "
                  f"{1e3 * spec['draft_seconds'] / max(spec['steps'], 1):.1f} ms/step, verify "
                  f"{1e3 * spec['verify_seconds'] / max(spec['steps'], 1):.1f} ms/step (plain decode "
                  f"{1e3 * base['seconds'] / base['tokens'] * batch_size:.1f} ms/step); "
                  f"{100 * row['identical_outputs']:.0f}% of outputs identical")
    engine.scheduler.config.speculative_disable_batch_size = engine_args.speculative_disable_batch_size
    report = {"workload": "spec", **environment(engine.device), "model": engine.model_name,
              "dtype": str(engine.dtype).removeprefix("torch."), "engine_args": dataclasses.asdict(engine_args),
              "proposer": "replay" if ns.replay else engine_args.speculative_method, "num_prompts": len(prompts),
              "prompt_lens": [len(p) for p in prompts], "output_len": ns.output_len, "runs": runs}
    from tuili.bench.plot import save_report, spec_plot

    save_report(report, ns.json, ns.plot, spec_plot)
    return 0
