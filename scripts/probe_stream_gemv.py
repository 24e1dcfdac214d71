"""The batch-1 decode matmuls of Llama-3.1-8B's 32 layers as the engine chains them (qkv with the input norm
inside, o with the residual add, gate_up with the norm, down with silu * mul and the residual add), one CUDA graph
over random INT4 g128 / INT8 weights: us per layer through the Triton GEMV (quant_matmul.STREAM off) and through
stream_gemv for each variant (CTAs, ring stages, rows per stage), and how far the final residual streams of the
two paths differ. Device only.

usage: python scripts/probe_stream_gemv.py OUT.json [int4|int8 ...] ['[{"ctas": 264}, {"stages": 6}, ...]']"""
import json
import os
import sys

import torch

from tuili.ops import quant_matmul, stream_gemv

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gemv_layers import graph_us  # noqa: E402

H, F, QKV, LAYERS = 4096, 14336, 6144, 32


def random_layer(bits: int, n: int, k: int):
    if bits == 8:
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
        return q, (torch.rand(n, device="cuda") * 2e-4 + 1e-4).bfloat16(), None, 0
    q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
    s = (torch.rand(n, k // 128, device="cuda") * 2e-3 + 1e-3).bfloat16()
    z = (-8 * s.float() + torch.randn_like(s.float()) * 1e-3).bfloat16()
    return q, quant_matmul.group_major(s), quant_matmul.group_major(z), 128


def copy_rate() -> float:
    """TB/s of a 1 GiB device-to-device copy (read + write), the ceiling the GEMVs are held against."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() / graph_us(lambda: b.copy_(a), 1) / 1e6


def main(out: str, methods: list[str], variants: list[dict]) -> None:
    torch.manual_seed(0)
    results = []
    copy_TB_s = copy_rate()
    for method in methods:
        bits = 8 if method == "int8" else 4
        layers = [dict(qkv=random_layer(bits, QKV, H), o=random_layer(bits, H, H), gu=random_layer(bits, 2 * F, H),
                       down=random_layer(bits, H, F), nw1=torch.rand(H, device="cuda").bfloat16() + 0.5,
                       nw2=torch.rand(H, device="cuda").bfloat16() + 0.5) for _ in range(LAYERS)]
        nbytes = sum(t.numel() * t.element_size() for L in layers for key in ("qkv", "o", "gu", "down")
                     for t in L[key][:3] if t is not None)
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

        quant_matmul.STREAM = False
        base_us = graph_us(lambda: chain(triton), LAYERS)
        chain(triton)
        h_triton = h.clone()
        quant_matmul.STREAM = True
        rec = dict(method=method, copy_TB_s=round(copy_TB_s, 3), bytes_per_layer=nbytes // LAYERS,
                   triton_us_per_layer=round(base_us, 2),
                   triton_TB_s=round(nbytes / LAYERS / base_us / 1e6, 3), variants=[])
        source = stream_gemv._SOURCE
        for v in variants:
            v = dict(v)
            nocompute = v.pop("nocompute", False)  # the stream alone: no products (wrong results)
            stream_gemv._SOURCE = source.replace("stage_sums(acc,", "if (0) stage_sums(acc,") if nocompute else source
            stream_gemv._compiled.cache_clear()

            def streamed(x, w, **kw):
                return stream_gemv.stream_gemv(x, w[0], w[1], w[2], **kw, **v)
            try:
                us = graph_us(lambda: chain(streamed), LAYERS)
            except Exception as e:
                rec["variants"].append(dict(v, error=str(e)[:200]))
                print(method, v, "failed:", str(e)[:200], flush=True)
                continue
            chain(streamed)
            diff = ((h.float() - h_triton.float()).norm() / h_triton.float().norm()).item()
            rec["variants"].append(dict(v, nocompute=nocompute, us_per_layer=round(us, 2),
                                        TB_s=round(nbytes / LAYERS / us / 1e6, 3), rel_diff_vs_triton=diff))
            print(method, v, rec["variants"][-1], flush=True)
        stream_gemv._SOURCE = source
        stream_gemv._compiled.cache_clear()
        print(json.dumps({k: v for k, v in rec.items() if k != "variants"}), flush=True)
        results.append(rec)
        layers.clear()
        torch.cuda.empty_cache()
    with open(out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "copy_TB_s": copy_TB_s, "results": results}, f, indent=1)


if __name__ == "__main__":
    args = sys.argv[2:]
    variants = json.loads(args.pop()) if args and args[-1].startswith("[") else [{}]
    main(sys.argv[1], args or ["int4", "int8"], variants)
