"""Speculative decoding inside the engine: greedy output identical to plain decoding (both proposers, batch 1
and 8, preemption forced, async scheduling on and off), sampled output following the target distribution
(chi-square on a tiny-vocabulary model), rollback leaving no block behind, stop conditions inside an accepted
run, the batch-size rule, and clear errors."""
from __future__ import annotations

import math
import re

import pytest
import torch

from reference import random_hf_model
from tuili import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
# engines on the tiny models get a fixed block count (on a GPU, the memory-fraction default would let the
# first engine of the session take the memory of every later one)
PROPOSERS = {
    "ngram": lambda models: dict(speculative_method="ngram"),
    "self-draft": lambda models: dict(speculative_model=models["llama"]),      # accepts everything
    "other-draft": lambda models: dict(speculative_model=models["draft"]),     # accepts little: rollbacks
}


def prompts_for_test(count: int) -> list[list[int]]:
    """Half repetitive (n-gram proposals get accepted), half random (they get rejected)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(count):
        if i % 2:
            out.append(torch.randint(0, 512, (5 + 13 * i,), generator=gen).tolist())
        else:
            out.append(torch.randint(0, 512, (3 + i,), generator=gen).tolist() * 4)
    return out


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory):
    """The tiny llama as target; a different random model of its vocabulary as a poor draft."""
    draft = str(tmp_path_factory.mktemp("draft"))
    random_hf_model("llama", 5, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, vocab_size=512, max_position_embeddings=512).save_pretrained(draft)
    return {**tiny_models, "draft": draft}


@pytest.fixture(scope="module")
def plain(models):
    return LLM(models["llama"], dtype="float32", num_gpu_blocks_override=512)


def check_blocks(engine) -> None:
    """After a synchronous step every running sequence holds exactly the blocks of its computed tokens."""
    bs = engine.block_manager.block_size
    for seq in engine.scheduler.running:
        assert len(seq.block_table) == -(-seq.num_computed_tokens // bs), "blocks of rejected tokens kept"
        assert seq.num_draft_computed <= seq.num_computed_tokens


def run_stepwise(llm, prompts, params, check=True):
    engine = llm.engine
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        if check and not engine.async_scheduling:
            check_blocks(engine)
    assert engine.block_manager.num_used_blocks == 0, "KV blocks leaked"
    return [done[str(i)] for i in range(len(prompts))]


@pytest.mark.parametrize("proposer", list(PROPOSERS))
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("mode", ["off", "on"])
def test_greedy_output_unchanged(models, plain, proposer, batch, mode):
    prompts = prompts_for_test(batch)
    expected = token_ids(plain.generate(prompts, GREEDY, use_tqdm=False))
    # batch 8: 16 blocks of 16 tokens for 8 sequences of up to 145 tokens: preemption is forced
    tight = dict(num_gpu_blocks_override=16, max_model_len=256) if batch == 8 else dict(num_gpu_blocks_override=512)
    llm = LLM(models["llama"], dtype="float32", async_scheduling=mode, num_speculative_tokens=3,
              speculative_disable_batch_size=8, **tight, **PROPOSERS[proposer](models))
    outs = run_stepwise(llm, prompts, GREEDY)
    assert token_ids(outs) == expected
    stats = llm.engine.spec_stats
    assert stats.proposed > 0
    if proposer != "other-draft":
        assert stats.accepted > 0
    if proposer == "self-draft":
        assert stats.accepted == stats.proposed
    if batch == 8:
        assert llm.engine.scheduler.num_preemptions > 0
    m = outs[0].metrics.spec
    assert m.steps > 0 and m.proposed_tokens >= m.accepted_tokens >= 0 and m.verify_time > 0


def test_logits_processors_see_the_proposals(models, plain):
    """Penalties and min_tokens at a speculative position count the proposals before it as generated."""
    prompts = prompts_for_test(4)
    params = [SamplingParams(temperature=0, max_tokens=30, repetition_penalty=1.3),
              SamplingParams(temperature=0, max_tokens=30, frequency_penalty=0.5, presence_penalty=0.3),
              SamplingParams(temperature=0, max_tokens=30, min_tokens=20, stop_token_ids=[7, 9, 11]),
              SamplingParams(temperature=0, max_tokens=30, logprobs=2)]  # logprobs: not speculated, shares the batch
    expected = plain.generate(prompts, params, use_tqdm=False)
    llm = LLM(models["llama"], dtype="float32", num_gpu_blocks_override=512, speculative_model=models["llama"])
    got = llm.generate(prompts, params, use_tqdm=False)
    assert token_ids(got) == token_ids(expected)
    assert got[3].metrics.spec.steps == 0 and got[0].metrics.spec.steps > 0
    for mine, ref in zip(got[3].outputs[0].logprobs, expected[3].outputs[0].logprobs, strict=True):
        assert mine.keys() == ref.keys()
        assert all(abs(mine[t].logprob - ref[t].logprob) < 1e-4 for t in ref)


def test_stops_inside_an_accepted_run(models, plain):
    """The self-draft accepts all its k proposals: max_tokens and stop ids must cut the run where they fall."""
    prompt = prompts_for_test(1)[0]
    full = token_ids(plain.generate([prompt], GREEDY, use_tqdm=False))[0]
    llm = LLM(models["llama"], dtype="float32", num_gpu_blocks_override=512, speculative_model=models["llama"])
    stop = full[6]
    params = [SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop])]
    outs = llm.generate([prompt, prompt], params, use_tqdm=False)
    assert outs[0].outputs[0].token_ids == full[:7] and outs[0].outputs[0].finish_reason == "length"
    assert outs[1].outputs[0].token_ids == full[:full.index(stop) + 1]
    assert outs[1].outputs[0].finish_reason == "stop" and outs[1].outputs[0].stop_reason == stop


def test_stop_string_and_eos_in_an_accepted_run(smollm, default_model_path):
    """The real model with itself as draft: a stop string and EOS inside accepted runs end the answer where
    plain decoding ends it."""
    prompt = smollm.encode_chat([{"role": "user", "content": "What is the capital of France? Answer in one sentence."}])
    params = [SamplingParams(temperature=0, max_tokens=40), SamplingParams(temperature=0, max_tokens=40, stop=["of F"])]
    expected = smollm.generate([prompt, prompt], params, use_tqdm=False)
    llm = LLM(default_model_path, dtype="float32", kv_cache_memory=0.05, speculative_model=default_model_path)
    got = llm.generate([prompt, prompt], params, use_tqdm=False)
    assert got[0].outputs[0].text == expected[0].outputs[0].text == "The capital of France is Paris."
    assert got[1].outputs[0].text == expected[1].outputs[0].text == "The capital "
    assert [o.outputs[0].finish_reason for o in got] == ["stop", "stop"]
    assert got[0].metrics.spec.accepted_tokens > 0


def test_no_speculation_above_the_batch_size_rule(models):
    llm = LLM(models["llama"], dtype="float32", num_gpu_blocks_override=512, speculative_method="ngram",
              speculative_disable_batch_size=2)
    engine = llm.engine
    prompts = prompts_for_test(6)
    for i, p in enumerate(prompts):  # different lengths: the batch shrinks below the rule near the end
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=10 + 8 * i, ignore_eos=True))
    crowded = spec_when_crowded = 0
    while engine.has_unfinished_requests():
        running, before = len(engine.scheduler.running), engine.spec_stats.seq_steps
        engine.step()
        if running > 2:
            crowded += 1
            spec_when_crowded += engine.spec_stats.seq_steps - before
    assert crowded > 0 and spec_when_crowded == 0
    assert engine.spec_stats.seq_steps > 0


def wilson_hilferty_chi2(df: int, z: float = 3.090) -> float:
    """Chi-square critical value for `df` degrees of freedom at one-sided normal quantile z (3.090: 0.001)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


VOCAB = 5


@pytest.fixture(scope="module")
def tiny_vocab(tmp_path_factory):
    shape = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                 vocab_size=VOCAB, max_position_embeddings=64)
    target, draft = (str(tmp_path_factory.mktemp(n)) for n in ("target", "draft"))
    random_hf_model("llama", 1, num_hidden_layers=2, **shape).save_pretrained(target)
    random_hf_model("llama", 2, num_hidden_layers=1, **shape).save_pretrained(draft)
    return target, draft


@pytest.mark.parametrize("proposer", ["draft", "ngram"])
def test_sampled_tokens_follow_the_target(tiny_vocab, proposer):
    """Joint distribution of the first three generated tokens (125 cells) under temperature 0.8 and top-k 4,
    from 3000 sampled sequences of 4 tokens with speculation (k = 2: the second and third come from
    verification),
    against the exact target distribution from plain-engine logprobs. Chi-square, cells with expected count
    < 5 merged, significance 0.001 (fixed seeds: a run always passes or always fails)."""
    target, draft = tiny_vocab
    prompt = [1, 2, 3, 1, 2]
    temperature, top_k = 0.8, 4
    plain = LLM(target, dtype="float32", num_gpu_blocks_override=512)
    prefixes = [[a, b] for a in range(VOCAB) for b in range(VOCAB)]
    scored = plain.generate([prompt + p for p in prefixes],
                            SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=VOCAB, logprobs=VOCAB),
                            use_tqdm=False)

    def dist(entry) -> torch.Tensor:
        logits = torch.tensor([entry[t].logprob for t in range(VOCAB)], dtype=torch.float64) / temperature
        logits[logits.argsort(descending=True)[top_k:]] = -math.inf
        return logits.softmax(0)

    exact = torch.zeros(VOCAB, VOCAB, VOCAB, dtype=torch.float64)
    for (a, b), out in zip(prefixes, scored):
        n = len(prompt)
        exact[a, b] = dist(out.prompt_logprobs[n])[a] * dist(out.prompt_logprobs[n + 1])[b] * \
            dist(out.outputs[0].logprobs[0])

    kwargs = dict(speculative_model=draft) if proposer == "draft" else dict(speculative_method="ngram")
    torch.manual_seed(0)
    llm = LLM(target, dtype="float32", num_gpu_blocks_override=512, num_speculative_tokens=2,
              speculative_disable_batch_size=256, **kwargs)
    samples = 3000
    outs = llm.generate([prompt] * samples, SamplingParams(temperature=temperature, top_k=top_k, max_tokens=4,
                                                           ignore_eos=True), use_tqdm=False)
    stats = llm.engine.spec_stats
    assert stats.proposed > samples and 0 < stats.accepted < stats.proposed  # both outcomes exercised
    counts = torch.zeros(VOCAB ** 3, dtype=torch.float64)
    for o in outs:
        a, b, c = o.outputs[0].token_ids[:3]
        counts[(a * VOCAB + b) * VOCAB + c] += 1
    expected = exact.flatten() * samples
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    chi2 = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    assert counts[exact.flatten() == 0].sum() == 0, "a token outside the top-k was emitted"
    assert chi2 < wilson_hilferty_chi2(int(keep.sum()) - 1), chi2


def test_bad_speculative_settings_fail_clearly(models, tmp_path):
    with pytest.raises(ValueError, match="num_speculative_tokens must be >= 1"):
        LLM(models["llama"], speculative_method="ngram", num_speculative_tokens=0)
    with pytest.raises(ValueError, match="needs --speculative-model"):
        LLM(models["llama"], speculative_method="draft")
    with pytest.raises(ValueError, match="speculative_method must be"):
        LLM(models["llama"], speculative_method="medusa")
    with pytest.raises(ValueError, match="num_speculative_tokens needs"):
        LLM(models["llama"], num_speculative_tokens=3)
    other = str(tmp_path / "other-vocab")
    random_hf_model("llama", 3, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, vocab_size=300, max_position_embeddings=512).save_pretrained(other)
    with pytest.raises(ValueError, match="vocabulary of 300 tokens; the target's has 512"):
        LLM(models["llama"], speculative_model=other)


def test_server_metrics_report_speculation(default_model_path):
    from fastapi.testclient import TestClient

    from tuili import EngineArgs
    from tuili.engine.async_engine import AsyncLLMEngine
    from tuili.engine.llm_engine import LLMEngine
    from tuili.server.app import build_app
    from tuili.server.metrics import ServerMetrics

    engine = LLMEngine(EngineArgs(model=default_model_path, dtype="float32", kv_cache_memory=0.05,
                                  speculative_method="ngram"))
    metrics = ServerMetrics()
    async_engine = AsyncLLMEngine(engine, max_waiting_requests=10, on_output=metrics.observe)
    try:
        with TestClient(build_app(async_engine, "smollm2", api_key=None, metrics=metrics)) as http:
            body = {"model": "smollm2", "prompt": "1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2,",
                    "max_tokens": 16, "temperature": 0}
            assert http.post("/v1/completions", json=body).status_code == 200
            text = http.get("/metrics").text
    finally:
        async_engine.shutdown()
    proposed = float(re.search(r"^tuili_spec_decode_proposed (\S+)", text, re.M).group(1))
    accepted = float(re.search(r"^tuili_spec_decode_accepted (\S+)", text, re.M).group(1))
    rate = float(re.search(r"^tuili_spec_decode_acceptance_rate (\S+)", text, re.M).group(1))
    assert proposed > 0 and 0 < accepted <= proposed and rate == pytest.approx(accepted / proposed)
    assert engine.block_manager.num_used_blocks == 0


def test_draft_with_a_padded_vocabulary(smollm, default_model_path, tmp_path):
    """Same tokenizer, embedding table padded to another size (as Qwen2.5 7B / 0.5B): accepted, and the output
    is unchanged."""
    draft = str(tmp_path / "padded")
    random_hf_model("llama", 4, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, vocab_size=49152 + 64, max_position_embeddings=2048).save_pretrained(draft)
    smollm.get_tokenizer().save_pretrained(draft)
    prompt = smollm.encode_chat([{"role": "user", "content": "Name three primary colors."}])
    params = SamplingParams(temperature=0, max_tokens=24)
    llm = LLM(default_model_path, dtype="float32", kv_cache_memory=0.25, speculative_model=draft)
    assert token_ids(llm.generate([prompt], params, use_tqdm=False)) == \
        token_ids(smollm.generate([prompt], params, use_tqdm=False))
    assert llm.engine.spec_stats.proposed > 0
    assert llm.engine.max_model_len == 2048  # capped at the draft's positions


def test_lookahead_never_preempts():
    """The older sequence's proposals would take the last free block that the newer one needs for its own
    token: the newer one gets it, the older one decodes without proposals, nobody is preempted."""
    from tuili.config import SchedulerConfig
    from tuili.engine.block_manager import BlockManager
    from tuili.engine.scheduler import Scheduler
    from tuili.engine.sequence import Request, SequenceStatus

    blocks = BlockManager(num_blocks=3, block_size=4)
    scheduler = Scheduler(SchedulerConfig(8, 64, 64, num_speculative_tokens=4, speculative_disable_batch_size=8),
                          blocks)
    seqs = []
    for name, prompt in (("old", [1, 2, 3]), ("new", [1, 2, 3, 4])):
        seq = Request(name, None, prompt, SamplingParams(temperature=0, max_tokens=20)).seqs[0]
        seq.append_token(5)                       # decoding: one new token
        blocks.allocate(seq, len(prompt))
        seq.num_computed_tokens = len(prompt)
        seq.status = SequenceStatus.RUNNING
        seqs.append(seq)
    scheduler.running = list(seqs)
    batch = scheduler.schedule()
    assert scheduler.num_preemptions == 0
    assert [(i.seq.request.request_id, i.num_new_tokens, i.num_lookahead) for i in batch] == [("old", 1, 0),
                                                                                             ("new", 1, 0)]
    assert blocks.num_free_blocks == 0 and len(seqs[1].block_table) == 2


@pytest.mark.parametrize("batch", [1, 8])
def test_padded_verification_keeps_outputs(models, plain, batch):
    """Where verification has CUDA graphs (one shape: k proposals per sequence) the engine pads n-gram
    proposals with filler, and the last steps before max_tokens keep k proposals; forced on here (CPU): same
    greedy output, every verification of that shape, filler left out of the metrics."""
    prompts = prompts_for_test(batch)
    expected = token_ids(plain.generate(prompts, GREEDY, use_tqdm=False))
    llm = LLM(models["llama"], dtype="float32", num_gpu_blocks_override=64, max_model_len=256,
              speculative_method="ngram", num_speculative_tokens=3)
    engine = llm.engine
    engine.scheduler.full_lookahead = True
    shapes = set()
    launch = engine.runner.launch

    def recording_launch(batch, prev=None):
        shapes.update(len(i.draft_token_ids) for i in batch if i.draft_token_ids)
        return launch(batch, prev)
    engine.runner.launch = recording_launch
    outs = run_stepwise(llm, prompts, GREEDY)
    assert token_ids(outs) == expected
    assert shapes == {3}  # k proposals in every verification, the last steps of a request too (full_lookahead)
    stats = engine.spec_stats
    assert stats.proposed < 3 * stats.seq_steps  # some steps were filler only or partly
    assert 0 < stats.accepted <= stats.proposed


def test_proposals_past_max_tokens_do_not_count(models, plain):
    """With full_lookahead the last steps propose past max_tokens; those proposals are verified and dropped, and
    left out of the metrics: the oracle (the plain run's own tokens, random ones past its end) is accepted
    every time it is counted."""
    from tuili.bench.spec import ReplayProposer

    prompts = prompts_for_test(2)
    params = SamplingParams(temperature=0, max_tokens=38, ignore_eos=True)  # 1 + 9 x 4, then 1 more
    expected = token_ids(plain.generate(prompts, params, use_tqdm=False))
    llm = LLM(models["llama"], dtype="float32", num_gpu_blocks_override=64, max_model_len=256,
              speculative_method="ngram", num_speculative_tokens=3)
    engine = llm.engine
    engine.scheduler.full_lookahead = True
    engine.proposer = ReplayProposer(prompts, expected, engine.model_config.vocab_size)
    assert token_ids(run_stepwise(llm, prompts, params)) == expected
    assert engine.spec_stats.accepted == engine.spec_stats.proposed > 0


def test_bench_spec_cli(models, tmp_path):
    """`tuili bench spec`: baseline and speculative runs per batch size and noise, greedy outputs compared."""
    import json

    from tuili.cli import main

    path = tmp_path / "spec.json"
    assert main(["bench", "spec", "--model", models["llama"], "--dtype", "float32", "--num-gpu-blocks-override",
                 "256", "--speculative-method", "ngram", "--replay", "--input-len", "8", "--repeat", "3",
                 "--num-prompts", "2", "--output-len", "12", "--ignore-eos", "--batch-size", "1", "--batch-size",
                 "2", "--noise", "0", "--noise", "0.5", "--json", str(path)]) == 0
    runs = json.loads(path.read_text())["runs"]
    assert [(r["batch_size"], r["noise"]) for r in runs] == [(1, 0.0), (1, 0.5), (2, 0.0), (2, 0.5)]
    assert all(r["identical_outputs"] == 1.0 for r in runs)          # fp32: speculation changes nothing
    for r in runs:  # T / (T - A), lowered by the proposing time
        s = r["speculative"]
        assert 0 < r["ideal_speedup"] < s["tokens"] / (s["tokens"] - s["accepted"])
    assert runs[0]["speculative"]["acceptance_rate"] == 1.0          # the oracle at noise 0
    assert runs[1]["speculative"]["acceptance_rate"] < 1.0
