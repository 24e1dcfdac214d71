"""INT4 and INT8 on a model whose weights were trained in float: the half-size student that `tuili prune` and
`tuili distill` make from the default model (whose own weights are Q4_1 blocks, a grid INT4 g32 reproduces).
Perplexity on the prose's held-out tail (the distillation's split, as scripts/compress_report.py scores it).

    tuili prune --ratio 0.5 --out P && tuili distill --student P --out D --steps 250 --lr 8e-4
    head -c 269659 tuili/data/prose.txt > CALIB   # the prose's first 90%: calibration away from the scored tail
    tuili quantize --model D --method int4 --gptq --calibration-file CALIB --out G
    tuili quantize --model D --method int4 --gptq --tune-steps 100 --calibration-file CALIB --out T
    python scripts/quant_float_student.py D G T OUT.json
"""
import functools
import gc
import json
import sys

import tuili.quant.model as quant_model
from tuili import LLM
from tuili.bench.perplexity import perplexity
from tuili.compress.common import text_token_ids


def main(student: str, gptq: str, tuned: str, out: str) -> None:
    reference = LLM(student, dtype="float32", kv_cache_memory=0.1)
    ids = text_token_ids(reference.get_tokenizer())
    windows = len(ids) // 256
    held = max(1, windows // 20)
    tail = ids[(windows - held) * 256:windows * 256]
    rows = []

    def score(name: str, llm: LLM) -> None:
        ppl, count = perplexity(llm, tail, 256)
        rows.append(dict(name=name, ppl=ppl, tokens=count))
        print(f"{name}: {ppl:.3f} ({count} tokens)", flush=True)

    score("float, fp32 activations", reference)
    searched = quant_model.quantize_groupwise
    for name, kwargs in [("float, bf16", {}), ("int8 per channel", dict(quantization="int8")),
                         ("int4 g128, full range", dict(quantization="int4", full_range=True)),
                         ("int4 g128, ranges searched", dict(quantization="int4")),
                         ("int4 g64, ranges searched", dict(quantization="int4", quant_group_size=64)),
                         ("int4 g32, ranges searched", dict(quantization="int4", quant_group_size=32)),
                         ("int4 g128 GPTQ", dict(model=gptq)),
                         ("int4 g128 GPTQ + 100 tuning steps", dict(model=tuned))]:
        full = kwargs.pop("full_range", False)
        quant_model.quantize_groupwise = functools.partial(searched, ranges=(1.0,)) if full else searched
        llm = LLM(kwargs.pop("model", student), dtype="bfloat16", kv_cache_memory=0.1, **kwargs)
        score(name, llm)
        del llm
        gc.collect()
    quant_model.quantize_groupwise = searched
    with open(out, "w") as f:
        json.dump({"model": student, "heldout_tokens": len(tail), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:5])
