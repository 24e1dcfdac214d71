"""`tuili bench serve` against a fake OpenAI-compatible streaming server with known delays."""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import socket
import threading
import time

import pytest

from tuili.bench.serve import (RequestResult, arrival_times, parse_rates, run_serve, run_serve_bench,
                               serve_workload, summarize)

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from fastapi import FastAPI, Request  # noqa: E402  (module level: FastAPI resolves the string annotations here)
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402

FIRST_DELAY = 0.05  # s before the first token: the fake server's TTFT
TOKEN_DELAY = 0.01  # s between tokens: its TPOT and ITL
KEY = "secret"
MODEL = "fake-model"
LENS = (4, 12)


def fake_app(seen: list[dict]):
    """Streams `max_tokens` one-token chunks (after an empty first chunk, as vLLM's role chunk) and a usage chunk."""
    app = FastAPI()

    def unauthorized(request: Request) -> JSONResponse | None:
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return JSONResponse({"error": {"message": "invalid api key"}}, status_code=401)
        return None

    @app.get("/v1/models")
    async def models(request: Request):
        return unauthorized(request) or {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

    async def stream(body: dict, chat: bool):
        def chunk(text: str, finish: str | None = None) -> str:
            choice = {"index": 0, "finish_reason": finish}
            choice.update({"delta": {"content": text}} if chat else {"text": text})
            return "data: " + json.dumps({"id": "x", "model": MODEL, "choices": [choice]}) + "\n\n"

        n = body["max_tokens"]
        yield chunk("")
        for i in range(n):
            await asyncio.sleep(FIRST_DELAY if i == 0 else TOKEN_DELAY)
            yield chunk(" tok", "length" if i == n - 1 else None)
        prompt_words = len((body["messages"][0]["content"] if chat else body["prompt"]).split())
        usage = {"prompt_tokens": prompt_words, "completion_tokens": n, "total_tokens": prompt_words + n}
        yield "data: " + json.dumps({"id": "x", "choices": [], "usage": usage}) + "\n\n"
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        if (denied := unauthorized(request)) is not None:
            return denied
        body = await request.json()
        seen.append(body)
        chat = request.url.path.endswith("/chat/completions")
        return StreamingResponse(stream(body, chat=chat), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def server():
    """The fake server on a free port of 127.0.0.1, in a background thread: (base URL, request bodies seen)."""
    import uvicorn

    seen: list[dict] = []
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(fake_app(seen), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}", seen
    srv.should_exit = True
    thread.join(timeout=5)
    sock.close()


def bench(url: str, rates: list[float], api_key: str | None = KEY, num: int = 12, slo_ttft_ms: float = 2000,
          slo_tpot_ms: float = 100, endpoint: str = "/v1/completions") -> dict:
    return asyncio.run(run_serve_bench(url, MODEL, rates, num, *LENS, 0, api_key, slo_ttft_ms, slo_tpot_ms,
                                       endpoint))


def test_serve_bench_measures_the_fake_servers_delays(server):
    url, seen = server
    seen.clear()
    report = bench(url, [20.0, math.inf])
    assert report["model"] == MODEL and report["rates"] == [20.0, "inf"] and report["commit"] and report["torch"]
    for r in report["results"]:
        assert r["completed"] == 12 and r["failures"] == 0 and r["errors"] == {}
        for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            stats = r[metric]
            assert stats["p50"] <= stats["p90"] <= stats["p99"], (metric, stats)
        # TTFT is the first non-empty chunk, not the empty one sent at once, nor the end of the stream (an upper
        # bound in absolute time would be flaky: 12 streams, client and server share two busy cores here)
        assert 0.8 * FIRST_DELAY * 1e3 <= r["ttft_ms"]["p50"] < r["e2e_ms"]["p50"]
        assert 0.8 * TOKEN_DELAY * 1e3 <= r["tpot_ms"]["p50"] <= 4 * TOKEN_DELAY * 1e3
        assert 0.8 * TOKEN_DELAY * 1e3 <= r["itl_ms"]["p50"] <= 4 * TOKEN_DELAY * 1e3
        requests = r["requests"]
        assert r["output_tokens"] == sum(q["max_tokens"] for q in requests)  # from the usage chunks
        assert r["input_tokens"] == sum(q["prompt_words"] for q in requests)
        assert r["output_tok_s"] == pytest.approx(r["output_tokens"] / r["duration_s"])
        assert r["request_throughput"] == pytest.approx(12 / r["duration_s"])
        assert r["goodput"] == r["request_throughput"]  # the default SLO is loose for this server
    poisson, burst = report["results"]
    assert [q["arrival_s"] for q in poisson["requests"]] == arrival_times(12, 20.0, 0)
    assert poisson["duration_s"] >= arrival_times(12, 20.0, 0)[-1]
    assert burst["duration_s"] < poisson["duration_s"]
    assert len(seen) == 24
    for body in seen:
        assert body["stream"] and body["ignore_eos"] and body["temperature"] == 0 and body["model"] == MODEL
        assert body["stream_options"] == {"include_usage": True}
        assert LENS[0] <= body["max_tokens"] <= LENS[1] and LENS[0] <= len(body["prompt"].split()) <= LENS[1]
    assert sorted(map(json.dumps, seen[:12])) == sorted(map(json.dumps, seen[12:]))  # same prompts each rate


def test_goodput_counts_requests_meeting_both_slos(server):
    url, _ = server
    loose = bench(url, [math.inf], slo_ttft_ms=5000, slo_tpot_ms=1000)["results"][0]
    assert loose["good_requests"] == 12 and loose["goodput"] == pytest.approx(12 / loose["duration_s"])
    for ttft, tpot in ((1, 1000), (5000, 1), (1, 1)):  # either SLO alone missed: no goodput
        tight = bench(url, [math.inf], slo_ttft_ms=ttft, slo_tpot_ms=tpot)["results"][0]
        assert tight["completed"] == 12 and tight["good_requests"] == 0 and tight["goodput"] == 0
    # exact counting on made-up requests: TTFT 100 ms each, TPOT 10/20/30 ms, one failure, one 1-token output
    results = [RequestResult(10, 11, 0.0, success=True, ttft=0.1, e2e=0.1 + 10 * t, output_tokens=11)
               for t in (0.01, 0.02, 0.03)]
    results.append(RequestResult(10, 11, 0.0, error="HTTP 500: boom"))
    results.append(RequestResult(10, 1, 0.0, success=True, ttft=0.3, e2e=0.3, output_tokens=1))
    s = summarize(results, duration=2.0, slo_ttft_ms=200, slo_tpot_ms=25)
    assert (s["completed"], s["failures"], s["good_requests"], s["goodput"]) == (4, 1, 2, 1.0)
    assert s["errors"] == {"HTTP 500: boom": 1}
    assert s["tpot_ms"]["p50"] == pytest.approx(20)
    assert summarize(results, 2.0, slo_ttft_ms=400, slo_tpot_ms=25)["good_requests"] == 3


def test_same_seed_same_workload_and_poisson_schedule():
    assert arrival_times(12, 4.0, 0) == arrival_times(12, 4.0, 0)
    assert arrival_times(12, 4.0, 0) != arrival_times(12, 4.0, 1)
    assert arrival_times(12, math.inf, 0) == [0.0] * 12
    times = arrival_times(20000, 4.0, 0)
    assert times[0] == 0.0 and all(b >= a for a, b in zip(times, times[1:]))
    assert times[-1] / (len(times) - 1) == pytest.approx(0.25, rel=0.03)  # mean gap 1 / rate
    assert serve_workload(8, 100, 1024, 0) == serve_workload(8, 100, 1024, 0)
    prompts, prompt_lens, output_lens = serve_workload(200, 100, 1024, 0)
    assert [len(p.split()) for p in prompts] == prompt_lens
    assert min(prompt_lens + output_lens) >= 100 and max(prompt_lens + output_lens) <= 1024
    assert parse_rates("1,4,16,inf") == [1.0, 4.0, 16.0, math.inf]
    for bad in ("", "0", "1,x", "-2"):
        with pytest.raises(ValueError):
            parse_rates(bad)


def test_wrong_key_and_dead_server_count_failures(server):
    url, _ = server
    r = bench(url, [math.inf], api_key="wrong")["results"][0]
    assert (r["completed"], r["failures"], r["goodput"]) == (0, 12, 0)
    assert r["ttft_ms"]["p50"] is None and r["output_tok_s"] == 0
    assert all(message.startswith("HTTP 401") for message in r["errors"])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{sock.getsockname()[1]}"  # bound, not listening: connections are refused
    r = bench(dead, [math.inf], num=3)["results"][0]
    assert r["failures"] == 3 and "ConnectError" in next(iter(r["errors"]))
    sock.close()
    with pytest.raises(ValueError, match="url"):
        bench("localhost:8000", [1.0])


def test_cli_writes_json_and_png(server, tmp_path, capsys):
    url, _ = server
    ns = argparse.Namespace(command="bench", workload="serve", url=url + "/", model=None, rates="30,inf",
                            num_requests=6, min_len=LENS[0], max_len=LENS[1], seed=0, api_key=KEY,
                            slo_ttft_ms=2000.0, slo_tpot_ms=100.0, endpoint="/v1/chat/completions",
                            json=str(tmp_path / "serve.json"), plot=str(tmp_path / "serve.png"))
    assert run_serve(ns) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[0] == "rate" and [line.split()[0] for line in lines[1:3]] == ["30", "inf"]
    report = json.loads((tmp_path / "serve.json").read_text())
    assert report["model"] == MODEL and report["url"] == url  # asked GET /v1/models
    assert report["args"]["api_key"] == "***" and report["args"]["rates"] == "30,inf"
    assert report["endpoint"] == "/v1/chat/completions"
    assert [r["completed"] for r in report["results"]] == [6, 6]
    assert (tmp_path / "serve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
