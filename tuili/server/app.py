"""The OpenAI-compatible HTTP API on FastAPI: completions, chat completions (SSE streaming), models, health,
metrics, tokenize/detokenize, and a chat page at /. Errors use OpenAI's JSON shape; the server never dies
from a request."""
from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tuili.engine.async_engine import AsyncLLMEngine, QueueFullError, RequestStream
from tuili.engine.llm import encode_chat
from tuili.engine.outputs import RequestOutput
from tuili.sampling_params import PositionLogprobs
from tuili.server.metrics import ServerMetrics
from tuili.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

STATIC = os.path.join(os.path.dirname(__file__), "static")


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def error_response(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status)


def build_app(engine: AsyncLLMEngine, served_model_name: str, api_key: str | None = None,
              metrics: ServerMetrics | None = None) -> FastAPI:
    app = FastAPI(title="tuili", version="0.1.0")
    metrics = metrics or ServerMetrics()
    max_model_len = engine.engine.max_model_len

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        metrics.count_status(str(e.status))
        return error_response(e.status, e.message, e.kind, e.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        errors = e.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            metrics.count_status("400")
            return error_response(400, "the request body is not valid JSON", "BadRequestError")
        first = errors[0] if errors else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        metrics.count_status("422")
        return error_response(422, f"invalid request: {where}: {first.get('msg', 'invalid')}",
                              "UnprocessableEntityError", where)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), "NotFoundError" if e.status_code == 404 else "Error")

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        metrics.count_status("500")
        return error_response(500, f"internal error: {e}", "InternalServerError")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                metrics.count_status("401")
                return error_response(401, "invalid or missing API key (Authorization: Bearer ...)",
                                      "AuthenticationError")
        return await call_next(request)

    def check_model(name: str | None) -> None:
        if name is not None and name != served_model_name:
            raise APIError(404, f"the model `{name}` does not exist; this server serves `{served_model_name}`",
                           "NotFoundError", "model")

    def start(prompt: str | list[int], params) -> RequestStream:
        try:
            return engine.add_request(uuid.uuid4().hex, prompt, params)
        except QueueFullError as e:
            raise APIError(503, str(e), "ServiceUnavailableError") from e
        except ValueError as e:
            raise APIError(400, str(e), "BadRequestError") from e

    def start_all(prompts: list, params) -> list[RequestStream]:
        streams: list[RequestStream] = []
        try:
            for p in prompts:
                streams.append(start(p, params))
        except APIError:
            for s in streams:  # all or nothing
                s.abort()
            raise
        return streams

    def sampling(req, default_max_tokens, logprobs):
        try:
            return req.sampling_params(default_max_tokens, logprobs)
        except ValueError as e:
            raise APIError(400, str(e), "BadRequestError") from e

    # ---- routes ---------------------------------------------------------------------------------------
    @app.get("/")
    async def chat_page():
        return FileResponse(os.path.join(STATIC, "index.html"))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(engine.stats()), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": 0,
                                             "owned_by": "tuili", "max_model_len": max_model_len}]}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        tokenizer = require_tokenizer()
        if req.messages is not None:
            ids = encode_chat(tokenizer, [{"role": m.role, "content": m.text()} for m in req.messages])
        elif req.prompt is not None:
            ids = tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            raise APIError(400, "give `prompt` or `messages`", "BadRequestError")
        return {"tokens": ids, "count": len(ids), "max_model_len": max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        tokenizer = require_tokenizer()
        vocab = engine.engine.model_config.vocab_size
        if any(t < 0 or t >= vocab for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", "BadRequestError", "tokens")
        return {"prompt": tokenizer.decode(req.tokens)}

    def require_tokenizer():
        tokenizer = engine.tokenizer()
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer", "BadRequestError")
        return tokenizer

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        check_model(req.model)
        if req.echo:
            raise APIError(400, "echo is not supported", "BadRequestError", "echo")
        if req.logprobs is not None and req.logprobs > 5:
            raise APIError(400, "logprobs must be <= 5 for completions", "BadRequestError", "logprobs")
        params = sampling(req, 16, req.logprobs)
        prompts = req.prompts()
        if not prompts:
            raise APIError(400, "prompt is empty", "BadRequestError", "prompt")
        streams = start_all(prompts, params)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        tokenizer = engine.tokenizer()

        def choice(i: int, out: RequestOutput, c, text: str, start: int) -> dict:
            lp = completion_logprobs(c.logprobs[start:], tokenizer, req.logprobs) if c.logprobs is not None else None
            return {"index": i * params.n + c.index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason}

        if req.stream:
            async def events() -> AsyncIterator[str]:
                sent: dict[tuple[int, int], tuple[int, int]] = {}  # (prompt, seq) -> (chars, tokens) sent
                usage = Usage()
                async for i, out in merge(streams):
                    for c in out.outputs:
                        chars, toks = sent.get((i, c.index), (0, 0))
                        if len(c.text) == chars and len(c.token_ids) == toks and not c.finished:
                            continue
                        sent[(i, c.index)] = (len(c.text), len(c.token_ids))
                        if c.finished and c.finish_reason == "abort":
                            continue
                        yield sse({"id": rid, "object": "text_completion", "created": created,
                                   "model": served_model_name, "choices": [choice(i, out, c, c.text[chars:], toks)]})
                    if out.finished:
                        usage.add(out)
                        metrics.count_status("200")
                if req.include_usage:
                    yield sse({"id": rid, "object": "text_completion", "created": created,
                               "model": served_model_name, "choices": [], "usage": usage.json()})
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        finals = await collect(streams, raw)
        usage = Usage()
        choices = []
        for i, out in sorted(finals.items()):
            usage.add(out)
            choices += [choice(i, out, c, c.text, 0) for c in out.outputs]
        metrics.count_status("200")
        return {"id": rid, "object": "text_completion", "created": created, "model": served_model_name,
                "choices": choices, "usage": usage.json()}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request):
        check_model(req.model)
        tokenizer = require_tokenizer()
        top = req.top_logprobs if req.logprobs else None
        if top is not None and top > 20:
            raise APIError(400, "top_logprobs must be <= 20", "BadRequestError", "top_logprobs")
        if req.max_completion_tokens is not None:
            req.max_tokens = req.max_completion_tokens
        params = sampling(req, None, (top or 0) if req.logprobs else None)
        try:
            prompt = encode_chat(tokenizer, [{"role": m.role, "content": m.text()} for m in req.messages],
                                 req.add_generation_prompt)
        except Exception as e:  # the template refused the conversation
            raise APIError(400, f"cannot apply the chat template: {e}", "BadRequestError", "messages") from e
        stream = start(prompt, params)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def logprobs_of(c, start: int):
            return chat_logprobs(c.logprobs[start:], tokenizer, top or 0) if req.logprobs else None

        if req.stream:
            async def events() -> AsyncIterator[str]:
                base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": served_model_name}
                for k in range(params.n):
                    yield sse({**base, "choices": [{"index": k, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}]})
                sent: dict[int, tuple[int, int]] = {}
                last = None
                async for _, out in merge([stream]):
                    last = out
                    for c in out.outputs:
                        chars, toks = sent.get(c.index, (0, 0))
                        if len(c.text) == chars and len(c.token_ids) == toks and not c.finished:
                            continue
                        sent[c.index] = (len(c.text), len(c.token_ids))
                        if c.finished and c.finish_reason == "abort":
                            continue
                        delta = {"content": c.text[chars:]} if len(c.text) > chars else {}
                        yield sse({**base, "choices": [{"index": c.index, "delta": delta,
                                                        "logprobs": logprobs_of(c, toks),
                                                        "finish_reason": c.finish_reason}]})
                if last is not None and last.finished:
                    metrics.count_status("200")
                if req.include_usage and last is not None:
                    yield sse({**base, "choices": [], "usage": Usage().add(last).json()})
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        out = (await collect([stream], raw))[0]
        metrics.count_status("200")
        return {"id": rid, "object": "chat.completion", "created": created, "model": served_model_name,
                "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                             "logprobs": logprobs_of(c, 0), "finish_reason": c.finish_reason,
                             "stop_reason": c.stop_reason} for c in out.outputs],
                "usage": Usage().add(out).json()}

    app.state.metrics = metrics
    return app


# ---- helpers ------------------------------------------------------------------------------------------------
def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class Usage:
    def __init__(self) -> None:
        self.prompt = self.completion = 0

    def add(self, out: RequestOutput) -> "Usage":
        self.prompt += len(out.prompt_token_ids)
        self.completion += sum(len(c.token_ids) for c in out.outputs)
        return self

    def json(self) -> dict:
        return {"prompt_tokens": self.prompt, "completion_tokens": self.completion,
                "total_tokens": self.prompt + self.completion}


async def merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' output streams as they come: (index of the stream, output)."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
        except Exception as e:
            await queue.put((i, e))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        for s in streams:
            s.abort()


async def collect(streams: list[RequestStream], raw: Request) -> dict[int, RequestOutput]:
    """Final outputs of non-streamed requests; a client that disconnects meanwhile aborts them."""
    finals: dict[int, RequestOutput] = {}

    async def run() -> None:
        async for i, out in merge(streams):
            if out.finished:
                finals[i] = out

    task = asyncio.create_task(run())
    while not task.done():
        await asyncio.wait([task], timeout=0.25)
        if not task.done() and await raw.is_disconnected():
            task.cancel()
            for s in streams:
                s.abort()
            raise APIError(499, "client disconnected", "ClientClosedRequest")
    task.result()
    return finals


def _token_text(tokenizer, token_id: int, lp) -> str:
    return lp.decoded_token if lp.decoded_token is not None else tokenizer.decode([token_id])


def chat_logprobs(entries: list[PositionLogprobs], tokenizer, top: int) -> dict:
    content = []
    for entry in entries:
        chosen_id, chosen = next(iter(entry.items()))  # the sampled token comes first
        tops = sorted(entry.items(), key=lambda kv: kv[1].rank)[:top]
        content.append({
            "token": _token_text(tokenizer, chosen_id, chosen), "logprob": chosen.logprob,
            "bytes": list(_token_text(tokenizer, chosen_id, chosen).encode()),
            "top_logprobs": [{"token": _token_text(tokenizer, t, lp), "logprob": lp.logprob,
                              "bytes": list(_token_text(tokenizer, t, lp).encode())} for t, lp in tops]})
    return {"content": content}


def completion_logprobs(entries: list[PositionLogprobs], tokenizer, top: int | None) -> dict:
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = 0
    for entry in entries:
        chosen_id, chosen = next(iter(entry.items()))
        text = _token_text(tokenizer, chosen_id, chosen)
        tokens.append(text)
        token_logprobs.append(chosen.logprob)
        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank)[: top or 0]
        top_logprobs.append({_token_text(tokenizer, t, lp): lp.logprob for t, lp in ranked})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}
