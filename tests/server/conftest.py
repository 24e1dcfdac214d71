"""A real server on 127.0.0.1 with its own engine on the default model, shared by the server tests."""
from __future__ import annotations

import socket
import threading
import time

import pytest
import uvicorn

from tuili import EngineArgs
from tuili.engine.async_engine import AsyncLLMEngine
from tuili.engine.llm_engine import LLMEngine
from tuili.server.app import build_app
from tuili.server.metrics import ServerMetrics

SERVED_NAME = "smollm2"


@pytest.fixture(scope="session")
def server(default_model_path):
    """A server with its own engine (fp32, like the `smollm` fixture, so outputs can be compared)."""
    engine = LLMEngine(EngineArgs(model=default_model_path, dtype="float32", kv_cache_memory=0.25))
    metrics = ServerMetrics()
    async_engine = AsyncLLMEngine(engine, max_waiting_requests=1000, on_output=metrics.observe,
                                  on_abort=lambda _: metrics.count_status("aborted"))
    app = build_app(async_engine, SERVED_NAME, api_key=None, metrics=metrics)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}", "engine": engine, "async_engine": async_engine, "app": app,
           "metrics": metrics}
    uv.should_exit = True
    thread.join(timeout=10)
    async_engine.shutdown()
    assert engine.block_manager.num_used_blocks == 0


