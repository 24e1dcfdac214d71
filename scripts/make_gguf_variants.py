"""Write copies of a GGUF file with its linear layers requantized to other block types, for the quality table.

    python scripts/make_gguf_variants.py --out /tmp/variants [--model X.gguf] [--types Q8_0,Q4_0,Q4_K,Q6_K,Q4_K_M]

Each layer is dequantized and quantized again (Q8_0/Q4_0/Q4_1 by the gguf package, Q4_K/Q6_K by
tuili/quant/gguf_blocks.py's min/max fits); Q4_K_M here approximates llama.cpp's mix: every attn_v and ffn_down
in Q6_K (llama.cpp picks some of them), the rest Q4_K. K-quants need a multiple of 256 inputs; other layers fall
back (here Q4_K -> Q4_1, Q6_K -> Q8_0; llama.cpp uses Q5_0 for the former, which tuili does not read): in
SmolLM2-135M (hidden 576) only ffn_down (1536 inputs) can be K-quantized. Metadata (tokenizer, chat template)
and the other tensors (token embedding, norms) are copied as they are. Starting from the default model's Q4_1
file, every variant is a requantization of already 4-bit weights.
"""
from __future__ import annotations

import argparse
import os

import gguf
import numpy as np
from gguf.quants import dequantize, quantize

from tuili.loader.source import default_model_path
from tuili.quant.gguf_blocks import quantize_q4_k, quantize_q6_k

QT = gguf.GGMLQuantizationType


FALLBACK = {QT.Q4_K: QT.Q4_1, QT.Q6_K: QT.Q8_0}


def target_type(name: str, variant: str, inputs: int) -> QT:
    qtype = QT[variant] if variant != "Q4_K_M" else QT.Q6_K if ("attn_v" in name or "ffn_down" in name) else QT.Q4_K
    return FALLBACK[qtype] if qtype in FALLBACK and inputs % 256 else qtype


def requantize(w: np.ndarray, qtype: QT) -> np.ndarray:
    if qtype == QT.Q4_K:
        return quantize_q4_k(w)
    if qtype == QT.Q6_K:
        return quantize_q6_k(w)
    return quantize(w, qtype)


def write_variant(src: str, out: str, variant: str) -> None:
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(out, arch)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub_type)
    for t in reader.tensors:
        shape = [int(d) for d in reversed(t.shape)]
        if len(shape) == 2 and t.name != "token_embd.weight":
            qtype = target_type(t.name, variant, shape[1])
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
            writer.add_tensor(t.name, requantize(w, qtype), raw_dtype=qtype)
        else:
            plain = t.tensor_type in (QT.F32, QT.F16)  # quantized data arrive as [rows, bytes per row]
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=None if plain else t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="source GGUF (default: the default model)")
    parser.add_argument("--types", default="Q8_0,Q4_0,Q4_K,Q6_K,Q4_K_M")
    parser.add_argument("--out", required=True, help="output folder")
    ns = parser.parse_args()
    src = ns.model or default_model_path()
    os.makedirs(ns.out, exist_ok=True)
    stem = os.path.basename(src).rsplit(".", 2)[0]
    for variant in ns.types.split(","):
        out = os.path.join(ns.out, f"{stem}.{variant}.gguf")
        write_variant(src, out, variant)
        print(f"{out}: {os.path.getsize(out) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
