"""The OpenAI-compatible server with the real `openai` client, on the default model, on 127.0.0.1."""
from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from tuili import SamplingParams
from tuili.server.app import build_app
from tuili.server.metrics import ServerMetrics

NAME = "smollm2"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0)


def wait_idle(engine, timeout: float = 10.0) -> None:
    """Aborts from disconnects land asynchronously: wait until the engine holds nothing."""
    deadline = time.time() + timeout
    while (engine.has_unfinished_requests() or engine.block_manager.num_used_blocks) and time.time() < deadline:
        time.sleep(0.05)


def test_chat_equals_llm_chat(client, smollm):
    ref = smollm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0].outputs[0]
    r = client.chat.completions.create(model=NAME, messages=QUESTION, temperature=0, max_tokens=32)
    assert r.choices[0].message.content == ref.text == "The capital of France is Paris."
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len(ref.token_ids)
    chunks = list(client.chat.completions.create(model=NAME, messages=QUESTION, temperature=0, max_tokens=32,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_completions_equal_llm_generate(client, smollm):
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=20, stop=["\n\n"])
    ref = smollm.generate("Once upon a time", params, use_tqdm=False)[0].outputs[0]
    kwargs = dict(model=NAME, prompt="Once upon a time", temperature=0.8, top_p=0.9, seed=3, max_tokens=20,
                  stop=["\n\n"])
    r = client.completions.create(**kwargs)
    assert r.choices[0].text == ref.text and "\n\n" not in ref.text
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True) if c.choices)
    assert streamed == ref.text
    assert client.completions.create(**kwargs).choices[0].text == r.choices[0].text  # seeded: reproducible


def test_n2_stop_and_prompt_lists(client):
    r = client.completions.create(model=NAME, prompt=["The sky is", "My favourite food"], n=2, temperature=1.0,
                                  seed=1, max_tokens=8)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.choices[0].text != r.choices[1].text or r.choices[2].text != r.choices[3].text
    r = client.completions.create(model=NAME, prompt=[504, 3458, 314], max_tokens=3, temperature=0)  # token ids
    assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 3
    r = client.chat.completions.create(model=NAME, messages=QUESTION, temperature=0, stop=["Paris"])
    assert r.choices[0].message.content == "The capital of France is " and r.choices[0].finish_reason == "stop"


def test_logprobs(client, smollm):
    ref = smollm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=6, logprobs=3), use_tqdm=False)[0]
    r = client.chat.completions.create(model=NAME, messages=QUESTION, temperature=0, max_tokens=6, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    for entry, step, token_id in zip(content, ref.outputs[0].logprobs, ref.outputs[0].token_ids):
        assert entry.logprob == pytest.approx(step[token_id].logprob, abs=1e-5)
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    r = client.completions.create(model=NAME, prompt="The capital of France is", temperature=0, max_tokens=4,
                                  logprobs=2)
    assert len(r.choices[0].logprobs.token_logprobs) == 4 and len(r.choices[0].logprobs.top_logprobs[0]) == 2


def test_models_health_tokenize(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    url = server["url"]
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    ids = httpx.post(url + "/tokenize", json={"prompt": "Hello world"}).json()["tokens"]
    assert httpx.post(url + "/detokenize", json={"tokens": ids}).json()["prompt"] == "Hello world"
    assert "<!doctype html>" in httpx.get(url + "/").text.lower()


def test_64_streams_with_disconnects(server, smollm):
    """A third of 64 concurrent streams hang up midway: the rest finish right, and nothing leaks."""
    engine, metrics = server["engine"], server["metrics"]
    prompts = ["Tell me about the sea.", "Name some fruits.", "What is Python?", "Write a poem about snow."]
    new = 12  # tokens per finished stream (24 took 43 s of CI)
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    expected = {p: smollm.generate(p, params, use_tqdm=False)[0].outputs[0].text for p in prompts}
    def counts() -> tuple[float, float, float]:
        status = metrics.requests.labels
        return (metrics.generation_tokens._value.get(), status(status="finished_length")._value.get(),
                status(status="aborted")._value.get())

    before = counts()

    async def one(i: int, http: httpx.AsyncClient):
        prompt = prompts[i % len(prompts)]
        hang_up = i % 3 == 0  # these ask for far more tokens than they wait for: only an abort ends them early
        body = {"model": NAME, "prompt": prompt, "max_tokens": 2000 if hang_up else new, "temperature": 0,
                "ignore_eos": True, "stream": True}
        text, chunks = "", 0
        async with http.stream("POST", server["url"] + "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                text += json.loads(line[6:])["choices"][0]["text"]
                chunks += 1
                if hang_up and chunks == 3:
                    return None  # hang up midway
        return prompt, text

    async def main():
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(*(one(i, http) for i in range(64)))

    results = asyncio.run(main())
    done = [r for r in results if r is not None]
    assert len(done) == 64 - len(range(0, 64, 3))
    for prompt, text in done:
        assert text == expected[prompt]
    wait_idle(engine)
    assert engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished_requests()
    tokens, finished, aborted = (a - b for a, b in zip(counts(), before))
    assert (finished, aborted, tokens) == (len(done), 64 - len(done), new * len(done))
    text = httpx.get(server["url"] + "/metrics").text
    assert float(re.search(r'tuili_requests_total\{status="aborted"\} (\S+)', text).group(1)) >= aborted
    assert "tuili_kv_cache_usage_ratio 0.0" in text


@pytest.fixture(scope="module")
def secured(server):
    """A second app with an API key over the same engine (TestClient: in-process, no socket)."""
    app = build_app(server["async_engine"], NAME, api_key="s3cret", metrics=ServerMetrics())
    with TestClient(app) as http:
        yield http


def test_auth(secured):
    body = {"model": NAME, "prompt": "Hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        r = secured.post("/v1/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"
    assert secured.post("/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert secured.get("/health").status_code == 200  # only /v1 needs the key


@pytest.mark.parametrize("body, status, words", [
    ({"model": NAME, "prompt": "Hi", "temperature": -1}, 400, "temperature"),
    ({"model": NAME, "prompt": "Hi", "top_p": 1.5}, 400, "top_p"),
    ({"model": NAME, "prompt": "Hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": NAME, "prompt": "Hi", "n": 0}, 400, "n must be"),
    ({"model": NAME, "prompt": ""}, 400, "empty"),
    ({"model": NAME, "prompt": "word " * 9000}, 400, "max_model_len"),
    ({"model": "gpt-4", "prompt": "Hi"}, 404, "does not exist"),
    ({"model": NAME, "prompt": "Hi", "echo": True}, 400, "echo"),
    ({"model": NAME}, 422, "prompt"),
    ({"model": NAME, "prompt": "Hi", "unknown_field": 1, "user": "me", "max_tokens": 1}, 200, ""),
])
def test_bad_inputs(secured, body, status, words):
    auth = {"Authorization": "Bearer s3cret"}
    r = secured.post("/v1/completions", json=body, headers=auth)
    assert r.status_code == status, r.text
    if status != 200:
        assert words in r.json()["error"]["message"] and r.json()["error"]["code"] == status
    assert secured.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, headers=auth).status_code == 200


def test_malformed_json_and_chat_errors(secured):
    auth = {"Authorization": "Bearer s3cret", "content-type": "application/json"}
    r = secured.post("/v1/chat/completions", content=b"{not json", headers=auth)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = secured.post("/v1/chat/completions", json={"messages": []}, headers=auth)
    assert r.status_code == 422
    r = secured.post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]}, headers=auth)
    assert r.status_code == 422
    assert secured.get("/health").status_code == 200


def test_full_queue_gives_503(server, secured):
    async_engine = server["async_engine"]
    async_engine.max_waiting_requests = 0
    try:
        r = secured.post("/v1/completions", json={"prompt": "Hi"}, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "ServiceUnavailableError"
    finally:
        async_engine.max_waiting_requests = 1000
    assert secured.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1},
                        headers={"Authorization": "Bearer s3cret"}).status_code == 200
