"""Async scheduling (step N+1 launched before step N's tokens reach the host) changes no output.

It is the CUDA default; here it runs on the CPU, where the bookkeeping is the same: pending tokens read from
the previous step's tensor, stop/EOS/max_tokens found one step late (the extra token is dropped), sequences
that need their history on the host (penalties, prompt logprobs) forcing a synchronous step."""
from __future__ import annotations

from tuili import SamplingParams

TEXTS = ["What is the capital of France? Answer in one sentence.", "Name three colors.",
         "Write a haiku about the sea.", "Count from one to ten.", "Why is the sky blue?", "Hi",
         "Tell me a joke.", "List the planets of the solar system."]
PARAMS = [
    SamplingParams(temperature=0, max_tokens=24),                              # stops at EOS
    SamplingParams(temperature=0, max_tokens=40, stop=["Blue"]),                # stop string
    SamplingParams(temperature=0.8, seed=3, max_tokens=16, n=2),               # seeded, n = 2
    SamplingParams(temperature=0, max_tokens=12, logprobs=3),
    SamplingParams(temperature=0, max_tokens=12, min_tokens=10, stop=["."]),
    SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, seed=1, max_tokens=12),
    SamplingParams(temperature=0, max_tokens=10, repetition_penalty=1.3),      # forces synchronous steps
    SamplingParams(temperature=0, max_tokens=6, prompt_logprobs=2),
]


def summary(outs) -> list:
    rows = []
    for out in outs:
        prompt_lps = [sorted((t, round(lp.logprob, 4)) for t, lp in e.items()) if e else None
                      for e in (out.prompt_logprobs or [])]
        for c in out.outputs:
            lps = [sorted((t, round(lp.logprob, 4), lp.rank) for t, lp in e.items()) for e in (c.logprobs or [])]
            rows.append((c.text, c.token_ids, c.finish_reason, c.stop_reason, lps, prompt_lps))
    return rows


def test_async_scheduling_changes_no_output(smollm):
    prompts = [smollm.encode_chat([{"role": "user", "content": t}]) for t in TEXTS]
    engine = smollm.engine
    assert not engine.async_scheduling  # the CPU default
    sync = summary(smollm.generate(prompts, PARAMS, use_tqdm=False))
    try:
        engine.async_scheduling = True
        overlapped = summary(smollm.generate(prompts, PARAMS, use_tqdm=False))
        assert engine._in_flight is not None  # the last launched step was never needed
    finally:
        engine.async_scheduling = False
    assert overlapped == sync
    assert sync[0][0] == "The capital of France is Paris."
    assert sync[1][2] == "stop" and sync[1][3] == "Blue"


def test_async_abort_and_streaming(smollm):
    """Outputs stream one step late; an abort while a step is in flight frees everything at once."""
    prompt = smollm.encode_chat([{"role": "user", "content": TEXTS[2]}])
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    engine = smollm.engine
    try:
        engine.async_scheduling = True
        engine.add_request("a", prompt, params)
        engine.add_request("b", prompt, params)
        assert engine.step() == []          # prefill launched, nothing collected yet
        first = engine.step()               # the prefill's tokens arrive while the first decode runs
        assert {o.request_id for o in first} == {"a", "b"} and all(len(o.outputs[0].token_ids) == 1 for o in first)
        engine.step()
        engine.abort_request("a")
        assert engine.get_num_unfinished_requests() == 1
        texts = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                texts[out.request_id] = out.outputs[0].token_ids
        assert set(texts) == {"b"} and len(texts["b"]) == 30
    finally:
        engine.async_scheduling = False
        engine.abort_request("a")
    alone = smollm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    assert texts["b"] == alone
