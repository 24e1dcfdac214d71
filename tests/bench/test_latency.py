"""`tuili bench latency`'s llama.cpp peer (llama-cpp-python is not installed in CI: a stand-in module plays it)."""
from __future__ import annotations

import importlib.util
import sys
import time
import types

from tuili.bench.latency import time_llama_cpp
from tuili.cli import main


class FakeLlama:
    """llama_cpp.Llama's surface that time_llama_cpp uses: each generated token takes 2 ms."""
    made: list[dict] = []

    def __init__(self, **kwargs) -> None:
        self.kwargs, self.resets, self.prompts, self.sampling = kwargs, 0, [], []
        FakeLlama.made.append(self.__dict__)

    def reset(self) -> None:
        self.resets += 1

    def generate(self, tokens, **sampling):
        self.sampling.append(sampling)
        self.prompts.append(list(tokens))
        while True:
            time.sleep(0.002)
            yield 7


def test_llama_cpp_peer_times_the_same_prompt_greedy(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=FakeLlama))
    FakeLlama.made.clear()
    result = time_llama_cpp("model.gguf", [1, 2, 3], output_len=11, repeats=2, threads=2)
    made = FakeLlama.made[0]
    assert made["kwargs"]["model_path"] == "model.gguf" and made["kwargs"]["n_threads"] == 2
    assert made["kwargs"]["n_ctx"] >= 3 + 11
    assert made["prompts"] == [[1, 2, 3]] * 3 and made["resets"] == 3  # a warm-up, then each repeat from scratch
    assert made["sampling"] == [dict(top_k=1, temp=0.0)] * 3  # greedy
    assert result["threads"] == 2 and 0.019 < result["decode_s"] < 0.2  # 10 tokens after the first, 2 ms each
    assert abs(result["decode_tok_s"] - 10 / result["decode_s"]) < 1e-9


def test_llama_cpp_peer_samples_as_tuili_when_asked(monkeypatch):
    """--temperature / --top-p: llama.cpp samples with them and nothing else (its own defaults add top-k 40 and
    min-p 0.05)."""
    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=FakeLlama))
    FakeLlama.made.clear()
    time_llama_cpp("model.gguf", [1, 2, 3], output_len=3, repeats=1, threads=2, temperature=0.8, top_p=0.9)
    assert FakeLlama.made[0]["sampling"][-1] == dict(top_k=0, top_p=0.9, min_p=0.0, temp=0.8, repeat_penalty=1.0)


def test_llama_cpp_peer_errors_are_clear_and_early(monkeypatch, capsys):
    assert main(["bench", "latency", "--llama-cpp", "--batch-size", "2"]) == 2
    assert "batch 1" in capsys.readouterr().err
    find_spec = importlib.util.find_spec

    def llama_cpp_spec(spec):  # whether llama-cpp-python looks installed
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: spec if name == "llama_cpp" else find_spec(name, *a))

    llama_cpp_spec(None)
    assert main(["bench", "latency", "--llama-cpp"]) == 2  # before any model is loaded
    assert "pip install llama-cpp-python" in capsys.readouterr().err
    llama_cpp_spec(object())
    assert main(["bench", "latency", "--llama-cpp", "--load-format", "dummy", "--kv-cache-memory", "0.05"]) == 2
    assert "GGUF model file" in capsys.readouterr().err


def test_cpu_matmul_ceiling_is_the_faster_of_the_dtype_and_fp32(monkeypatch):
    """On the CPU the prefill's MFU is against the faster dense GEMM of the dtype and fp32: torch's bf16 GEMM on a CPU
    without AVX-512 BF16 runs at ~1 GFLOP/s (0.0009 TFLOP/s here against fp32's 0.12), which read as 5000% MFU and
    took ~23 s to time at 1024^3; the dtype is timed small."""
    import torch

    from tuili.bench import roofline

    real = roofline.measure_matmul_rate
    rates, calls = {torch.float32: 1e11, torch.bfloat16: 1e9}, []
    monkeypatch.setattr(roofline, "measure_matmul_rate",
                        lambda device, dtype, repeats=10, n=None: calls.append((dtype, n)) or rates[dtype])
    cpu = torch.device("cpu")
    assert real(cpu, torch.bfloat16) == 1e11
    assert calls == [(torch.float32, None), (torch.bfloat16, 512)]
    rates[torch.bfloat16] = 1e12  # a CPU with a fast bf16 GEMM keeps its own
    assert real(cpu, torch.bfloat16) == 1e12
    assert real(cpu, torch.float32, 1, 64) > 0 and len(calls) == 4  # fp32 itself: timed directly
