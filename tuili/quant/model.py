"""Quantizing a whole model: which layers, at load time or from a checkpoint saved by `tuili quantize`."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from tuili.layers.linear import Linear, MergedLinear, default_weight_loader
from tuili.quant.gguf_blocks import PackedFormat, common_format
from tuili.quant.int4 import GROUP_SIZES, quantize_groupwise
from tuili.quant.int8 import quantize_per_channel

METHODS = ("int8", "int4")


@dataclass(frozen=True)
class QuantConfig:
    """int8: per output channel, symmetric. int4: per group of `group_size` inputs, offsets (Q4_1-like) or
    symmetric; the LM head stays INT8 per channel under int4 (as llama.cpp keeps its output matrix at 6-8 bits:
    on the default model an INT4 head alone costs more perplexity than every other layer together)."""
    method: str
    group_size: int = 128
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"quantization {self.method!r} is not supported; supported: {', '.join(METHODS)}")
        if self.method == "int4" and self.group_size not in GROUP_SIZES:
            raise ValueError(f"INT4 group size must be one of {GROUP_SIZES}, got {self.group_size}")

    def __str__(self) -> str:
        if self.method == "int8":
            return "int8 (per channel)"
        return f"int4 (group {self.group_size}, {'symmetric' if self.symmetric else 'offsets'})"

    def to_checkpoint(self) -> dict:
        """config.json's quantization_config: states everything, so that loading guesses nothing."""
        int4 = self.method == "int4"
        return {"quant_method": f"tuili-{self.method}", "bits": 4 if int4 else 8,
                "group_size": self.group_size if int4 else -1, "symmetric": self.symmetric if int4 else True,
                "modules": "decoder linear layers" + (", the LM head in int8 per channel" if int4 else
                                                      " and the LM head") + "; embeddings and norms float"}

    def for_module(self, model: nn.Module, module: nn.Module) -> "QuantConfig":
        return QuantConfig("int8") if module is model.lm_head and self.method == "int4" else self

    @classmethod
    def from_checkpoint(cls, qconfig: dict) -> "QuantConfig":
        method = qconfig.get("quant_method")
        if method not in (f"tuili-{m}" for m in METHODS):
            raise ValueError(f"quantization method {method!r} of this checkpoint is not supported; tuili loads "
                             f"{', '.join('tuili-' + m for m in METHODS)} (made by `tuili quantize`)")
        if method == "tuili-int8":
            return cls("int8")
        missing = [key for key in ("group_size", "symmetric") if key not in qconfig]
        if missing:
            raise ValueError(f"the checkpoint's quantization_config lacks {', '.join(missing)}")
        return cls("int4", int(qconfig["group_size"]), bool(qconfig["symmetric"]))


def quantized_linears(model: nn.Module) -> list[Linear]:
    """The modules quantization covers: every Linear of the decoder layers, and the LM head (a tied one gets its
    own copy, so that the embedding lookup stays float: it reads one row per token)."""
    if model.lm_head is None:
        embedding = model.embed_tokens.weight
        model.lm_head = Linear(embedding.shape[1], embedding.shape[0]).to(embedding.device)
        model.lm_head.weight = nn.Parameter(embedding, requires_grad=False)
    return [m for m in (*model.layers.modules(), model.lm_head) if isinstance(m, Linear)]


def quantize_weight(weight: torch.Tensor, qc: QuantConfig) -> tuple:
    """One weight rounded to nearest: set_quantized's arguments (qweight, scales, offsets, group_size)."""
    if qc.method == "int8":
        return (*quantize_per_channel(weight), None, 0)
    return (*quantize_groupwise(weight, qc.group_size, qc.symmetric), qc.group_size)


@torch.no_grad()
def quantize_model(model: nn.Module, qc: QuantConfig, done: dict | None = None) -> int:
    """Quantize in place; returns the bytes saved (a tied head gains a packed copy: counted as a cost). `done`:
    packed weights made otherwise (GPTQ: {module: set_quantized's arguments}); the other modules round to nearest."""
    saved = 0
    # tied: no head, or the head quantized_linears made earlier (tuning) still holding the embedding itself
    tied = model.lm_head is None or model.lm_head.weight is model.embed_tokens.weight
    done = done or {}
    for module in quantized_linears(model):
        before = 0 if (tied and module is model.lm_head) else module.weight.numel() * module.weight.element_size()
        module.set_quantized(*(done.get(module) or quantize_weight(module.weight, qc.for_module(model, module))))
        saved += before - sum(p.numel() * p.element_size() for p in (module.qweight, module.scales, module.offsets)
                              if p is not None)
    return saved


def prepare_quantized(model: nn.Module, qc: QuantConfig) -> None:
    """Give the model empty packed parameters (with their shard loaders) for a saved checkpoint to load into."""
    for module in quantized_linears(model):
        mqc = qc.for_module(model, module)
        int4 = mqc.method == "int4"
        _prepare(module, PackedFormat(4, mqc.group_size, not mqc.symmetric) if int4 else PackedFormat(8, 0, False))


def prepare_packed(model: nn.Module, hf_formats: dict[str, PackedFormat]) -> dict[str, PackedFormat]:
    """Packed parameters for the linears of a GGUF file kept packed. `hf_formats` maps HF weight names (e.g.
    'model.layers.0.self_attn.q_proj.weight') to their blocks' formats; the shards of a fused layer get one
    common format, written back into `hf_formats` (the loader transcodes to it). Returns module -> format."""
    groups: dict[str, list[str]] = {}
    for hf in hf_formats:
        name = hf.removeprefix("model.").removesuffix(".weight")
        for fragment, (fused, _) in model.packed_modules_mapping.items():
            if f".{fragment}" in name:
                name = name.replace(fragment, fused)
                break
        groups.setdefault(name, []).append(hf)
    plan = {}
    for name, shards in groups.items():
        module = model.get_submodule(name)
        expected = len(module.shards) if isinstance(module, MergedLinear) else 1
        if len(shards) != expected:  # some shards float in the file: the whole layer loads float
            for hf in shards:
                del hf_formats[hf]
            continue
        fmt = common_format([hf_formats[hf] for hf in shards])
        for hf in shards:
            hf_formats[hf] = fmt
        _prepare(module, fmt)
        plan[name] = fmt
    return plan


def _prepare(module: Linear, fmt: PackedFormat) -> None:
    (n, k), device, dtype = module.weight.shape, module.weight.device, module.weight.dtype
    int4 = fmt.bits == 4
    scale_shape = (n, -(-k // fmt.group_size)) if fmt.group_size else (n,)
    module.set_quantized(torch.empty((n, k // 2) if int4 else (n, k), device=device,
                                     dtype=torch.uint8 if int4 else torch.int8),
                         torch.empty(scale_shape, dtype=dtype, device=device),
                         torch.empty(scale_shape, dtype=dtype, device=device) if fmt.offsets else None,
                         fmt.group_size)
    loader = module._load_shard if isinstance(module, MergedLinear) else default_weight_loader
    for param in (module.qweight, module.scales, module.offsets):
        if param is not None:
            param.weight_loader = loader


@torch.no_grad()
def save_quantized(model: nn.Module, config, tokenizer, out_dir: str, qc: QuantConfig,
                   rounding: str = "to nearest") -> None:
    """Write a quantized model as a folder `--model DIR` loads: config.json (with quantization_config, which
    also records how the weights were rounded), safetensors with HF tensor names (fused q/k/v and gate/up split
    back by rows; `.qweight`, `.scales`, `.offsets`), the tokenizer."""
    from safetensors.torch import save_file

    tensors = {name: t.contiguous().cpu() for name, t in model.hf_state_dict().items()}
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    config.quantization_config = {**qc.to_checkpoint(), "rounding": rounding}
    config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
