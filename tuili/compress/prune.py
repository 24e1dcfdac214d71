"""`tuili prune`: structured pruning to a smaller dense model of the same family (a HF folder tuili and HF load).

Importance is measured on calibration text (the shipped prose by default):
- a layer's: how much it changes the residual stream it reads, 1 - cos(stream in, stream out) averaged over
  tokens (ShortGPT's block influence): layers that barely turn the stream go first;
- an MLP channel's: mean |activation| entering down_proj times the norm of its down_proj column;
- a KV group's (a kv head and the query heads sharing it): mean norm of its heads' attention outputs times the
  norm of their o_proj columns;
- a hidden channel's: mean |residual stream| over every layer's input.
Sizes come from explicit values (--num-layers, --intermediate-size, --num-kv-heads, --hidden-size) or from a
target (--target-params N or --ratio R): half of the cut from depth, the rest from MLP width (what is left
after the explicit sizes). Keeping everything gives the teacher's tensors exactly.
"""
from __future__ import annotations

import argparse
import copy
import logging
from dataclasses import dataclass

import torch

from tuili.compress.common import (forward, load_float_model, resolve_device, save_hf_folder, text_token_ids,
                                   windows_of)

logger = logging.getLogger("tuili")


@dataclass
class Importance:
    layer: torch.Tensor       # [L]
    mlp: torch.Tensor         # [L, intermediate]
    kv_group: torch.Tensor    # [L, kv heads]
    hidden: torch.Tensor      # [hidden]


@torch.no_grad()
def measure_importance(model, windows: torch.Tensor, batch_size: int = 4) -> Importance:
    """Run `windows` [N, L] through the model with hooks that accumulate the scores of the module docstring."""
    layers = model.layers
    n_layers, attn = len(layers), layers[0].self_attn
    inter = layers[0].mlp.down_proj.weight.shape[1]
    group = attn.num_heads // attn.num_kv_heads
    layer_score = torch.zeros(n_layers)
    mlp_act = torch.zeros(n_layers, inter)
    head_out = torch.zeros(n_layers, attn.num_heads)
    hidden_abs = torch.zeros(model.config.hidden_size)
    tokens = 0
    streams: dict[int, torch.Tensor] = {}
    hooks = []

    def stream(x, residual):
        return x if residual is None else x + residual

    for i, layer in enumerate(layers):
        def pre(module, args, i=i):
            _, x, residual = args
            streams[i] = stream(x, residual).float()

        def post(module, args, out, i=i):
            nonlocal hidden_abs
            before, after = streams.pop(i), stream(*out).float()
            layer_score[i] += (1 - torch.cosine_similarity(before, after, dim=-1)).sum().cpu()
            hidden_abs += before.abs().sum(0).cpu()

        def mlp_in(module, args, i=i):
            mlp_act[i] += args[0].float().abs().sum(0).cpu()

        def attn_in(module, args, i=i):
            o = args[0].float().view(args[0].shape[0], attn.num_heads, -1)
            head_out[i] += o.norm(dim=-1).sum(0).cpu()

        hooks += [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post),
                  layer.mlp.down_proj.register_forward_pre_hook(mlp_in),
                  layer.self_attn.o_proj.register_forward_pre_hook(attn_in)]
    try:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start:start + batch_size]
            forward(model, batch)
            tokens += batch.numel()
    finally:
        for h in hooks:
            h.remove()
    mlp, kv = torch.zeros_like(mlp_act), torch.zeros(n_layers, attn.num_kv_heads)
    for i, layer in enumerate(layers):
        down = layer.mlp.down_proj.weight.float().cpu()                       # [hidden, inter]
        mlp[i] = mlp_act[i] / tokens * down.norm(dim=0)
        o = layer.self_attn.o_proj.weight.float().cpu().view(-1, attn.num_heads, attn.head_dim)
        heads = head_out[i] / tokens * o.norm(dim=(0, 2))
        kv[i] = heads.view(attn.num_kv_heads, group).sum(-1)
    return Importance(layer_score / tokens, mlp, kv, hidden_abs / (tokens * n_layers))


def count_params(config) -> int:
    """Parameters of a Llama-family model of this config (tied embeddings counted once)."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    d = getattr(config, "head_dim", None) or h // heads
    embed = config.vocab_size * h * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    attn = h * (heads + 2 * kv) * d + heads * d * h
    if getattr(config, "attention_bias", False):
        attn += (heads + 2 * kv) * d + h
    elif config.model_type == "qwen2":  # q/k/v biases, always
        attn += (heads + 2 * kv) * d
    qk_norm = 2 * d if config.model_type == "qwen3" else 0
    mlp = 3 * h * inter + (inter * 2 + h if getattr(config, "mlp_bias", False) else 0)
    return embed + h + layers * (attn + qk_norm + mlp + 2 * h)


@dataclass
class PrunePlan:
    layers: list[int]                 # kept layers, in order
    mlp: list[torch.Tensor]           # per kept layer: kept MLP channels (sorted)
    kv_groups: list[torch.Tensor]     # per kept layer: kept kv heads (sorted)
    hidden: torch.Tensor              # kept hidden channels (sorted)
    config: object                    # the pruned model's config


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return scores.topk(k).indices.sort().values


def plan(config, imp: Importance, target_params: int | None = None, num_layers: int | None = None,
         intermediate_size: int | None = None, num_kv_heads: int | None = None,
         hidden_size: int | None = None) -> PrunePlan:
    """Sizes (explicit ones first, then the target: see the module docstring) and the channels to keep."""
    kv0 = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    limits = {"num_layers": (num_layers, config.num_hidden_layers), "intermediate_size":
              (intermediate_size, config.intermediate_size), "num_kv_heads": (num_kv_heads, kv0),
              "hidden_size": (hidden_size, config.hidden_size)}
    for name, (value, most) in limits.items():
        if value is not None and not 1 <= value <= most:
            raise ValueError(f"--{name.replace('_', '-')} must be in [1, {most}] (the model's), got {value}")
    new = copy.deepcopy(config)
    group = config.num_attention_heads // kv0
    new.num_hidden_layers = num_layers or config.num_hidden_layers
    new.intermediate_size = intermediate_size or config.intermediate_size
    new.num_key_value_heads = num_kv_heads or kv0
    new.num_attention_heads = new.num_key_value_heads * group
    new.hidden_size = hidden_size or config.hidden_size
    new.head_dim = head_dim
    if target_params is not None:
        total = count_params(config)
        if not 0 < target_params <= total:
            raise ValueError(f"target of {target_params:,} parameters is not in (0, {total:,}] (the model's size)")
        floor = count_params(_with(new, num_hidden_layers=1, intermediate_size=1))
        if target_params < floor and num_layers is None:
            raise ValueError(f"target of {target_params:,} parameters is below {floor:,}, the size of one layer "
                             "with one MLP channel (the embeddings alone are most of it)")
        cut = count_params(new) - target_params
        if cut > 0 and num_layers is None:  # half of the cut from depth ...
            per_layer = (count_params(new) - count_params(_with(new, num_hidden_layers=0))) / new.num_hidden_layers
            drop = int(round(cut / 2 / per_layer)) if intermediate_size is None else int(-(-cut // per_layer))
            new.num_hidden_layers = max(1, new.num_hidden_layers - drop)
        if count_params(new) > target_params and intermediate_size is None:  # ... the rest from MLP width
            per_channel = count_params(_with(new, intermediate_size=2)) - count_params(_with(new, intermediate_size=1))
            over = count_params(new) - target_params
            new.intermediate_size = max(1, new.intermediate_size - int(-(-over // per_channel)))
        while count_params(new) > target_params and new.num_hidden_layers > 1 and num_layers is None:
            new.num_hidden_layers -= 1  # MLP at its floor: more depth
        if count_params(new) > target_params * 1.02:
            raise ValueError(f"the explicit sizes leave {count_params(new):,} parameters, above the target of "
                             f"{target_params:,}: give fewer explicit sizes or a larger target")
    keep_layers = _top(imp.layer, new.num_hidden_layers).tolist()
    if getattr(config, "layer_types", None):  # Qwen2/3: one entry per layer, checked against the layer count
        new.layer_types = [config.layer_types[i] for i in keep_layers]
    return PrunePlan(
        layers=keep_layers, mlp=[_top(imp.mlp[i], new.intermediate_size) for i in keep_layers],
        kv_groups=[_top(imp.kv_group[i], new.num_key_value_heads) for i in keep_layers],
        hidden=_top(imp.hidden, new.hidden_size), config=new)


def _with(config, **changes):
    c = copy.deepcopy(config)
    for k, v in changes.items():
        setattr(c, k, v)
    return c


def apply(state: dict[str, torch.Tensor], config, p: PrunePlan) -> dict[str, torch.Tensor]:
    """The pruned model's HF-named tensors, selected from the teacher's (`state`: HF names, float)."""
    kv0 = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    group = config.num_attention_heads // kv0
    d = p.config.head_dim
    hid = p.hidden
    out = {}
    for name, t in state.items():
        if not name.startswith("model.layers."):
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                out[name] = t[:, hid]
            elif name == "model.norm.weight":
                out[name] = t[hid]
            continue
        index, rest = name.removeprefix("model.layers.").split(".", 1)
        if int(index) not in p.layers:
            continue
        j = p.layers.index(int(index))
        kv_rows = (p.kv_groups[j][:, None] * d + torch.arange(d)).flatten()   # rows of k/v, by head
        heads = (p.kv_groups[j][:, None] * group + torch.arange(group)).flatten()
        q_rows = (heads[:, None] * d + torch.arange(d)).flatten()
        rows = {"self_attn.q_proj": q_rows, "self_attn.k_proj": kv_rows, "self_attn.v_proj": kv_rows,
                "mlp.gate_proj": p.mlp[j], "mlp.up_proj": p.mlp[j], "self_attn.o_proj": hid, "mlp.down_proj": hid}
        cols = {"self_attn.q_proj": hid, "self_attn.k_proj": hid, "self_attn.v_proj": hid, "mlp.gate_proj": hid,
                "mlp.up_proj": hid, "self_attn.o_proj": q_rows, "mlp.down_proj": p.mlp[j]}
        module, kind = rest.rsplit(".", 1)
        if module in ("input_layernorm", "post_attention_layernorm"):
            t = t[hid]
        elif module in rows:
            t = t[rows[module]]
            if kind == "weight":
                t = t[:, cols[module]]
        # q_norm / k_norm act per head_dim: unchanged
        out[f"model.layers.{j}.{rest}"] = t
    return out


def run_prune(ns: argparse.Namespace) -> int:
    from tuili.config import parse_dtype

    device = resolve_device(ns.device)
    model, source = load_float_model(ns.model, device, load_format=ns.load_format, tokenizer=ns.tokenizer)
    config = source.config
    total = count_params(config)
    if ns.target_params is not None and ns.ratio is not None:
        raise ValueError("give --target-params or --ratio, not both")
    if ns.ratio is not None and not 0 < ns.ratio <= 1:
        raise ValueError(f"--ratio must be in (0, 1], got {ns.ratio}")
    target = ns.target_params if ns.target_params is not None else (
        int(total * ns.ratio) if ns.ratio is not None else None)
    ids = text_token_ids(source.tokenizer, ns.calibration_file)[:ns.calibration_tokens]
    imp = measure_importance(model, windows_of(ids, min(ns.window, len(ids), config.max_position_embeddings), device))
    p = plan(config, imp, target, ns.num_layers, ns.intermediate_size, ns.num_kv_heads, ns.hidden_size)
    dtype = parse_dtype(ns.dtype) or torch.float32
    state = {k: v.to(dtype) for k, v in apply(model.hf_state_dict(), config, p).items()}
    save_hf_folder(state, p.config, source.tokenizer, ns.out)
    kept = count_params(p.config)
    print(f"pruned {source.name}: {total:,} -> {kept:,} parameters ({kept / total:.1%}); layers "
          f"{config.num_hidden_layers} -> {p.config.num_hidden_layers} (kept {p.layers}), MLP "
          f"{config.intermediate_size} -> {p.config.intermediate_size}, kv heads "
          f"{getattr(config, 'num_key_value_heads', config.num_attention_heads)} -> "
          f"{p.config.num_key_value_heads}, hidden {config.hidden_size} -> {p.config.hidden_size}; wrote {ns.out}")
    return 0


def add_prune_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="HF folder or .gguf (default: the default model)")
    parser.add_argument("--out", required=True, help="output folder (HF format)")
    parser.add_argument("--target-params", type=int, default=None, help="parameter count to prune to")
    parser.add_argument("--ratio", type=float, default=None, help="fraction of the parameters to keep")
    parser.add_argument("--num-layers", type=int, default=None)
    parser.add_argument("--intermediate-size", type=int, default=None)
    parser.add_argument("--num-kv-heads", type=int, default=None, help="kv heads kept (with their query heads)")
    parser.add_argument("--hidden-size", type=int, default=None)
    parser.add_argument("--calibration-file", default=None, help="text (default: the shipped prose)")
    parser.add_argument("--calibration-tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--load-format", default="auto", help="dummy: random weights of a named shape (tests)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    parser.add_argument("--dtype", default="float32", help="dtype of the saved weights")
    parser.add_argument("--device", default="auto")
