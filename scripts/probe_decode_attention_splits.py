"""Decode attention as the engine runs it in a batch-1 step (RoPE and the K/V store inside, then the split merge)
over 32 layers' paged caches in one CUDA graph, Llama-3.1-8B's heads: us per layer for each MIN_SPLIT_TOKENS
(0: one split, no merge kernel) and context length. Device only.

usage: python scripts/probe_decode_attention_splits.py OUT.json '[0, 64, 128]' '[128, 384, 4096]'"""
import json
import os
import sys

import torch

from tuili.ops import attention_triton as at

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gemv_layers import graph_us  # noqa: E402


def main():
    dev = torch.device("cuda")
    H, KVH, D, page, layers = 32, 8, 128, 16, 32
    res = {"device": torch.cuda.get_device_name(0), "commit": os.environ.get("TUILI_COMMIT", ""), "runs": []}
    splits = at.choose_num_splits(1, KVH, 131072, page)
    res["num_splits"] = splits
    cos = torch.randn(32768, D // 2, device=dev, dtype=torch.bfloat16)
    sin = torch.randn(32768, D // 2, device=dev, dtype=torch.bfloat16)
    for L in json.loads(sys.argv[3]):
        pages = -(-L // page)
        caches = [(torch.randn(pages + 1, page, KVH, D, device=dev, dtype=torch.bfloat16),
                   torch.randn(pages + 1, page, KVH, D, device=dev, dtype=torch.bfloat16)) for _ in range(layers)]
        table = torch.randperm(pages + 1, device=dev)[:pages].int()[None]
        seq_lens = torch.tensor([L], device=dev, dtype=torch.int32)
        pos = torch.tensor([L - 1], device=dev)
        slot = (table[0, (L - 1) // page] * page + (L - 1) % page).reshape(1).int()
        q = torch.randn(1, H, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, KVH, D, device=dev, dtype=torch.bfloat16)
        v = torch.randn(1, KVH, D, device=dev, dtype=torch.bfloat16)
        for ms in json.loads(sys.argv[2]):
            at.MIN_SPLIT_TOKENS = max(ms, 16)
            n = splits if ms else 1
            fn = lambda: [at.paged_decode_attention(q, kc, vc, table, seq_lens, 0.088, n,  # noqa: E731
                                                    rope=(k, v, cos, sin, pos, slot)) for kc, vc in caches]
            us = graph_us(fn, layers)
            rec = dict(context=L, min_split=ms, us_per_layer=round(us, 2))
            print(json.dumps(rec), flush=True)
            res["runs"].append(rec)
    with open(sys.argv[1], "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
