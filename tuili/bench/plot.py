"""PNG charts for benchmark reports (matplotlib, from the `bench` extra)."""
from __future__ import annotations

import os


def save_report(report: dict, json_path: str | None, png_path: str | None, chart) -> None:
    """Write the JSON record and, if asked, the PNG drawn by `chart(report, path)`."""
    if json_path:
        import json

        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
    if png_path:
        chart(report, png_path)


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ValueError("plots need matplotlib: pip install 'tuili[bench]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_plot(report: dict, path: str) -> None:
    """Roofline view of one latency run: each phase's achieved rate against the measured ceiling."""
    plt = _pyplot()
    fig, (ax_d, ax_p) = plt.subplots(1, 2, figsize=(10, 4))
    ours, hf = report["tuili"], report.get("hf_transformers")
    names = ["tuili"] + (["HF transformers"] if hf else [])
    decode = [ours["decode_tok_s"]] + ([hf["decode_tok_s"]] if hf else [])
    ax_d.bar(names, decode, color=["tab:blue", "tab:gray"][: len(names)])
    ax_d.axhline(report["decode_floor_tok_s"], color="tab:red", ls="--", label="bandwidth floor")
    ax_d.set_ylabel("decode tok/s")
    ax_d.set_title(f"decode, batch {report['batch_size']}: MBU {100 * ours['mbu']:.0f}%")
    ax_d.legend()
    ax_p.bar(["tuili"], [ours["prefill_TFLOP_s"]], color="tab:blue")
    ax_p.axhline(report["matmul_TFLOP_s"], color="tab:red", ls="--", label="matmul ceiling")
    ax_p.set_ylabel("prefill TFLOP/s")
    ax_p.set_title(f"prefill of {report['input_len']} tokens: MFU {100 * ours['prefill_mfu']:.0f}%")
    ax_p.legend()
    fig.suptitle(f"{report['model']} {report['dtype']} on {report['device']} ({report['commit']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def throughput_plot(report: dict, path: str) -> None:
    """Output tok/s of tuili against HF transformers' static batches, and tuili's roofline efficiency."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    names, values = ["tuili"], [report["tuili"]["output_tok_s"]]
    for bs, r in (report.get("hf_transformers") or {}).items():
        names.append(f"HF static bs{bs}")
        values.append(r["output_tok_s"])
    ax.bar(names, values, color=["tab:blue"] + ["tab:gray"] * (len(names) - 1))
    roof = report["tuili"]["output_tokens"] / report["tuili"]["roofline_s"]
    ax.axhline(roof, color="tab:red", ls="--", label=f"roofline ({roof:.0f} tok/s)")
    ax.set_ylabel("output tok/s")
    ax.set_title(f"throughput, {report['num_requests']} requests: {100 * report['tuili']['efficiency']:.0f}% "
                 "of roofline")
    ax.legend()
    fig.suptitle(f"{report['model']} {report['dtype']} on {report['device']} ({report['commit']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def spec_plot(report: dict, path: str) -> None:
    """Speculative decoding: speed-up against acceptance rate (noise sweep), and against batch size."""
    plt = _pyplot()
    fig, (ax_a, ax_b) = plt.subplots(1, 2, figsize=(10, 4))
    runs = report["runs"]
    for bs in sorted({r["batch_size"] for r in runs}):
        rows = sorted((r for r in runs if r["batch_size"] == bs), key=lambda r: r["speculative"]["acceptance_rate"])
        ax_a.plot([r["speculative"]["acceptance_rate"] for r in rows], [r["speedup"] for r in rows], "o-",
                  label=f"batch {bs}")
    ax_a.axhline(1.0, color="gray", ls="--")
    ax_a.set_xlabel("acceptance rate")
    ax_a.set_ylabel("decode speed-up vs no speculation")
    ax_a.set_title("speed-up vs acceptance")
    ax_a.legend()
    for noise in sorted({r["noise"] for r in runs}):
        rows = sorted((r for r in runs if r["noise"] == noise), key=lambda r: r["batch_size"])
        rate = sum(r["speculative"]["acceptance_rate"] for r in rows) / len(rows)
        ax_b.plot([r["batch_size"] for r in rows], [r["speedup"] for r in rows], "o-",
                  label=f"noise {noise:.1f} (acceptance ~{rate:.2f})")
    ax_b.legend()
    ax_b.axhline(1.0, color="gray", ls="--")
    ax_b.set_xscale("log", base=2)
    ax_b.set_xlabel("batch size")
    ax_b.set_ylabel("decode speed-up")
    ax_b.set_title("where speculation stops paying")
    args = report["engine_args"]
    fig.suptitle(f"{os.path.basename(report['model'])} {report['dtype']}, {report['proposer']} "
                 f"k={args['num_speculative_tokens']} on {report['device']} ({report['commit']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
