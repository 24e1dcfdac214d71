"""The batch-1 decode matmuls of Llama-3.1-8B's 32 layers as the engine chains them (qkv with the input norm
inside, o with the residual add, gate_up with the norm, down with silu * mul and the residual add), one CUDA graph
over random INT4 g128 weights: us per layer through the Triton GEMV and through stream_gemv for each variant
(ctas, stages, pre, rows; and two diagnostics that make the results wrong: "nocompute": no products, the stream
alone, "keepx" with it: x still read and prepared; "xconst": x not read, a constant), and how far the final
residual streams of the two paths differ. Device only.

usage: python scripts/probe_stream_gemv.py OUT.json ['[{}, {"stages": 4}, {"pre": 0}, {"nocompute": true}]']"""
import json
import os
import sys

import torch

from tuili.ops import quant_matmul, stream_gemv

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gemv_layers import graph_us  # noqa: E402

H, F, QKV, LAYERS = 4096, 14336, 6144, 32
X_CONST = "make_uint4(0x3f803f80u ^ (k0 + c), 0x3f803f80u, 0x3f803f80u, 0x3c003c00u)"


def random_layer(n: int, k: int):
    q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
    s = (torch.rand(n, k // 128, device="cuda") * 2e-3 + 1e-3).bfloat16()
    z = (-8 * s.float() + torch.randn_like(s.float()) * 1e-3).bfloat16()
    return q, quant_matmul.group_major(s), quant_matmul.group_major(z), 128


def variant_source(source: str, nocompute: bool, keepx: bool, xconst: bool) -> str:
    if nocompute:
        source = source.replace("reduce_rows(acc, lane);", "").replace("float acc[R];", "float acc[R] = {};\n#if 0") \
            .replace("      acc[r] = a;\n    }\n", "      acc[r] = a;\n    }\n#endif\n"
                     + ("    acc[0] = xsum[0] + p2e[0] + __uint_as_float(xp[0][0]);\n" if keepx else ""))
    if xconst:
        source = source.replace("*(const uint4*)(x + k0 + 8 * c);", X_CONST + ";") \
            .replace("*(const uint4*)(x + K + k0 + 8 * c);", X_CONST + ";")
    return source


def main(out: str, variants: list[dict]) -> None:
    torch.manual_seed(0)
    layers = [dict(qkv=random_layer(QKV, H), o=random_layer(H, H), gu=random_layer(2 * F, H), down=random_layer(H, F),
                   nw1=torch.rand(H, device="cuda").bfloat16() + 0.5, nw2=torch.rand(H, device="cuda").bfloat16() + 0.5)
              for _ in range(LAYERS)]
    nbytes = sum(t.numel() * t.element_size() for L in layers for key in ("qkv", "o", "gu", "down")
                 for t in L[key][:3])
    h0 = torch.randn(1, H, device="cuda").bfloat16()
    h = h0.clone()

    def chain(mm):
        h.copy_(h0)
        hw = (h.float() * layers[0]["nw1"].float()).bfloat16()
        ss = (h.float() ** 2).sum(1, keepdim=True)
        for L in layers:
            qkv = mm(hw, L["qkv"], norm=(1e-5, ss))
            _, hw, ss = mm(qkv[:, :H], L["o"], residual=h, norm_weight=L["nw2"])
            gu = mm(hw, L["gu"], norm=(1e-5, ss))
            _, hw, ss = mm(gu, L["down"], silu_mul=True, residual=h, norm_weight=L["nw1"])

    def triton(x, w, **kw):
        return quant_matmul.quant_linear_triton(x, *w, **kw)

    quant_matmul.STREAM_GEMV = False
    base_us = graph_us(lambda: chain(triton), LAYERS)
    chain(triton)
    h_triton = h.clone()
    quant_matmul.STREAM_GEMV = True
    rec = dict(device=torch.cuda.get_device_name(), bytes_per_layer=nbytes // LAYERS,
               triton_us_per_layer=round(base_us, 2), triton_TB_s=round(nbytes / LAYERS / base_us / 1e6, 3),
               variants=[])
    print(json.dumps({k: v for k, v in rec.items() if k != "variants"}), flush=True)
    source = stream_gemv._SOURCE
    for v in variants:
        v = dict(v)
        diag = {key: v.pop(key, False) for key in ("nocompute", "keepx", "xconst")}
        stream_gemv._SOURCE = variant_source(source, **diag)
        stream_gemv._compiled.cache_clear()

        def streamed(x, w, **kw):
            return stream_gemv.stream_gemv(x, w[0], w[1], w[2], **kw, **v)
        try:
            us = graph_us(lambda: chain(streamed), LAYERS)
        except Exception as e:
            rec["variants"].append(dict(v, **diag, error=str(e)[:300]))
            print(v, diag, "failed:", str(e)[:300], flush=True)
            continue
        chain(streamed)
        diff = ((h.float() - h_triton.float()).norm() / h_triton.float().norm()).item()
        rec["variants"].append(dict(v, **diag, us_per_layer=round(us, 2), TB_s=round(nbytes / LAYERS / us / 1e6, 3),
                                    rel_diff_vs_triton=diff))
        print(rec["variants"][-1], flush=True)
    stream_gemv._SOURCE = source
    stream_gemv._compiled.cache_clear()
    with open(out, "w") as f:
        json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else [{}])
