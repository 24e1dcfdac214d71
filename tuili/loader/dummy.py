"""Random weights in a real model's shape (`--load-format dummy`): for GPU benchmarks and tests without files."""
from __future__ import annotations

import os

import torch
from torch import nn

from tuili.loader.source import ModelSource

# The shapes of ../shared/BENCHMARKS.md, with the HF config fields of the real models.
SHAPES: dict[str, dict] = {
    "llama-3.1-8b": dict(model_type="llama", architectures=["LlamaForCausalLM"], num_hidden_layers=32,
                         hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         intermediate_size=14336, vocab_size=128256, rms_norm_eps=1e-5,
                         max_position_embeddings=131072, tie_word_embeddings=False,
                         rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                                high_freq_factor=4.0,
                                                                original_max_position_embeddings=8192)),
    "llama-3.2-1b": dict(model_type="llama", architectures=["LlamaForCausalLM"], num_hidden_layers=16,
                         hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         intermediate_size=8192, vocab_size=128256, rms_norm_eps=1e-5,
                         max_position_embeddings=131072, tie_word_embeddings=True,
                         rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                                                high_freq_factor=4.0,
                                                                original_max_position_embeddings=8192)),
    "qwen3-0.6b": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], num_hidden_layers=28,
                       hidden_size=1024, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       intermediate_size=3072, vocab_size=151936, rms_norm_eps=1e-6,
                       max_position_embeddings=40960, tie_word_embeddings=True, rope_theta=1000000.0),
    "qwen2.5-7b": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], num_hidden_layers=28,
                       hidden_size=3584, num_attention_heads=28, num_key_value_heads=4, head_dim=128,
                       intermediate_size=18944, vocab_size=152064, rms_norm_eps=1e-6,
                       max_position_embeddings=32768, tie_word_embeddings=False, rope_theta=1000000.0),
    "smollm2-135m": dict(model_type="llama", architectures=["LlamaForCausalLM"], num_hidden_layers=30,
                         hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         intermediate_size=1536, vocab_size=49152, rms_norm_eps=1e-5,
                         max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=100000.0),
}


def config_for_shape(name: str):
    from transformers import AutoConfig

    fields = dict(SHAPES[name])
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def load(model: str) -> ModelSource:
    """`model` is a shape name, a config.json, or a folder holding one."""
    from tuili.loader.hf_folder import load_tokenizer

    if model in SHAPES:
        return ModelSource(model, config_for_shape(model), None, None, torch.bfloat16)
    from transformers import AutoConfig

    path = model if os.path.isdir(model) else os.path.dirname(model) or "."
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"dummy model {model!r} is neither a known shape ({', '.join(SHAPES)}) "
                         "nor a config.json or a folder with one")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    return ModelSource(model, config, load_tokenizer(path), None, torch.bfloat16)


@torch.no_grad()
def init_random_weights(model: nn.Module, seed: int) -> None:
    """Normal(0, 0.02) for matrices and biases, 1 for norm weights; the same seed gives the same model (in any
    dtype: drawn in fp32, then rounded)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.copy_(torch.empty(param.shape, dtype=torch.float32, device=param.device).normal_(
                0.0, 0.02, generator=gen))
