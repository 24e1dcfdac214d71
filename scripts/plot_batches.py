"""Decode tok/s against batch size, one line per series of `tuili bench latency` JSONs (each file one point: its
batch_size and decode tok/s).

usage: python scripts/plot_batches.py OUT.png TITLE 'label=a.json,b.json' 'label=c.json,d.json' ...
"""
import json
import sys

from tuili.bench.plot import _pyplot


def main(out: str, title: str, series: list[str]) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for spec in series:
        label, paths = spec.split("=", 1)
        runs = sorted((json.load(open(p)) for p in paths.split(",")), key=lambda r: r["batch_size"])
        xs, ys = [r["batch_size"] for r in runs], [r["tuili"]["decode_tok_s"] for r in runs]
        ax.plot(xs, ys, marker="o", label=label)
        for x, y in zip(xs, ys):
            ax.annotate(f"{y:.0f}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlabel("batch (sequences decoding together)")
    ax.set_ylabel("decode tok/s")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
