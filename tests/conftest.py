"""Shared fixtures: the real default model (loaded once per session) and tiny random HF models."""
from __future__ import annotations

import os

import pytest
import torch

# the cores shared among pytest-xdist's workers where it runs the suite (README: `-n 2` on CI's 2 cores)
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1))))

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, rms_norm_eps=1e-6)
# Tiny random models in the shape of each supported family, built from HF configs.
TINY_FAMILIES = {
    "llama": ("llama", dict(rope_theta=10000.0)),
    "llama3-scaled": ("llama", dict(rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))),
    "mistral": ("mistral", dict(sliding_window=None)),
    "qwen2": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(head_dim=32, tie_word_embeddings=True)),
}


def make_tiny_model(path: str, family: str, seed: int = 0) -> str:
    """Save a randomly initialised HF model of `family` (safetensors + config.json) into `path`."""
    from reference import random_hf_model

    model_type, extra = TINY_FAMILIES[family]
    random_hf_model(model_type, seed, **TINY, **extra).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return {f: make_tiny_model(str(root / f), f) for f in TINY_FAMILIES}


@pytest.fixture(scope="session")
def default_model_path() -> str:
    from tuili.loader.source import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def smollm(default_model_path):
    """The real SmolLM2-135M GGUF in tuili, fp32 (shared: tests must leave no request behind)."""
    from tuili import LLM

    llm = LLM(default_model_path, dtype="float32", kv_cache_memory=0.25)
    yield llm
    assert not llm.engine.has_unfinished_requests()


@pytest.fixture(scope="session")
def smollm_hf(default_model_path):
    """The same GGUF loaded by HF transformers: the reference. transformers parses the file with gguf.GGUFReader
    twice (config, then weights) and rebuilds gguf's tensor-name map for each of ~400 modules: ~13 of ~20 s on 2
    cores. Here it gets one reader per file and one map per (architecture, layers): the same objects it would
    build, so the same reference, built faster."""
    import functools
    from unittest import mock

    import gguf
    from transformers import AutoModelForCausalLM

    reader = functools.cache(gguf.GGUFReader)
    folder, name = os.path.split(default_model_path)
    with mock.patch.object(gguf, "GGUFReader", reader), \
            mock.patch.object(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map)):
        return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


@pytest.fixture(autouse=True)
def _no_leaked_blocks(request):
    """After every test that used an engine, every KV block must be free again."""
    yield
    for name in ("smollm", "engine", "llm"):
        if name in request.fixturenames:
            obj = request.getfixturevalue(name)
            engine = getattr(obj, "engine", obj)
            assert engine.block_manager.num_used_blocks == 0, "KV blocks leaked"
            assert not engine.scheduler.has_unfinished()
