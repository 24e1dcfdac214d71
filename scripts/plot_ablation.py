"""Bar chart of an ablation (scripts/gpu_session.sh ablation): decode tok/s of each configuration's JSON.

usage: python scripts/plot_ablation.py OUT.png ablation_1b_all-on.json ablation_1b_no-cuda-graphs.json ...
"""
import json
import os
import sys

from tuili.bench.plot import _pyplot


def main(out: str, paths: list[str]) -> None:
    plt = _pyplot()
    runs = [json.load(open(p)) for p in paths]
    names = [os.path.basename(p).rsplit(".", 1)[0].split("_", 2)[-1] for p in paths]
    rates = [r["tuili"]["decode_tok_s"] for r in runs]
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.barh(names[::-1], rates[::-1], color="tab:blue")
    ax.bar_label(bars, fmt="%.0f")
    ax.axvline(runs[0]["decode_floor_tok_s"], color="tab:red", ls="--", label="bandwidth floor")
    ax.set_xlabel("decode tok/s, batch 1")
    ax.legend(loc="lower right")
    r = runs[0]
    ax.set_title(f"{r['model']} {r['dtype']}, prompt {r['input_len']}, {r['output_len']} new, "
                 f"on {r['device']} ({r['commit']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
