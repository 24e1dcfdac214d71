"""A HF model folder: config.json, tokenizer files, one or many *.safetensors files."""
from __future__ import annotations

import glob
import json
import os

import torch
from safetensors import safe_open

from tuili.loader.source import ModelSource, WeightIterator


def load_tokenizer(path: str, required: bool = False):
    """The folder's tokenizer, or None if it has none (and none is required)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        if required:
            raise ValueError(f"cannot load a tokenizer from {path!r}: {e}") from e
        return None


def load(path: str) -> ModelSource:
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path!r} has no config.json: a model folder needs config.json and *.safetensors")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {os.path.join(path, 'config.json')}: {e}") from e
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{path!r} has no *.safetensors weights"
                                + (" (only *.bin files, which tuili does not load)" if glob.glob(
                                    os.path.join(path, "*.bin")) else ""))
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)

    def weights() -> WeightIterator:
        for file in files:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)

    return ModelSource(path, config, load_tokenizer(path), weights, dtype, checkpoint_quantization(config, files))


def checkpoint_quantization(config, files: list[str]):
    """The QuantConfig a folder's weights are stored in, from config.json's quantization_config; a folder whose
    tensors are quantized without saying how is refused rather than guessed."""
    from tuili.quant import QuantConfig

    qconfig = getattr(config, "quantization_config", None)
    if qconfig is None:
        with safe_open(files[0], framework="pt") as f:
            if any(name.endswith(".qweight") for name in f.keys()):
                raise ValueError("the checkpoint holds quantized tensors (*.qweight) but config.json has no "
                                 "quantization_config saying how they were made")
        return None
    return QuantConfig.from_checkpoint(qconfig if isinstance(qconfig, dict) else qconfig.to_dict())
