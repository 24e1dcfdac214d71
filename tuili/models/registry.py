"""HF `architectures` name -> model class and the flags that distinguish the family member."""
from __future__ import annotations

from functools import partial

from torch import nn

from tuili.models.llama import LlamaForCausalLM

_MODELS = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": partial(LlamaForCausalLM, qkv_bias=True),
    "Qwen3ForCausalLM": partial(LlamaForCausalLM, qk_norm=True),
}
SUPPORTED_ARCHITECTURES = tuple(_MODELS)


def build_model(config) -> nn.Module:
    """Instantiate the model for `config.architectures[0]` (weights uninitialised)."""
    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        if arch in _MODELS:
            return _MODELS[arch](config)
    raise ValueError(f"unsupported model architecture {archs or '(none given)'}; "
                     f"tuili supports: {', '.join(SUPPORTED_ARCHITECTURES)}")
