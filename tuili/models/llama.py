"""The Llama family in one class: Llama 2/3 (llama3 RoPE scaling), Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm),
SmolLM. Every difference between them is a field of the HF config or a flag set from the architecture name.

Shapes: T = tokens in the flattened batch, H / KVH = query / key-value heads, D = head_dim.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from tuili.layers.attention import Attention
from tuili.layers.linear import Linear, MergedLinear, default_weight_loader
from tuili.layers.norm import RMSNorm
from tuili.layers.rotary import RotaryEmbedding, rope_parameters
from tuili.ops import cpu_kernels, prefetch, quant_matmul, rope
from tuili.ops import activation


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


EARLY_MAX_ROWS = 16  # launch_early up to here (8B INT4, H200, tok/s without -> with: 1 row 566.7 -> 577.5, 2: 929.6 ->
# 948.9, 4: 1809.5 -> 1855.0, 8: 3343 -> 3387, 16: 5222 -> 5309, but 32: 7541 -> 7335; INT8 1 row 414.6 -> 426.9)


class LlamaAttention(nn.Module):
    def __init__(self, config, qkv_bias: bool, qk_norm: bool, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim_of(config)
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(config.hidden_size, {"q": self.q_size, "k": self.kv_size, "v": self.kv_size},
                                     bias=qkv_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=getattr(config, "attention_bias", False))
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.rotary = rotary  # one for all layers (the torch path caches the step's table rows in it)
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim)
        self.fused_qk_norm_rope = None
        self.l2_prefetch: tuple[tuple[int, int], ...] = ()  # weights asked of the L2 while it attends (ops/prefetch)

    def use_triton(self, enabled: bool) -> None:
        """Qwen3's q/k norms and RoPE in one kernel (the separate norm/rope modules switch themselves)."""
        if self.q_norm is not None:
            self.fused_qk_norm_rope = rope.qk_norm_rope_triton if enabled else None

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.attend(positions, self.qkv_proj(x)).flatten(1))

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
        """[T, (H + 2 KVH) D] projections -> [T, H, D] attention output (RoPE, q/k norms, the KV cache)."""
        # (not for one row where o's GEMV launches early: its own copies then overlap the attention, and the side
        # branch only costs, 8B INT4 batch 1, H200: 584.0 tok/s without it, 575.5 with it; INT8: 426.9 against 422.2.
        # From 2 rows it stays: INT4 batch 2 948.9 with it, 938.2 without)
        rows = qkv.shape[0]
        if self.l2_prefetch and rows <= prefetch.MAX_ROWS and not (rows == 1 and 1 in self.attn.launch_early_rows):
            prefetch.issue(self.l2_prefetch, qkv.device)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)                      # [T, H, D]
        k = k.view(-1, self.num_kv_heads, self.head_dim)                   # [T, KVH, D]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is None and not self.rotary.triton:  # torch path: q and k rotated as one tensor
            qk = qkv[:, :self.q_size + self.kv_size].view(-1, self.num_heads + self.num_kv_heads, self.head_dim)
            q, k = self.rotary.rotate(positions, qk).split([self.num_heads, self.num_kv_heads], dim=1)
        elif self.fused_qk_norm_rope is not None:
            q, k = self.fused_qk_norm_rope(q, k, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps,
                                           self.rotary.cos, self.rotary.sin, positions)
        elif self.q_norm is None and (o := self.attn.forward_rope(positions, q, k, v, self.rotary)) is not None:
            return o                                                       # RoPE and the K/V store: one kernel
        else:
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = self.rotary(positions, q, k)
        return self.attn(q, k, v)                                          # [T, H, D]


class LlamaMLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (only silu)")
        self.gate_up_proj = MergedLinear(config.hidden_size, {0: config.intermediate_size,
                                                               1: config.intermediate_size},
                                         bias=getattr(config, "mlp_bias", False))
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=getattr(config, "mlp_bias", False))
        self.use_triton(False)

    def use_triton(self, enabled: bool) -> None:
        self._act = activation.silu_and_mul_triton if enabled else activation.silu_and_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj.forward_gated(self.gate_up_proj(x), self._act)  # [T, 2F] -> [T, F] -> [T, hidden]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, qkv_bias: bool, qk_norm: bool, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, qkv_bias, qk_norm, rotary)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None):
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual

    def forward_fused(self, positions: torch.Tensor, h: torch.Tensor, hw: torch.Tensor | None,
                      ss: torch.Tensor | None, next_norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """The same with the residual adds and norms inside the quantized GEMVs (see LlamaForCausalLM.forward): h,
        the residual stream, is updated in place; hw = h * this layer's input norm weight and ss, the sums of
        squares of h per column tile, come from the GEMV that last added into h (None in the first layer, whose
        input norm runs as its own kernel). Returns the (hw, ss) for next_norm."""
        attn, mlp = self.self_attn, self.mlp
        if ss is None:
            qkv = attn.qkv_proj(self.input_layernorm(h))
        else:
            qkv = attn.qkv_proj.forward_fused(hw, norm=(self.input_layernorm, ss))
        _, hw, ss = attn.o_proj.forward_fused(attn.attend(positions, qkv).flatten(1), residual=h,
                                              next_norm=self.post_attention_layernorm)
        gate_up = mlp.gate_up_proj.forward_fused(hw, norm=(self.post_attention_layernorm, ss))
        return mlp.down_proj.forward_fused(gate_up, silu_mul=True, residual=h, next_norm=next_norm)[1:]


class LlamaForCausalLM(nn.Module):
    """Decoder-only transformer; `forward` gives hidden states, `compute_logits` the vocabulary scores."""

    # checkpoint name fragment -> (our fused parameter, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config, qkv_bias: bool = False, qk_norm: bool = False) -> None:
        super().__init__()
        self.config = config
        qkv_bias = qkv_bias or getattr(config, "attention_bias", False)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.embed_tokens.weight.weight_loader = default_weight_loader
        theta, scaling = rope_parameters(config)
        rotary = RotaryEmbedding(head_dim_of(config), config.max_position_embeddings, theta, scaling)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, qkv_bias, qk_norm, rotary)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = None if self.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size)
        self.lm_head_int8: tuple[torch.Tensor, torch.Tensor] | None = None  # (int8 [vocab, hidden], scales)
        self.fuse_norms, self._fused_rows = False, {}

    def set_backends(self, fused_ops: bool, triton_attention: bool, l2_prefetch: bool = True) -> None:
        """Triton kernels (fused_ops: norms, RoPE, SiLU; triton_attention: paged attention) or torch references.
        fused_ops with quantized projections on CUDA: decode batches the GEMVs take also get the norms and
        residual adds inside them (fuse_norms), and, with l2_prefetch on a GPU that has it, the L2 prefetch of
        each layer's next weights during attention (ops/prefetch.py)."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.use_triton(triton_attention)
            elif module is not self and hasattr(module, "use_triton"):
                module.use_triton(fused_ops)
        self.fuse_norms = fused_ops and all(p.qweight is not None and p.qweight.is_cuda
                                            for layer in self.layers for p in self._projections(layer))
        self._fused_rows: dict[int, bool] = {}
        # quantized GEMVs: each layer's o and gate/up weights are asked of the L2 while a batch-1 decode step
        # attends (ops/prefetch.py; bf16 weights through cuBLAS were slower with it: 802 -> 768 tok/s, 1B, H100)
        for layer in self.layers:
            o, gate_up = layer.self_attn.o_proj, layer.mlp.gate_up_proj
            o_parts = [o.qweight, o.scales, o.offsets]  # all of o's bytes, then prefetch.AHEAD of gate/up's
            budget = sum(t.numel() * t.element_size() for t in o_parts if t is not None) + prefetch.AHEAD
            layer.self_attn.l2_prefetch = prefetch.ranges([*o_parts, gate_up.qweight], budget) \
                if self.fuse_norms and l2_prefetch else ()
            # decode steps of up to EARLY_MAX_ROWS rows: the decode attention lets o's kernel launch at once where it
            # loads its weights before its wait (attention_triton.paged_decode_attention's launch_early)
            layer.self_attn.attn.launch_early_rows = frozenset(m for m in range(1, EARLY_MAX_ROWS + 1) if (
                triton_attention and o.qweight is not None and quant_matmul.loads_before_wait(
                    m, o.qweight, o.scales, o.offsets, o.group_size,
                    layer.post_attention_layernorm.weight if self.fuse_norms else None)))

    @staticmethod
    def _projections(layer: LlamaDecoderLayer) -> tuple[Linear, ...]:
        attn, mlp = layer.self_attn, layer.mlp
        return attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj

    def norms_fuse(self, rows: int) -> bool:
        """Whether a forward of `rows` tokens runs the layers with their norms and residual adds inside the
        quantized GEMVs (fuse_norms on, every projection through the GEMV on words, no bias where it adds)."""
        if rows not in self._fused_rows:
            self._fused_rows[rows] = self.fuse_norms and all(
                quant_matmul.fuses_norms(rows, p.qweight.shape[1] * (2 if p.qweight.dtype == torch.uint8 else 1),
                                         p.group_size, p.qweight, p.scales)
                for layer in self.layers for p in self._projections(layer)) and all(
                layer.self_attn.o_proj.bias is None and layer.mlp.down_proj.bias is None for layer in self.layers)
        return self._fused_rows[rows]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)                                   # [T, hidden]
        if self.norms_fuse(x.shape[0]):  # decode on quantized GEMVs: 2 kernels fewer per layer
            hw = ss = None
            for i, layer in enumerate(self.layers):
                nxt = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.norm
                hw, ss = layer.forward_fused(positions, x, hw, ss, nxt)
            x = self.norm(x)
        else:
            residual = None
            for layer in self.layers:
                x, residual = layer(positions, x, residual)
            x, _ = self.norm(x, residual)
        prefetch.join(x.device)  # the side stream of the L2 prefetches, if any, back into this one
        return x

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters (float or packed) under HF checkpoint names: fused q/k/v and gate/up split back into their
        shards by rows (views, not copies)."""
        fused: dict[str, list] = {}
        for fragment, (name, shard) in self.packed_modules_mapping.items():
            fused.setdefault(name, []).append((fragment, shard))
        out = {}
        for name, p in self.named_parameters():
            module_name, _, kind = name.rpartition(".")
            parent, _, leaf = module_name.rpartition(".")
            prefix = "" if name.startswith("lm_head") else "model."
            if leaf in fused:
                module = self.get_submodule(module_name)
                for fragment, shard in fused[leaf]:
                    offset, size = module.shards[shard]
                    out[f"{prefix}{parent}.{fragment}.{kind}"] = p.narrow(0, offset, size)
            else:
                out[prefix + name] = p
        return out

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:                                           # tied embeddings
            if self.lm_head_int8 is not None and hidden.shape[0] <= 16 and hidden.dtype == self.lm_head_int8[1].dtype:
                return quant_matmul.int8_linear_cpu(hidden, *self.lm_head_int8)  # see load_model
            if hidden.device.type == "cpu":
                return cpu_kernels.dense_linear(hidden, self.embed_tokens.weight)
            return F.linear(hidden, self.embed_tokens.weight)              # [N, vocab]
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors; fused parameters take their shards. Every parameter must be loaded."""
        params = dict(self.named_parameters())
        expected = {name: {None} for name in params}  # the shards each parameter needs
        for prefix, module in self.named_modules():
            if isinstance(module, MergedLinear):
                for pname, _ in module.named_parameters(recurse=False):
                    expected[f"{prefix}.{pname}"] = set(module.shards)
        loaded: dict[str, set] = {name: set() for name in params}
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb.inv_freq" in name or (name == "lm_head.weight" and self.lm_head is None):
                continue
            for fragment, (fused, shard_id) in self.packed_modules_mapping.items():
                if f".{fragment}." in name:
                    name = name.replace(fragment, fused)
                    break
            else:
                shard_id = None
            if name not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            param = params[name]
            tensor = tensor.to(param.dtype)
            if shard_id is None:
                param.weight_loader(param, tensor)
            else:
                param.weight_loader(param, tensor, shard_id)
            loaded[name].add(shard_id)
        missing = sorted(f"{name}" + ("" if shards == {None} else f" {sorted(shards - loaded[name], key=str)}")
                         for name, shards in expected.items() if loaded[name] != shards)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")
