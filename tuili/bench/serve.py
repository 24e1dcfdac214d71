"""`tuili bench serve`: workload 3, an async load generator for any OpenAI-compatible server (`tuili serve`,
vLLM): Poisson arrivals at each request rate, prompt and output lengths uniform in [100, 1024], streamed
completions; TTFT, TPOT, ITL and E2E percentiles, request and token throughput, goodput under a TTFT/TPOT SLO."""
from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import math
import time
from typing import Callable

import numpy as np

# Prompts are text, not token ids (ids are not portable across servers' tokenizers): words drawn at random from
# this list of common English words, each one token with its leading space in SmolLM2's tokenizer (checked: a
# prompt of n words is exactly n tokens) and about one in other GPT-2-style BPE vocabularies (Llama 3, Qwen).
# The server's usage.prompt_tokens, when it sends one, records the exact count.
WORDS = (
    "the of and to in is was for on that with as by at from his her they this have but not are or an which one "
    "all were when there can more their been has time would other new some them what about into than only its "
    "first two also after most made over many people these may year world such where between city state work "
    "water house school life day back music game small great long part place high under during same before "
    "three while through number second company early family group film found name left line power later known "
    "large public white black local river country never around light women night field church point party war "
    "north south west east road book story market green money paper table window garden morning"
).split()


@dataclasses.dataclass
class RequestResult:
    """One request's outcome; times in seconds from the moment it was sent."""
    prompt_words: int
    max_tokens: int
    arrival_s: float  # scheduled send time, from the start of its rate's run
    success: bool = False
    error: str | None = None
    ttft: float | None = None  # to the first chunk with non-empty text
    e2e: float | None = None  # to the end of the stream
    itl: list[float] = dataclasses.field(default_factory=list)  # gaps between text chunks
    output_tokens: int = 0  # usage.completion_tokens if the server sent usage, else text chunks counted
    prompt_tokens: int | None = None  # usage.prompt_tokens, if sent

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (e2e - ttft) / (output tokens - 1)."""
        if not self.success or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def serve_workload(num: int, min_len: int, max_len: int, seed: int) -> tuple[list[str], list[int], list[int]]:
    """Prompt texts, their lengths in words and the output lengths, uniform in [min_len, max_len]."""
    rng = np.random.default_rng([seed, 0])
    prompt_lens = rng.integers(min_len, max_len + 1, num).tolist()
    output_lens = rng.integers(min_len, max_len + 1, num).tolist()
    prompts = [" ".join(rng.choice(WORDS, n)) for n in prompt_lens]
    return prompts, prompt_lens, output_lens


def arrival_times(num: int, rate: float, seed: int) -> list[float]:
    """Send times (s) of a Poisson process at `rate` requests/s, the first at 0; `inf` sends all at 0. Every rate
    draws the same exponential gaps scaled by 1 / rate, so the schedules of a run differ only in speed."""
    if math.isinf(rate):
        return [0.0] * num
    gaps = np.random.default_rng([seed, 1]).exponential(1.0 / rate, num)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])]).tolist()


def request_body(endpoint: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "max_tokens": max_tokens, "ignore_eos": True, "stream": True, "temperature": 0,
            "stream_options": {"include_usage": True}}
    if endpoint.rstrip("/").endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


async def send_request(client, url: str, headers: dict, body: dict, result: RequestResult) -> RequestResult:
    """POST one streamed completion and fill `result` from its server-sent events (`data: {...}` ... `[DONE]`)."""
    start = time.perf_counter()
    last = None
    chunks = 0
    usage_tokens = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                now = time.perf_counter()
                if chunk.get("error"):
                    result.error = f"stream error: {str(chunk['error'])[:200]}"
                    return result
                choices = chunk.get("choices") or [{}]
                text = choices[0].get("text") or (choices[0].get("delta") or {}).get("content")
                if text:
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                    result.prompt_tokens = chunk["usage"].get("prompt_tokens")
    except Exception as e:  # any failure of one request (connection, protocol, bad JSON) is counted, not raised
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.e2e = time.perf_counter() - start
    if result.ttft is None:
        result.error = "the stream carried no text"
        return result
    result.output_tokens = usage_tokens or chunks
    result.success = True
    return result


def _percentiles(seconds: list[float]) -> dict:
    if not seconds:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    ms = 1e3 * np.asarray(seconds)
    p50, p90, p99 = np.percentile(ms, [50, 90, 99]).tolist()
    return {"mean": float(ms.mean()), "p50": p50, "p90": p90, "p99": p99}


def summarize(results: list[RequestResult], duration: float, slo_ttft_ms: float, slo_tpot_ms: float) -> dict:
    """One rate's metrics. Goodput counts the requests that met both SLOs (a one-token output meets TPOT)."""
    ok = [r for r in results if r.success]
    good = [r for r in ok if 1e3 * r.ttft <= slo_ttft_ms and 1e3 * (r.tpot or 0.0) <= slo_tpot_ms]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok) if all(r.prompt_tokens is not None for r in ok) else None
    errors = collections.Counter(r.error for r in results if not r.success)
    return {
        "completed": len(ok), "failures": len(results) - len(ok), "duration_s": duration,
        "request_throughput": len(ok) / duration, "good_requests": len(good), "goodput": len(good) / duration,
        "output_tokens": out_tokens, "output_tok_s": out_tokens / duration, "input_tokens": in_tokens,
        "total_tok_s": None if in_tokens is None else (in_tokens + out_tokens) / duration,
        "mean_concurrency": sum(r.e2e for r in ok) / duration,
        "ttft_ms": _percentiles([r.ttft for r in ok]),
        "tpot_ms": _percentiles([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": _percentiles([gap for r in ok for gap in r.itl]),
        "e2e_ms": _percentiles([r.e2e for r in ok]),
        "errors": dict(errors.most_common(5)),
    }


def rate_label(rate: float) -> str | float:
    """A rate as JSON holds it: `inf` is not a JSON number."""
    return "inf" if math.isinf(rate) else rate


def _shown(rate: str | float) -> str:
    return rate if isinstance(rate, str) else f"{rate:g}"


def _check(base_url: str, rates: list[float], num_requests: int, min_len: int, max_len: int) -> None:
    if not base_url.startswith(("http://", "https://")):
        raise ValueError(f"url must start with http:// or https://, got {base_url!r}")
    if not rates or any(not r > 0 for r in rates):
        raise ValueError(f"rates must be > 0 requests/s (or inf), got {rates}")
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")


async def first_model(client, base_url: str, headers: dict) -> str:
    """The first model id the server lists at GET /v1/models."""
    import httpx

    try:
        response = await client.get(f"{base_url}/v1/models", headers=headers)
    except httpx.HTTPError as e:
        raise ValueError(f"cannot reach {base_url}: {type(e).__name__}: {e}") from e
    if response.status_code != 200:
        raise ValueError(f"GET {base_url}/v1/models: HTTP {response.status_code}; pass --model "
                         "(and --api-key if the server needs one)")
    models = response.json().get("data") or []
    if not models:
        raise ValueError(f"{base_url}/v1/models lists no models; pass --model")
    return models[0]["id"]


async def run_serve_bench(base_url: str, model: str | None, rates: list[float], num_requests: int, min_len: int,
                          max_len: int, seed: int, api_key: str | None, slo_ttft_ms: float, slo_tpot_ms: float,
                          endpoint: str = "/v1/completions",
                          on_rate: Callable[[dict], None] | None = None) -> dict:
    """Send the workload at each rate in turn (the same prompts every time) and report each rate's metrics;
    `model` None asks the server. `on_rate` sees each rate's result as soon as it is done."""
    try:
        import httpx
    except ImportError as e:
        raise ValueError("tuili bench serve needs httpx: pip install httpx") from e
    import torch
    from tqdm import tqdm

    from tuili.bench.roofline import device_name, environment

    base_url = base_url.rstrip("/")
    endpoint = "/" + endpoint.lstrip("/")
    _check(base_url, rates, num_requests, min_len, max_len)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    prompts, prompt_lens, output_lens = serve_workload(num_requests, min_len, max_len, seed)
    env = environment(torch.device("cpu"))
    report = {
        "workload": "serve", "url": base_url, "endpoint": endpoint,
        # the server's device is not visible from here: `client_device` is the machine sending the load
        "commit": env["commit"], "torch": env["torch"], "triton": env["triton"],
        "client_device": device_name(torch.device("cpu")),
        "num_requests": num_requests, "length_range": [min_len, max_len], "seed": seed,
        "rates": [rate_label(r) for r in rates], "slo": {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms},
        "prompt": "random common English words, about one token each", "results": [],
    }
    # no proxies from the environment (they would sit inside every latency), no pool limit (queueing in the
    # client's connection pool would count as server TTFT), no timeout (long outputs at high load are slow)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=None, limits=limits, trust_env=False) as client:
        report["model"] = model = model or await first_model(client, base_url, headers)
        bodies = [request_body(endpoint, model, p, n) for p, n in zip(prompts, output_lens)]
        for rate in rates:
            arrivals = arrival_times(num_requests, rate, seed)
            results = [RequestResult(prompt_words=w, max_tokens=n, arrival_s=a)
                       for w, n, a in zip(prompt_lens, output_lens, arrivals)]
            bar = tqdm(total=num_requests, desc=f"rate {_shown(rate)} req/s", unit="req", leave=False)
            start = time.perf_counter()

            async def one(i: int) -> None:
                await asyncio.sleep(max(0.0, start + arrivals[i] - time.perf_counter()))
                await send_request(client, base_url + endpoint, headers, bodies[i], results[i])
                bar.update(1)

            await asyncio.gather(*(one(i) for i in range(num_requests)))
            duration = time.perf_counter() - start
            bar.close()
            summary = {"request_rate": rate_label(rate), **summarize(results, duration, slo_ttft_ms, slo_tpot_ms),
                       "requests": [{"arrival_s": r.arrival_s, "prompt_words": r.prompt_words,
                                     "max_tokens": r.max_tokens, "success": r.success, "error": r.error,
                                     "ttft_s": r.ttft, "tpot_s": r.tpot, "e2e_s": r.e2e,
                                     "output_tokens": r.output_tokens, "prompt_tokens": r.prompt_tokens}
                                    for r in results]}
            report["results"].append(summary)
            if on_rate:
                on_rate(summary)
    return report


def parse_rates(text: str) -> list[float]:
    """Parse "1,4,16,inf" into [1.0, 4.0, 16.0, inf]."""
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as e:
        raise ValueError(f"--rates takes numbers or inf separated by commas, got {text!r}") from e
    if not rates or any(not r > 0 for r in rates):
        raise ValueError(f"--rates must be > 0 requests/s (or inf), got {text!r}")
    return rates


TABLE_HEADER = (f"{'rate':>6} {'ok':>5} {'fail':>4} {'req/s':>7} {'goodput':>7} {'out tok/s':>9} | "
                f"{'TTFT p50/p90/p99 ms':>22} | {'TPOT p50/p90/p99 ms':>20} | {'ITL p50/p99':>13} | "
                f"{'E2E p50/p99 ms':>15}")


def table_row(r: dict) -> str:
    def ms(stats: dict, keys: tuple[str, ...]) -> str:
        return "/".join("-" if stats[k] is None else f"{stats[k]:.0f}" if stats[k] >= 10 else f"{stats[k]:.1f}"
                        for k in keys)

    all3, two = ("p50", "p90", "p99"), ("p50", "p99")
    return (f"{_shown(r['request_rate']):>6} {r['completed']:>5} {r['failures']:>4} {r['request_throughput']:>7.2f} "
            f"{r['goodput']:>7.2f} {r['output_tok_s']:>9.0f} | {ms(r['ttft_ms'], all3):>22} | "
            f"{ms(r['tpot_ms'], all3):>20} | {ms(r['itl_ms'], two):>13} | {ms(r['e2e_ms'], two):>15}")


def serve_plot(report: dict, path: str) -> None:
    """TTFT and TPOT percentiles against the request rate; request throughput, goodput and output tok/s."""
    from tuili.bench.plot import _pyplot

    plt = _pyplot()
    results = report["results"]
    x = list(range(len(results)))
    labels = [_shown(r["request_rate"]) for r in results]
    fig, (ax_lat, ax_thr) = plt.subplots(1, 2, figsize=(11, 4))
    for metric, color in (("ttft_ms", "tab:blue"), ("tpot_ms", "tab:orange")):
        for p, style in (("p50", "-"), ("p99", "--")):
            ys = [math.nan if r[metric][p] is None else r[metric][p] for r in results]
            ax_lat.plot(x, ys, style, marker="o", color=color, label=f"{metric[:4].upper()} {p}")
    slo = report["slo"]
    ax_lat.axhline(slo["ttft_ms"], color="tab:blue", ls=":", lw=1, label="TTFT SLO")
    ax_lat.axhline(slo["tpot_ms"], color="tab:orange", ls=":", lw=1, label="TPOT SLO")
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("ms")
    ax_lat.set_title("latency")
    ax_lat.legend(fontsize=8)
    ax_thr.plot(x, [r["request_throughput"] for r in results], marker="o", color="tab:blue", label="requests/s")
    ax_thr.plot(x, [r["goodput"] for r in results], marker="s", color="tab:green", label="goodput (req/s)")
    ax_thr.set_ylabel("requests/s")
    ax_tok = ax_thr.twinx()
    ax_tok.plot(x, [r["output_tok_s"] for r in results], marker="^", color="tab:red", label="output tok/s")
    ax_tok.set_ylabel("output tok/s")
    lines = ax_thr.get_legend_handles_labels()[0] + ax_tok.get_legend_handles_labels()[0]
    ax_thr.legend(lines, [line.get_label() for line in lines], fontsize=8)
    ax_thr.set_title(f"throughput, SLO TTFT <= {slo['ttft_ms']:g} ms, TPOT <= {slo['tpot_ms']:g} ms")
    for ax in (ax_lat, ax_thr):
        ax.set_xticks(x, labels)
        ax.set_xlabel("request rate (req/s)")
    fig.suptitle(f"serve: {report['model']} at {report['url']}, {report['num_requests']} requests, lengths "
                 f"{report['length_range']} ({report['commit']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_serve(ns: argparse.Namespace) -> int:
    """`tuili bench serve`: one table row per rate, then JSON and PNG if asked."""
    rates = parse_rates(ns.rates)
    print(TABLE_HEADER)
    report = asyncio.run(run_serve_bench(
        ns.url, ns.model, rates, ns.num_requests, ns.min_len, ns.max_len, ns.seed, ns.api_key, ns.slo_ttft_ms,
        ns.slo_tpot_ms, getattr(ns, "endpoint", "/v1/completions"), on_rate=lambda r: print(table_row(r))))
    # every flag, except the key itself (result files get shared)
    report["args"] = {k: ("***" if k == "api_key" and v else v) for k, v in vars(ns).items()}
    for r in report["results"]:
        for message, count in r["errors"].items():
            print(f"rate {r['request_rate']}: {count} x {message}")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
    if ns.plot:
        serve_plot(report, ns.plot)
    return 0
