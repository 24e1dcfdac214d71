"""AsyncLLMEngine: one background thread runs the step loop; each request is an async stream of outputs.

The engine is not thread-safe, so only the loop thread touches its state. The event loop validates and
tokenizes a request itself (so bad input fails at once, with no wait) and hands the finished Request over
through a queue; aborts travel the same way. The loop applies both between steps, so the event loop never
waits for a step (a lock shared with a thread that steps back-to-back starves the other side: on a GPU that
held new requests back for seconds). Outputs cross back into asyncio with `call_soon_threadsafe`. A request
whose consumer stops listening (a disconnected client) is aborted before the next step, which frees its KV
blocks.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable

from tuili.engine.llm_engine import LLMEngine
from tuili.engine.outputs import RequestOutput
from tuili.sampling_params import SamplingParams

logger = logging.getLogger("tuili")


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the caller should retry later (HTTP 503)."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, max_waiting_requests: int | None = None,
                 on_output: Callable[[RequestOutput], None] | None = None,
                 on_abort: Callable[[str], None] | None = None) -> None:
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.on_output = on_output  # e.g. metrics; called in the loop thread for every output
        self.on_abort = on_abort
        self._incoming: deque = deque()   # Requests made by the event loop, for the loop thread to queue
        self._aborts: deque = deque()     # request ids to abort
        self._wakeup = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="tuili-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout=10)

    def stats(self) -> dict:
        scheduler = self.engine.scheduler  # read without the loop thread: lengths only, a snapshot is enough
        return {"running": len(scheduler.running), "waiting": len(scheduler.waiting) + len(self._incoming),
                "kv_usage": self.engine.block_manager.usage,
                "spec": self.engine.spec_stats.as_dict() if self.engine.proposer is not None else None}

    def _run(self) -> None:
        while not self._stopped:
            self._apply_queued()
            if not self.engine.has_unfinished_requests():
                self._wakeup.wait(0.05)
                self._wakeup.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # the batch failed: fail its requests, keep serving
                logger.exception("engine step failed")
                outputs = []
                self._fail_all(e)
            for out in outputs:
                if self.on_output is not None:
                    self.on_output(out)
                self._deliver(out.request_id, out)

    def _apply_queued(self) -> None:
        while self._incoming:
            request = self._incoming.popleft()
            try:
                self.engine.add(request)
            except ValueError as e:  # e.g. an id already in use
                self._deliver(request.request_id, e)
        while self._aborts:
            request_id = self._aborts.popleft()
            known = request_id in self.engine.requests
            self.engine.abort_request(request_id)
            if known and self.on_abort is not None:
                self.on_abort(request_id)

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self.engine.requests):
            self.engine.abort_request(request_id)
            self._deliver(request_id, error)

    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, queue = stream
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> "RequestStream":
        """Validate and queue a request now (raises ValueError on bad input, QueueFullError when too many
        wait); iterate the returned stream for its outputs."""
        waiting = len(self.engine.scheduler.waiting) + len(self._incoming)
        if self.max_waiting_requests is not None and waiting >= self.max_waiting_requests:
            raise QueueFullError(f"the server is busy: {waiting} requests are waiting already")
        request = self.engine.make_request(request_id, prompt, params)
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request.request_id] = (asyncio.get_running_loop(), queue)
        self._incoming.append(request)
        self._wakeup.set()
        return RequestStream(self, request.request_id, queue)

    def abort(self, request_id: str) -> None:
        """Abort before the next step (frees the request's KV blocks); unknown or finished ids are ignored."""
        self._aborts.append(request_id)
        self._wakeup.set()

    def tokenizer(self):
        return self.engine.tokenizer


class RequestStream:
    """The outputs of one request as they come. Leaving the iteration early (or `abort()`) aborts the request."""

    def __init__(self, engine: AsyncLLMEngine, request_id: str, queue: asyncio.Queue) -> None:
        self.engine, self.request_id, self.queue = engine, request_id, queue
        self.finished = False

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                item = await self.queue.get()
                if isinstance(item, Exception):
                    raise RuntimeError(f"the engine failed on this batch: {item}") from item
                self.finished = item.finished
                yield item
        finally:
            self.abort()

    def abort(self) -> None:
        """Stop the request and free its KV blocks (no-op once it has finished)."""
        self.engine._streams.pop(self.request_id, None)
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)
