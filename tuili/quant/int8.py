"""INT8 weight-only quantization, symmetric per output channel: scale[n] = max_k |W[n, k]| / 127."""
from __future__ import annotations

import torch
from torch import nn

from tuili.layers.linear import Linear


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> ([N, K] int8, [N] scales in the weight's dtype); rounding in fp32."""
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales.to(weight.dtype)


def _int8_linears(model: nn.Module):
    """The modules INT8 covers: every Linear of the decoder layers, and the LM head (tied ones get their own)."""
    if model.lm_head is None:
        embedding = model.embed_tokens.weight
        model.lm_head = Linear(embedding.shape[1], embedding.shape[0]).to(embedding.device)
        model.lm_head.weight = nn.Parameter(embedding, requires_grad=False)  # quantized from the tied table
    return [m for m in (*model.layers.modules(), model.lm_head) if isinstance(m, Linear)]


def prepare_int8(model: nn.Module) -> None:
    """Give the model empty INT8 parameters for a checkpoint saved by `tuili quantize` to load into."""
    for module in _int8_linears(model):
        rows, cols = module.weight.shape
        device, dtype = module.weight.device, module.weight.dtype
        module.quantize_int8(torch.empty(rows, cols, dtype=torch.int8, device=device),
                             torch.empty(rows, dtype=dtype, device=device))
        module.qweight.weight_loader = module.scales.weight_loader = _loader_of(module)


def _loader_of(module: Linear):
    from tuili.layers.linear import MergedLinear, default_weight_loader

    return module._load_shard if isinstance(module, MergedLinear) else default_weight_loader


@torch.no_grad()
def quantize_model(model: nn.Module, method: str) -> int:
    """Quantize every Linear of the decoder layers and the LM head in place; the embedding lookup stays float
    (it reads one row per token). Returns the bytes saved (negative for a tied head, which gains an int8 copy
    but reads a quarter of the bytes per step)."""
    if method != "int8":
        raise ValueError(f"quantization {method!r} is not supported; supported: int8")
    saved = 0
    tied = model.lm_head is None
    for module in _int8_linears(model):
        before = 0 if (tied and module is model.lm_head) else module.weight.numel() * module.weight.element_size()
        module.quantize_int8(*quantize_per_channel(module.weight))
        saved += before - module.qweight.numel() - module.scales.numel() * module.scales.element_size()
    return saved


@torch.no_grad()
def save_quantized(model: nn.Module, config, tokenizer, out_dir: str) -> None:
    """Write an INT8 model as a folder `--model DIR` loads: config.json (with quantization_config), safetensors
    with HF tensor names (fused q/k/v and gate/up split back; `.qweight` int8 + `.scales`), the tokenizer."""
    import os

    from safetensors.torch import save_file

    tensors = {}
    for name, param in model.named_parameters():
        hf = name if name.startswith("lm_head") else f"model.{name}"
        parts = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
        for fused, names in parts.items():
            if f".{fused}." in hf:
                module = model.get_submodule(name.rsplit(".", 1)[0])
                for shard_name, (offset, size) in zip(names, module.offsets.values()):
                    tensors[hf.replace(fused, shard_name)] = param.narrow(0, offset, size).contiguous().cpu()
                break
        else:
            tensors[hf] = param.contiguous().cpu()
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    config.quantization_config = {"quant_method": "tuili-int8", "bits": 8, "group_size": -1, "symmetric": True,
                                  "modules": "decoder linear layers and the LM head; embeddings and norms float"}
    config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
