"""What pruning and distillation share: a float model in torch (tuili's own classes, no KV cache), forward
passes over windows of token ids, calibration text, and writing a HF folder."""
from __future__ import annotations

import contextlib
import os

import torch

from tuili.ops.attention_metadata import AttentionMetadata, set_attention_metadata


def resolve_device(name: str) -> torch.device:
    """--device: auto (cuda if present) | cpu | cuda[:N]."""
    return torch.device(name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))


def load_float_model(model: str | None, device: torch.device, dtype: torch.dtype = torch.float32,
                     load_format: str = "auto", tokenizer: str | None = None):
    """(model, source) in float: a GGUF's blocks dequantized, no quantization, no KV cache (attention over the
    batch's own tokens), torch ops (differentiable). load_format 'dummy': random weights of a named shape."""
    from tuili.engine.llm_engine import load_model
    from tuili.loader import load_model_source

    source = load_model_source(model, load_format, tokenizer, gguf_dequantize=True)
    if source.quantization is not None:
        raise ValueError(f"{source.name} is saved quantized ({source.quantization}); this needs a float model")
    net = load_model(source, device, dtype)
    net.set_backends(False, False)
    return net, source


@contextlib.contextmanager
def attention_context(b: int, length: int, device: torch.device):
    """Attention metadata for a batch of b equal-length windows (causal within each, no KV cache) while inside."""
    starts = torch.arange(0, (b + 1) * length, length, dtype=torch.int32, device=device)
    meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long, device=device),
                             block_tables=torch.empty(b, 0, dtype=torch.int32, device=device),
                             seq_lens=torch.full((b,), length, dtype=torch.int32, device=device),
                             query_start_loc=starts, seq_lens_cpu=[length] * b, query_lens_cpu=[length] * b,
                             max_query_len=length, max_seq_len=length)
    set_attention_metadata(meta)
    try:
        yield
    finally:
        set_attention_metadata(None)


def forward(model, windows: torch.Tensor) -> torch.Tensor:
    """Hidden states [B, L, hidden] of a batch of equal-length windows of token ids [B, L] (causal within each)."""
    b, length = windows.shape
    positions = torch.arange(length, device=windows.device).repeat(b)
    with attention_context(b, length, windows.device):
        return model(windows.flatten(), positions).view(b, length, -1)


def text_token_ids(tokenizer, path: str | None = None) -> list[int]:
    """The calibration / training text (default: the shipped public-domain prose) as token ids."""
    from tuili.bench.perplexity import DEFAULT_TEXT

    if tokenizer is None:
        raise ValueError("the model has no tokenizer: calibration and training read text")
    with open(path or DEFAULT_TEXT, encoding="utf-8") as f:
        return tokenizer.encode(f.read(), add_special_tokens=False)


def windows_of(ids: list[int], length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Non-overlapping windows [N, length] of `ids` (the tail that does not fill one is dropped)."""
    n = len(ids) // length
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {length}")
    return torch.tensor(ids[:n * length], device=device).view(n, length)


def save_hf_folder(state: dict[str, torch.Tensor], config, tokenizer, out_dir: str) -> None:
    """config.json + model.safetensors (HF names) + the tokenizer: a folder tuili and HF transformers load."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()},
              os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
