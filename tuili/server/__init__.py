"""`tuili serve`: the OpenAI-compatible server."""
from __future__ import annotations

import argparse
import logging
import os

from tuili.config import EngineArgs


def serve(ns: argparse.Namespace, engine_args: EngineArgs) -> int:
    import uvicorn

    from tuili.engine.async_engine import AsyncLLMEngine
    from tuili.engine.llm_engine import LLMEngine
    from tuili.server.app import build_app
    from tuili.server.metrics import ServerMetrics

    api_key = ns.api_key or os.environ.get("TUILI_API_KEY") or None
    engine = LLMEngine(engine_args, show_progress=True)
    name = ns.served_model_name or os.path.basename(engine.model_name.rstrip("/"))
    metrics = ServerMetrics()
    async_engine = AsyncLLMEngine(engine, ns.max_waiting_requests, on_output=metrics.observe,
                                  on_abort=lambda _: metrics.count_status("aborted"))
    app = build_app(async_engine, name, api_key, metrics)
    logging.getLogger("tuili").info("serving %s on http://%s:%d", name, ns.host, ns.port)
    print(f"tuili: serving {name!r} on http://{ns.host}:{ns.port} (chat page at /)"
          + (" with an API key" if api_key else ""), flush=True)
    try:
        uvicorn.run(app, host=ns.host, port=ns.port, log_level="warning")
    finally:
        async_engine.shutdown()
    return 0
