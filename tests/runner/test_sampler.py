"""Sampler: greedy, seeded sampling, top-k / top-p / min-p, penalties, min_tokens, stops, n > 1 and logprobs.

Unit tests run the Sampler on synthetic logits with real `Sequence` objects; engine tests use the session
fixture `smollm` (SmolLM2-135M in fp32) and check logprobs against HF transformers (`smollm_hf`).
"""
from __future__ import annotations

import math

import pytest
import torch

from tuili.engine.sequence import Request
from tuili.runner.sampler import Sampler, argmax_rows
from tuili.sampling_params import SamplingParams

V = 16          # synthetic vocabulary
EOS = 15


def make_seq(params: SamplingParams, prompt: list[int] = (1, 2, 3), output: list[int] = (), index: int = 0):
    """A real Sequence of a fresh request, with `output` already generated."""
    seq = Request(f"r{index}", None, list(prompt), params).seqs[index]
    for t in output:
        seq.append_token(t)
    return seq


def sample(logits: torch.Tensor, seqs, device: str = "cpu") -> list[int]:
    return Sampler(logits.shape[1], {EOS}).__call__(logits.to(device, copy=True), seqs).token_ids.tolist()


# the sampler's two forms: the inverse CDF on the CPU, the exponential race on GPUs (run on the lent GPU)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="the race path needs a CUDA GPU"))]


def counts_of(tokens: list[int], vocab: int = V) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=vocab).float()


# A fixed row whose softmax is far from uniform (token 4 best, then 9, 0, 7, ...); no ties.
BASE_ROW = torch.tensor([1.0, -0.5, 0.2, -2.0, 3.0, 0.1, -1.0, 0.8, -0.2, 2.2, -3.0, 0.5, -1.5, 0.0, -0.8, 0.3])
ORDER = BASE_ROW.argsort(descending=True).tolist()


# ---- greedy and temperature ---------------------------------------------------------------------------
def test_greedy_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(6, V) * 3
    seqs = [make_seq(SamplingParams(temperature=0)) for _ in range(6)]
    assert sample(logits, seqs) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_greedy_in_half_precision_is_argmax_ties_to_the_first(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(6, 1000) * 3).to(dtype)
    logits[1, 7] = logits[1, 300] = logits[1].max() + 1  # a tie: the first index wins
    assert argmax_rows(logits).tolist() == logits.argmax(-1).tolist()
    assert argmax_rows(logits)[1].item() == 7


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_rows_stay_argmax_in_a_sampled_batch(device):
    torch.manual_seed(1)
    logits = torch.randn(8, V)
    params = [SamplingParams(temperature=0) if i % 2 == 0 else SamplingParams(temperature=5.0) for i in range(8)]
    tokens = sample(logits, [make_seq(p) for p in params], device)
    argmax = logits.argmax(-1).tolist()
    assert [tokens[i] for i in range(0, 8, 2)] == [argmax[i] for i in range(0, 8, 2)]


@pytest.mark.parametrize("device", DEVICES)
def test_temperature_sampling_follows_softmax(device):
    n, temperature = 6000, 2.0
    torch.manual_seed(2)
    logits = BASE_ROW.repeat(n, 1)
    tokens = sample(logits, [make_seq(SamplingParams(temperature=temperature)) for _ in range(n)], device)
    freq = counts_of(tokens) / n
    expected = torch.softmax(BASE_ROW / temperature, -1)
    assert torch.allclose(freq, expected, atol=0.025), (freq, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(device):
    torch.manual_seed(3)
    steps = [torch.randn(5, V) for _ in range(12)]

    def run(batch_builder, row):
        seqs = batch_builder()
        rows = [row] + [i for i in range(len(seqs)) if i != row]  # the seeded sequence always sees logits[0]
        out = []
        for logits in steps:
            batch_logits = torch.empty(len(seqs), V)
            batch_logits[rows] = logits[: len(seqs)]
            tokens = sample(batch_logits, seqs, device)
            out.append(tokens[row])
            for s, t in zip(seqs, tokens):
                s.append_token(t)
        return out

    seeded = lambda: make_seq(SamplingParams(temperature=1.0, seed=42))  # noqa: E731
    alone = run(lambda: [seeded()], 0)
    again = run(lambda: [seeded()], 0)
    torch.manual_seed(99)  # the unseeded neighbours draw from the global generator: must not matter
    batched = run(lambda: [make_seq(SamplingParams(temperature=1.0)), make_seq(SamplingParams(temperature=0.7,
                           seed=7)), seeded(), make_seq(SamplingParams(temperature=0))], 2)
    other_seed = run(lambda: [make_seq(SamplingParams(temperature=1.0, seed=43))], 0)
    assert alone == again == batched
    assert alone != other_seed
    assert len(set(alone)) > 3  # really sampled, not argmax


# ---- top-k, top-p, min-p ------------------------------------------------------------------------------
@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, top_k=1),
    SamplingParams(temperature=3.0, top_p=1e-6),
    SamplingParams(temperature=3.0, min_p=0.999),
    SamplingParams(temperature=3.0, top_k=5, top_p=0.9, min_p=0.999),
], ids=["top_k=1", "top_p=1e-6", "min_p=0.999", "combined"])
def test_filters_that_keep_one_token_equal_greedy(params):
    torch.manual_seed(4)
    logits = torch.randn(500, V)
    logits[torch.arange(500), logits.argmax(-1)] += 0.1   # no near-ties: min_p 0.999 keeps the best only
    tokens = sample(logits, [make_seq(params) for _ in range(500)])
    assert tokens == logits.argmax(-1).tolist()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [2, 3, 6])
def test_top_k_only_emits_the_k_most_likely(k, device):
    n = 4000
    torch.manual_seed(5)
    tokens = sample(BASE_ROW.repeat(n, 1), [make_seq(SamplingParams(temperature=1.0, top_k=k)) for _ in range(n)],
                    device)
    freq = counts_of(tokens) / n
    allowed = ORDER[:k]
    assert set(tokens) == set(allowed)  # never outside the top k, and every one of them shows up
    expected = torch.zeros(V)
    expected[allowed] = torch.softmax(BASE_ROW[allowed], -1)  # renormalised over the top k
    assert torch.allclose(freq, expected, atol=0.03), (freq, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_top_p_keeps_the_smallest_nucleus(device):
    n = 4000
    probs = torch.softmax(BASE_ROW, -1)
    sorted_probs = probs[ORDER]
    # top_p halfway between the mass of the top 2 and the top 3: exactly the top 3 are kept
    top_p = float((sorted_probs[:2].sum() + sorted_probs[:3].sum()) / 2)
    torch.manual_seed(6)
    tokens = sample(BASE_ROW.repeat(n, 1), [make_seq(SamplingParams(temperature=1.0, top_p=top_p))
                                            for _ in range(n)], device)
    assert set(tokens) == set(ORDER[:3])
    freq = counts_of(tokens) / n
    expected = torch.zeros(V)
    expected[ORDER[:3]] = probs[ORDER[:3]] / probs[ORDER[:3]].sum()
    assert torch.allclose(freq, expected, atol=0.03)


def test_min_p_drops_tokens_below_the_fraction_of_the_best():
    n = 4000
    probs = torch.softmax(BASE_ROW, -1)
    min_p = 0.3
    kept = [t for t in range(V) if probs[t] >= min_p * probs.max()]
    assert 1 < len(kept) < V
    torch.manual_seed(7)
    tokens = sample(BASE_ROW.repeat(n, 1), [make_seq(SamplingParams(temperature=1.0, min_p=min_p))
                                            for _ in range(n)])
    assert set(tokens) == set(kept)


def test_cpu_candidate_filter_equals_the_sort(monkeypatch):
    """On the CPU, top-k / top-p / min-p look at each row's largest logits first (no full sort) where that is exact:
    the same kept tokens and logits as the sort; a flat row whose nucleus reaches past them goes to the sort."""
    import tuili.runner.sampler as sampler_module

    torch.manual_seed(11)
    vocab = 3000
    logits = torch.randn(7, vocab) * 4
    logits[6] *= 0.02  # nearly flat: 0.9 of its mass is spread over most of the row
    cases = [dict(top_p=0.9), dict(top_k=50), dict(top_k=50, top_p=0.8), dict(min_p=0.2),
             dict(top_p=0.95, min_p=0.05), dict(top_k=700, top_p=0.99), dict(top_p=0.9)]
    params = [SamplingParams(temperature=1.0, **c) for c in cases]
    monkeypatch.setattr(sampler_module, "CANDIDATES", 256)
    top_k = [p.top_k if p.top_k > 0 else vocab for p in params]
    args = (top_k, [p.top_p for p in params], [p.min_p for p in params])
    assert Sampler._filter_candidates(logits[:6], *(a[:6] for a in args)) is not None  # exact there
    assert Sampler._filter_candidates(logits, *args) is None  # the flat row: not exact
    fast = Sampler._filter(logits[:6], params[:6])
    mixed = Sampler._filter(logits, params)  # through the sort
    monkeypatch.setattr(sampler_module, "CANDIDATES", vocab)  # the sort for all
    slow = Sampler._filter(logits, params)
    assert torch.equal(fast, slow[:6]) and torch.equal(mixed, slow)
    kept = (~slow.isinf()).sum(-1).tolist()
    assert kept[1] == 50 and all(1 <= n < vocab for n in kept) and kept[6] > 256  # (row 6: past the 256)


def test_cpu_inverse_cdf_over_the_candidates_follows_the_filtered_distribution(monkeypatch):
    """On the CPU, unseeded rows whose filters are exact among the candidates are sampled from those alone: the
    frequencies of the filtered, renormalised distribution (the sort's), and only its tokens."""
    import tuili.runner.sampler as sampler_module

    monkeypatch.setattr(sampler_module, "CANDIDATES", 64)
    vocab, n, temperature = 500, 8000, 1.5
    torch.manual_seed(12)
    row = torch.randn(vocab) * 4
    params = SamplingParams(temperature=temperature, top_p=0.8)
    found = []
    real = Sampler._candidates
    monkeypatch.setattr(Sampler, "_candidates", staticmethod(lambda *a: found.append(real(*a)) or found[-1]))
    tokens = sample(row.repeat(n, 1), [make_seq(params) for _ in range(n)])
    assert len(found) == 1 and found[0] is not None  # the candidates' path
    expected = Sampler._filter((row / temperature)[None], [params]).softmax(-1)[0]
    assert 3 < int((expected > 0).sum()) < 64
    assert set(tokens) <= set(expected.nonzero()[:, 0].tolist())
    assert torch.allclose(counts_of(tokens, vocab) / n, expected, atol=0.02)


def test_cpu_inverse_cdf_at_the_top_of_its_range_takes_a_kept_token(monkeypatch):
    """u * total rounding up to the total (u just below 1) finds no token past it: the row's mode, not a dropped
    or out-of-range id."""
    monkeypatch.setattr(torch, "rand", lambda size, **kw: torch.ones(size))
    params = [SamplingParams(temperature=1.0, top_k=3), SamplingParams(temperature=1.0)]
    assert sample(BASE_ROW.repeat(2, 1), [make_seq(p) for p in params]) == [ORDER[0]] * 2


@pytest.mark.parametrize("device", DEVICES)
def test_filters_are_per_row(device):
    """A top-k row next to an unfiltered row: the unfiltered one still reaches tokens outside the top k."""
    n = 3000
    torch.manual_seed(8)
    seqs = [make_seq(SamplingParams(temperature=1.0, top_k=2) if i % 2 else SamplingParams(temperature=1.0))
            for i in range(n)]
    tokens = sample(BASE_ROW.repeat(n, 1), seqs, device)
    assert set(tokens[1::2]) == set(ORDER[:2])
    assert len(set(tokens[0::2])) > 6


# ---- penalties ----------------------------------------------------------------------------------------
def penalised(logits: torch.Tensor, seqs) -> torch.Tensor:
    return Sampler(logits.shape[1], {EOS})._apply_penalties(logits.clone(), seqs)


def test_repetition_penalty_hf_style_over_prompt_and_output():
    row = torch.tensor([2.0, -1.0, 0.5, -0.25, 3.0, 1.0, -2.0, 0.0])
    seq = make_seq(SamplingParams(repetition_penalty=2.0), prompt=[0, 1, 1], output=[2, 3, 0])
    out = penalised(row[None], [seq])[0]
    expected = row.clone()
    expected[[0, 2]] /= 2.0     # seen and positive: divided (once, however often seen)
    expected[[1, 3]] *= 2.0     # seen and negative: multiplied
    assert torch.equal(out, expected)
    # a penalty < 1 rewards repetition the same way round
    seq = make_seq(SamplingParams(repetition_penalty=0.5), prompt=[4], output=[6])
    out = penalised(row[None], [seq])[0]
    expected = row.clone()
    expected[4] = 6.0
    expected[6] = -1.0
    assert torch.equal(out, expected)


def test_presence_and_frequency_penalties_openai_style_over_output_only():
    row = torch.tensor([2.0, -1.0, 0.5, -0.25, 3.0, 1.0, -2.0, 0.0])
    seq = make_seq(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
                   prompt=[5, 6, 7, 7], output=[1, 2, 2, 2, 7])
    out = penalised(row[None], [seq])[0]
    counts = torch.tensor([0, 1, 3, 0, 0, 0, 0, 1]).float()   # output only: prompt tokens 5, 6 untouched
    expected = row - 0.25 * counts - 0.5 * (counts > 0).float()
    assert torch.allclose(out, expected, atol=1e-6, rtol=0)
    assert out[5] == row[5] and out[6] == row[6]
    # negative values encourage
    seq = make_seq(SamplingParams(presence_penalty=-1.0, frequency_penalty=-0.5), output=[4, 4])
    assert penalised(row[None], [seq])[0, 4] == pytest.approx(3.0 + 1.0 + 1.0)


def test_presence_frequency_without_output_change_nothing():
    row = torch.tensor([[2.0, -1.0, 0.5, -0.25]])
    seq = make_seq(SamplingParams(presence_penalty=2.0, frequency_penalty=2.0), prompt=[0, 1, 2, 3])
    assert torch.equal(penalised(row, [seq]), row)


def test_all_penalties_together_and_per_row():
    row = torch.tensor([2.0, -1.0, 0.5, -0.25, 3.0, 1.0, -2.0, 0.0])
    logits = row.repeat(3, 1)
    params = SamplingParams(repetition_penalty=1.5, presence_penalty=0.4, frequency_penalty=0.3)
    seqs = [make_seq(params, prompt=[0, 1], output=[1, 4, 4]),
            make_seq(SamplingParams(), prompt=[0, 1], output=[1, 4, 4]),        # no penalties
            make_seq(SamplingParams(repetition_penalty=3.0), prompt=[6], output=[5])]
    out = penalised(logits, seqs)
    first = row.clone()
    first[[0, 4]] /= 1.5
    first[1] *= 1.5
    counts = torch.tensor([0, 1, 0, 0, 2, 0, 0, 0]).float()
    first -= 0.3 * counts + 0.4 * (counts > 0).float()
    third = row.clone()
    third[5] /= 3.0
    third[6] *= 3.0
    assert torch.allclose(out[0], first, atol=1e-6, rtol=0)
    assert torch.equal(out[1], row)
    assert torch.allclose(out[2], third, atol=1e-6, rtol=0)


def test_penalties_steer_greedy_choice():
    row = torch.tensor([[0.0, 1.0, 0.9, 0.5] + [-5.0] * (V - 4)])
    assert sample(row, [make_seq(SamplingParams(temperature=0))]) == [1]
    assert sample(row, [make_seq(SamplingParams(temperature=0, presence_penalty=0.2), output=[1])]) == [2]
    assert sample(row, [make_seq(SamplingParams(temperature=0, frequency_penalty=0.2), output=[1])]) == [2]
    assert sample(row, [make_seq(SamplingParams(temperature=0, repetition_penalty=1.2), prompt=[1])]) == [2]
    # ... while logprobs stay those of the raw model distribution
    tokens, logprobs = Sampler(V, {EOS})(row.clone(), [make_seq(SamplingParams(
        temperature=0, logprobs=2, repetition_penalty=1.2), prompt=[1])]).lists()
    raw = torch.log_softmax(row[0], -1)
    assert tokens == [2]
    assert set(logprobs[0]) == {1, 2}
    assert logprobs[0][2].logprob == pytest.approx(float(raw[2]), abs=1e-6)
    assert logprobs[0][2].rank == 2 and logprobs[0][1].rank == 1


# ---- min_tokens (unit) --------------------------------------------------------------------------------
def test_min_tokens_bans_eos_and_stop_ids_until_reached():
    row = torch.zeros(1, V)
    row[0, EOS], row[0, 7], row[0, 3] = 10.0, 9.0, 1.0
    params = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[7])
    assert sample(row, [make_seq(params, output=[1, 2])]) == [3]       # 2 < 3 tokens: EOS and 7 banned
    assert sample(row, [make_seq(params, output=[1, 2, 3])]) == [EOS]  # reached: EOS allowed again
    ignore = SamplingParams(temperature=0, min_tokens=3, ignore_eos=True)
    assert sample(row, [make_seq(ignore, output=[1])]) == [EOS]        # EOS does not stop it, so not banned
    # also when sampling: EOS never comes out before min_tokens
    torch.manual_seed(9)
    seqs = [make_seq(SamplingParams(temperature=1.0, min_tokens=2), output=[1]) for _ in range(300)]
    assert EOS not in sample(row.repeat(300, 1), seqs)


# ---- the engine ---------------------------------------------------------------------------------------
PROMPT = "The quick brown fox"
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
CHAT_TEXT = "The capital of France is Paris."


def gen(llm, prompts, **kw):
    return llm.generate(prompts, SamplingParams(**kw), use_tqdm=False)


def test_engine_filters_equal_greedy(smollm):
    greedy = gen(smollm, PROMPT, temperature=0, max_tokens=8)[0].outputs[0].token_ids
    for kw in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=0.999)):
        out = gen(smollm, PROMPT, temperature=1.0, max_tokens=8, **kw)[0].outputs[0]
        assert out.token_ids == greedy, kw


def test_engine_seed_is_reproducible_alone_and_in_a_batch(smollm):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=10)
    alone = smollm.generate([PROMPT], seeded, use_tqdm=False)[0].outputs[0]
    again = smollm.generate([PROMPT], seeded, use_tqdm=False)[0].outputs[0]
    prompts = ["Once upon a time", PROMPT, "def fib(n):", "Paris is", PROMPT]
    params = [SamplingParams(temperature=1.0, max_tokens=6), seeded,
              SamplingParams(temperature=0.8, seed=7, max_tokens=12), SamplingParams(temperature=0, max_tokens=4),
              SamplingParams(temperature=1.0, max_tokens=10)]  # same prompt as the seeded one, unseeded
    batch = smollm.generate(prompts, params, use_tqdm=False)
    other = gen(smollm, PROMPT, temperature=1.0, seed=4321, max_tokens=10)[0].outputs[0]
    assert alone.token_ids == again.token_ids == batch[1].outputs[0].token_ids
    assert alone.text == batch[1].outputs[0].text
    assert other.token_ids != alone.token_ids


def test_engine_min_tokens_keeps_eos_out(smollm):
    base = smollm.chat(CHAT, SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0].outputs[0]
    eos = smollm.engine.eos_token_ids
    assert base.text == CHAT_TEXT and base.finish_reason == "stop" and len(base.token_ids) == 8
    assert base.token_ids[-1] in eos
    n = 12
    out = smollm.chat(CHAT, SamplingParams(temperature=0, min_tokens=n, max_tokens=n + 5),
                      use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= n
    assert not eos & set(out.token_ids[:n])
    assert out.token_ids[:7] == base.token_ids[:7]   # identical until EOS would have come
    assert out.text.startswith(CHAT_TEXT) and len(out.text) > len(CHAT_TEXT)
    # min_tokens also holds back stop strings and stop token ids
    out = smollm.chat(CHAT, SamplingParams(temperature=0, min_tokens=6, max_tokens=10, stop=["capital"],
                                           stop_token_ids=[4649]), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= 6 and 4649 not in out.token_ids[:6]


@pytest.mark.parametrize("stop, include, text", [
    ("Paris", False, "The capital of France is "),
    ("Paris", True, "The capital of France is Paris"),
    ("apital", False, "The c"),                      # inside a token
    (" of France", False, "The capital"),            # over several tokens
    (["France", "capital"], False, "The "),          # the earliest of several
    (["France", "capital"], True, "The capital"),
])
def test_stop_strings(smollm, stop, include, text):
    out = smollm.chat(CHAT, SamplingParams(temperature=0, max_tokens=20, stop=stop,
                                           include_stop_str_in_output=include), use_tqdm=False)[0].outputs[0]
    assert out.text == text
    assert out.finish_reason == "stop"
    expected_reason = stop if isinstance(stop, str) else stop[1]
    assert out.stop_reason == expected_reason
    if not include:
        assert expected_reason not in out.text


def test_stop_string_never_seen_runs_to_length(smollm):
    out = smollm.chat(CHAT, SamplingParams(temperature=0, max_tokens=4, stop=["Berlin"]), use_tqdm=False)
    out = out[0].outputs[0]
    assert out.finish_reason == "length" and out.stop_reason is None and len(out.token_ids) == 4


def test_stop_token_ids(smollm):
    base = smollm.chat(CHAT, SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0].outputs[0]
    paris = base.token_ids[5]
    assert smollm.get_tokenizer().decode([paris]).strip() == "Paris"
    out = smollm.chat(CHAT, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[paris]),
                      use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == paris
    assert out.token_ids == base.token_ids[:6]
    assert "Paris" not in out.text and out.text.startswith("The capital of France is")
    # EOS stops with stop_reason None; ignore_eos runs past it
    assert base.stop_reason is None
    out = smollm.chat(CHAT, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                      use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 10


def test_n_greater_than_one(smollm):
    params = SamplingParams(n=3, temperature=1.0, seed=2024, max_tokens=8)
    first = smollm.generate(PROMPT, params, use_tqdm=False)[0]
    second = smollm.generate(PROMPT, params, use_tqdm=False)[0]
    assert len(first.outputs) == 3
    assert sorted(o.index for o in first.outputs) == [0, 1, 2]
    ids = [tuple(o.token_ids) for o in first.outputs]
    assert len(set(ids)) == 3                                   # each index its own stream
    assert ids == [tuple(o.token_ids) for o in second.outputs]  # and reproducible
    assert [o.text for o in first.outputs] == [o.text for o in second.outputs]
    assert all(o.finish_reason in ("stop", "length") for o in first.outputs)
    # greedy n > 1: every copy is the greedy answer
    greedy = gen(smollm, PROMPT, temperature=0, max_tokens=6)[0].outputs[0].token_ids
    outs = gen(smollm, PROMPT, n=2, temperature=0, max_tokens=6)[0].outputs
    assert [o.index for o in outs] == [0, 1] and all(o.token_ids == greedy for o in outs)


@pytest.fixture(scope="module")
def hf_logprobs(smollm_hf):
    """log_softmax of HF's logits for a token sequence: [len, V]."""
    def run(token_ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = smollm_hf(torch.tensor([token_ids])).logits[0].float()
        return torch.log_softmax(logits, -1)
    return run


def assert_entry_matches(entry, token: int, ref: torch.Tensor, top: int, atol: float = 1e-4):
    """One position's logprobs: `token` plus the top `top` of the reference distribution `ref` [V]."""
    top_ids = ref.topk(top).indices.tolist()
    assert token in entry
    assert set(entry) == set(top_ids) | {token}
    for tid, lp in entry.items():
        assert lp.logprob == pytest.approx(float(ref[tid]), abs=atol), tid
        lo = int((ref > ref[tid] + atol).sum()) + 1
        hi = int((ref > ref[tid] - atol).sum()) + 1
        assert lo <= lp.rank <= hi, (tid, lp.rank, lo, hi)
    for r, tid in enumerate(top_ids, 1):
        assert entry[tid].rank == r or tid == token


def test_logprobs_match_hf(smollm, hf_logprobs):
    out = gen(smollm, PROMPT, temperature=0, max_tokens=8, logprobs=5)[0]
    comp = out.outputs[0]
    assert len(comp.logprobs) == len(comp.token_ids) == 8
    ids = out.prompt_token_ids + comp.token_ids
    ref = hf_logprobs(ids)
    p = len(out.prompt_token_ids)
    tokenizer = smollm.get_tokenizer()
    for step, (token, entry) in enumerate(zip(comp.token_ids, comp.logprobs)):
        assert_entry_matches(entry, token, ref[p + step - 1], 5)
        assert entry[token].rank == 1                          # greedy picks the most likely
        assert entry[token].decoded_token == tokenizer.decode([token])
    assert comp.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(comp.token_ids,
                                                                                       comp.logprobs)), abs=1e-5)
    assert comp.cumulative_logprob < 0


def test_logprobs_of_sampled_tokens_and_zero(smollm, hf_logprobs):
    out = gen(smollm, PROMPT, temperature=1.5, seed=11, max_tokens=6, logprobs=0)[0]
    comp = out.outputs[0]
    ref = hf_logprobs(out.prompt_token_ids + comp.token_ids)
    p = len(out.prompt_token_ids)
    for step, (token, entry) in enumerate(zip(comp.token_ids, comp.logprobs)):
        assert list(entry) == [token]                          # logprobs=0: the chosen token only
        assert_entry_matches(entry, token, ref[p + step - 1], 0)
    assert any(e[t].rank > 1 for t, e in zip(comp.token_ids, comp.logprobs))  # really sampled
    assert comp.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(comp.token_ids,
                                                                                       comp.logprobs)), abs=1e-5)
    # without logprobs there is nothing
    plain = gen(smollm, PROMPT, temperature=0, max_tokens=2)[0]
    assert plain.outputs[0].logprobs is None and plain.outputs[0].cumulative_logprob is None
    assert plain.prompt_logprobs is None


def test_prompt_logprobs_match_hf(smollm, hf_logprobs):
    prompt = "The capital of France is Paris, and the capital of Germany is"
    out = gen(smollm, prompt, temperature=0, max_tokens=2, prompt_logprobs=3)[0]
    ids = out.prompt_token_ids
    assert len(ids) > 10
    plp = out.prompt_logprobs
    assert len(plp) == len(ids)
    assert plp[0] is None
    ref = hf_logprobs(ids)
    for i in range(1, len(ids)):
        assert_entry_matches(plp[i], ids[i], ref[i - 1], 3)
    # a chunked prefill (budget smaller than the prompt) gives the same prompt logprobs
    engine = smollm.engine
    budget = engine.scheduler.config.max_num_batched_tokens
    try:
        engine.scheduler.config.max_num_batched_tokens = 5
        chunked = gen(smollm, prompt, temperature=0, max_tokens=2, prompt_logprobs=3)[0]
    finally:
        engine.scheduler.config.max_num_batched_tokens = budget
    assert chunked.prompt_logprobs[0] is None and len(chunked.prompt_logprobs) == len(ids)
    for a, b in zip(plp[1:], chunked.prompt_logprobs[1:]):
        assert set(a) == set(b)
        assert all(math.isclose(a[t].logprob, b[t].logprob, abs_tol=1e-4) for t in a)
    assert chunked.outputs[0].token_ids == out.outputs[0].token_ids
