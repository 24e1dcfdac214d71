"""A .gguf file: config, tokenizer and chat template from its metadata; linear layers' quantized blocks kept
packed (transcoded to tuili's INT8/INT4 formats: tuili/quant/gguf_blocks.py), everything else (the token
embedding, a table read one row at a time, and norms) as float. `--gguf-dequantize` makes every tensor float.

A file without tokenizer metadata (no `tokenizer.ggml.model`) loads with tokenizer None.

Supported tensor types: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K (the `gguf` package dequantizes them).
llama.cpp stores the Llama family's q/k projection rows interleaved for its RoPE layout; they are put back in
HF's order here, so the model code is the same for every source.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
from typing import NamedTuple

import numpy as np
import torch

from tuili.loader.source import ModelSource, WeightIterator

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


class GGUFTensor(NamedTuple):
    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF's order: innermost dimension first
    data: np.ndarray  # read-only view of the file, shaped as the gguf package's reader shapes it


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GGUFFile:
    """A .gguf file's metadata (`fields`: key -> value, arrays as lists) and tensors (views of the memory-mapped
    file, shaped as the gguf package shapes them), read with struct. The package's GGUFReader makes a numpy view
    of every element of every array first: ~4 s for the default model's 98k vocabulary and merge strings, most
    of a load, against ~0.2 s here (tests/loader/test_loaders.py checks the two agree). The package still names
    the tensor types, gives their block sizes and dequantizes. Little-endian files (what llama.cpp writes)."""

    def __init__(self, path: str) -> None:
        import mmap

        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quant_shape_to_byte_shape

        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = self._map
        magic, version = struct.unpack_from("<II", buf, 0)
        if magic != 0x46554747:  # b"GGUF"
            raise ValueError("no GGUF magic number at the start")
        if version & 0xFFFF == 0:
            raise ValueError("a big-endian GGUF file, which tuili does not read")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (tuili reads 2 and 3)")
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)

        def string(off: int) -> tuple[str, int]:
            (n,) = struct.unpack_from("<Q", buf, off)
            if off + 8 + n > len(buf):
                raise ValueError("a string runs past the end of the file")
            return str(buf[off + 8:off + 8 + n], "utf-8"), off + 8 + n

        def value(kind: int, off: int) -> tuple[object, int]:
            if kind in _SCALARS:
                return struct.unpack_from(_SCALARS[kind], buf, off)[0], off + struct.calcsize(_SCALARS[kind])
            if kind == _STRING:
                return string(off)
            if kind != _ARRAY:
                raise ValueError(f"unknown metadata value type {kind}")
            item, count = struct.unpack_from("<IQ", buf, off)
            off += 12
            if item in _SCALARS:
                size = struct.calcsize(_SCALARS[item])
                if off + count * size > len(buf):
                    raise ValueError("an array runs past the end of the file")
                items = np.frombuffer(buf, np.dtype(_SCALARS[item]), count, off).tolist()
                return items, off + count * size
            items = []
            for _ in range(count):
                v, off = value(item, off)
                items.append(v)
            return items, off

        self.fields: dict[str, object] = {}
        off = 24
        for _ in range(n_kv):
            key, off = string(off)
            (kind,) = struct.unpack_from("<I", buf, off)
            self.fields[key], off = value(kind, off + 4)
        infos = []
        for _ in range(n_tensors):
            name, off = string(off)
            (n_dims,) = struct.unpack_from("<I", buf, off)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, off + 4)
            kind, offset = struct.unpack_from("<IQ", buf, off + 4 + 8 * n_dims)
            infos.append((name, dims, GGMLQuantizationType(kind), offset))
            off += 4 + 8 * n_dims + 12
        alignment = self.fields.get("general.alignment", 32)
        start = -(-off // alignment) * alignment
        typed = {GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F32: np.float32,
                 GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
                 GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
                 GGMLQuantizationType.I64: np.int64}
        self.tensors: list[GGUFTensor] = []
        for name, dims, kind, offset in infos:
            n = int(np.prod(dims))
            block, type_size = GGML_QUANT_SIZES[kind]
            nbytes, shape = n * type_size // block, tuple(reversed(dims))
            if start + offset + nbytes > len(buf):
                raise ValueError(f"tensor {name!r} runs past the end of the file (truncated?)")
            if kind in typed:
                data = np.frombuffer(buf, typed[kind], n, start + offset)
            else:
                data = np.frombuffer(buf, np.uint8, nbytes, start + offset)
                shape = quant_shape_to_byte_shape(shape, kind)
            self.tensors.append(GGUFTensor(name, kind, tuple(int(d) for d in dims), data.reshape(shape)))


def open_reader(path: str) -> GGUFFile:
    try:
        return GGUFFile(path)
    except Exception as e:  # struct.error, ValueError, an empty file's mmap error, an unknown type
        raise ValueError(f"{path!r} is not a readable GGUF file (wrong format, truncated or corrupt): {e}") from e


def hf_name(gguf_name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(1) in _TOP_NAMES:
        return f"{_TOP_NAMES[m.group(1)]}.{m.group(2)}"
    raise ValueError(f"GGUF tensor {gguf_name!r} is not part of a supported Llama-family model")


def _unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleaving of the rotary halves in q/k rows."""
    return w.reshape(num_heads, w.shape[0] // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def config_from_metadata(reader, path: str):
    from transformers import AutoConfig

    arch = reader.fields.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(_ARCHITECTURES)}")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError("this GGUF stores Llama 3.1 RoPE factors as a tensor (rope_freqs), which tuili does not "
                         "read yet; load the HF folder of the model instead")
    get = lambda key, default=None: reader.fields.get(f"{arch}.{key}", default)  # noqa: E731
    heads = get("attention.head_count")
    hidden = get("embedding_length")
    vocab = get("vocab_size")
    if not vocab:  # older files: the tokenizer's token list, or (no tokenizer either) the embedding's rows
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        if tokens is not None:
            vocab = len(tokens)
        elif embd is not None:
            vocab = int(embd.shape[-1])  # GGUF dims run innermost first: (hidden, vocab)
        else:
            raise ValueError(f"{path!r} states no vocabulary size and has neither tokens nor token_embd.weight")
    config = AutoConfig.for_model(
        arch, architectures=[_ARCHITECTURES[arch]],
        num_hidden_layers=get("block_count"), hidden_size=hidden, intermediate_size=get("feed_forward_length"),
        num_attention_heads=heads, num_key_value_heads=get("attention.head_count_kv", heads),
        head_dim=get("attention.key_length", hidden // heads),
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-6), rope_theta=get("rope.freq_base", 10000.0),
        max_position_embeddings=get("context_length", 4096), vocab_size=vocab,
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=reader.fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=reader.fields.get("tokenizer.ggml.eos_token_id"),
    )
    if arch == "llama":
        config.attention_bias = "blk.0.attn_q.bias" in names
    return config


def load_tokenizer(path: str):
    """The tokenizer and chat template from the GGUF metadata, converted by transformers.

    Conversion re-reads the whole file (seconds), so the result is kept under ~/.cache/tuili, keyed by the
    file's path, size and modification time; a cache that cannot be written is simply not used.
    """
    from transformers import AutoTokenizer

    stat = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = os.path.join(os.path.expanduser("~/.cache/tuili/tokenizers"), key)
    if os.path.isfile(os.path.join(cached, "tokenizer_config.json")):
        try:
            return AutoTokenizer.from_pretrained(cached, local_files_only=True)
        except Exception:  # a damaged cache entry: rebuild it below
            pass
    try:
        tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                                  gguf_file=os.path.basename(path), local_files_only=True)
    except Exception as e:
        raise ValueError(f"cannot build a tokenizer from the metadata of {path!r}: {e}") from e
    tmp = f"{cached}.{os.getpid()}.tmp"  # written aside, then renamed: another process never reads half of it
    try:
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(cached, ignore_errors=True)  # a damaged entry (or one another process just wrote)
        os.rename(tmp, cached)
    except OSError:  # not writable, or another process's rename came in between
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer


def load(path: str, dequantize: bool = False) -> ModelSource:
    from tuili.quant.gguf_blocks import NATIVE, transcode

    reader = open_reader(path)
    config = config_from_metadata(reader, path)
    bad = sorted({t.tensor_type.name for t in reader.tensors} - set(SUPPORTED_TYPES))
    if bad:
        raise ValueError(f"GGUF tensor types {bad} are not supported; supported: {', '.join(SUPPORTED_TYPES)}")
    # a file without tokenizer metadata still runs, on token-id prompts (or with --tokenizer)
    tokenizer = load_tokenizer(path) if "tokenizer.ggml.model" in reader.fields else None
    permute = reader.fields.get("general.architecture") == "llama"
    packed = {} if dequantize else {
        hf_name(t.name): NATIVE[t.tensor_type.name] for t in reader.tensors
        if t.tensor_type.name in NATIVE and len(t.shape) == 2 and t.name != "token_embd.weight"}

    def rows(name: str):
        """llama.cpp's q/k row order -> HF's (a function of an array with rows first), or None."""
        if permute and name.endswith("attn_q.weight"):
            return lambda a: _unpermute(a, config.num_attention_heads)
        if permute and name.endswith("attn_k.weight"):
            return lambda a: _unpermute(a, config.num_key_value_heads)
        return None

    def weights() -> WeightIterator:
        from gguf.quants import dequantize as dequantize_blocks

        for t in reader.tensors:
            name, reorder = hf_name(t.name), rows(t.name)
            fmt = source.packed.get(name) if source.packed else None  # the loader may have unified fused shards
            if fmt is not None:
                n, k = int(t.shape[1]), int(t.shape[0])
                parts = transcode(t.data, t.tensor_type.name, n, k, fmt, torch.float32, reorder)
                for part, tensor in parts.items():
                    yield name.removesuffix("weight") + part, tensor
                continue
            data = dequantize_blocks(t.data, t.tensor_type)
            data = data.reshape([int(d) for d in reversed(t.shape)])
            if reorder is not None:
                data = reorder(data)
            yield name, torch.from_numpy(np.array(data, dtype=np.float32))

    source = ModelSource(path, config, tokenizer, weights, torch.float32, packed=packed or None)
    return source
