"""Weights and tokenizers from a HF folder, a .gguf file, or random weights in a named shape (`dummy`)."""
from tuili.loader.source import ModelSource, load_model_source

__all__ = ["ModelSource", "load_model_source"]
