"""The command line: generate, one-shot chat, the interactive chat loop (history, /reset, Ctrl-C)."""
from __future__ import annotations

import io

from tuili import SamplingParams
from tuili.chat import chat_loop, stream_reply
from tuili.cli import build_parser, engine_args_from, main

GREEDY = SamplingParams(temperature=0, max_tokens=32)
QUESTION = "What is the capital of France? Answer in one sentence."


def test_cli_generate_and_chat(capsys):
    assert main(["generate", "The capital of France is", "--temperature", "0", "--max-tokens", "4",
                 "--dtype", "float32", "--kv-cache-memory", "0.05"]) == 0
    assert capsys.readouterr().out.startswith("The capital of France is")
    assert main(["chat", QUESTION, "--temperature", "0", "--kv-cache-memory", "0.05"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_cli_bad_input_is_a_clear_error(capsys):
    assert main(["generate", "hi", "--model", "/nonexistent/model.gguf"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", "hi", "--top-p", "1.5"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_engine_flags_map_to_engine_args():
    ns = build_parser().parse_args(["chat", "--max-num-seqs", "3", "--dtype", "bfloat16", "--enforce-eager"])
    args = engine_args_from(ns)
    assert args.max_num_seqs == 3 and args.dtype == "bfloat16" and args.enforce_eager


def test_stream_reply_streams_the_answer(smollm):
    out = io.StringIO()
    text = stream_reply(smollm, [{"role": "user", "content": QUESTION}], GREEDY, out)
    assert text == "The capital of France is Paris."
    assert out.getvalue() == text + "\n"


def test_ctrl_c_stops_the_answer_not_the_program(smollm, monkeypatch):
    engine = smollm.engine
    real_step, calls = engine.step, []

    def step():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(engine, "step", step)
    out = io.StringIO()
    text = stream_reply(smollm, [{"role": "user", "content": "Count from one to fifty."}],
                        SamplingParams(temperature=0, max_tokens=200), out)
    assert out.getvalue().endswith(" [stopped]\n") and len(text) < 40
    assert not engine.has_unfinished_requests() and engine.block_manager.num_used_blocks == 0


def test_chat_loop_keeps_history_and_resets(smollm):
    lines = iter([QUESTION, "And of Germany?", "/reset", "/bogus", QUESTION, "/exit"])
    out = io.StringIO()
    history = chat_loop(smollm, [], GREEDY, read=lambda _: next(lines), out=out)
    # after /reset only the last exchange remains
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert history[1]["content"] == "The capital of France is Paris."
    answers = out.getvalue().splitlines()
    assert answers[0] == answers[2] == "The capital of France is Paris."
    assert "Berlin" in answers[1]  # the second question only makes sense with the first in the history
