"""`tuili chat`: a terminal chat that streams tokens as they come and keeps the conversation."""
from __future__ import annotations

import argparse
import sys

from tuili.config import EngineArgs
from tuili.engine.llm import LLM
from tuili.sampling_params import SamplingParams

HELP = "commands: /reset clears the conversation, /exit quits; Ctrl-C stops the current answer"


def stream_reply(llm: LLM, conversation: list[dict], params: SamplingParams, out=None) -> str:
    """Generate one reply, writing it to `out` (stdout) as it comes; Ctrl-C ends the reply, not the program."""
    out = out or sys.stdout
    engine = llm.engine
    request_id = engine.add_request(None, llm.encode_chat(conversation), params)
    text = ""
    try:
        while engine.has_unfinished_requests():
            for output in engine.step():
                new_text = output.outputs[0].text
                out.write(new_text[len(text):])
                out.flush()
                text = new_text
    except KeyboardInterrupt:
        out.write(" [stopped]")
        engine.abort_request(request_id)
    finally:
        out.write("\n")
        out.flush()
    return text


def run_chat(ns: argparse.Namespace, engine_args: EngineArgs, params: SamplingParams) -> int:
    import dataclasses

    llm = LLM(**dataclasses.asdict(engine_args))
    system = [{"role": "system", "content": ns.system}] if ns.system else []
    if ns.message is not None:  # one question, one answer
        stream_reply(llm, system + [{"role": "user", "content": ns.message}], params)
        return 0
    print(f"tuili chat with {llm.engine.model_name} ({HELP})", file=sys.stderr)
    chat_loop(llm, system, params)
    return 0


def chat_loop(llm: LLM, system: list[dict], params: SamplingParams, read=input, out=None) -> list[dict]:
    """Read messages until /exit or end of input; returns the conversation as it stands at the end."""
    out = out or sys.stdout
    history = list(system)
    while True:
        try:
            line = read("> ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return history
        if not line:
            continue
        if line == "/exit":
            return history
        if line == "/reset":
            history = list(system)
            print("(conversation cleared)", file=sys.stderr)
            continue
        if line.startswith("/"):
            print(f"unknown command {line!r}; {HELP}", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        try:
            reply = stream_reply(llm, history, params, out)
        except ValueError as e:  # e.g. the conversation outgrew max_model_len
            print(f"error: {e} (use /reset)", file=sys.stderr)
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})
