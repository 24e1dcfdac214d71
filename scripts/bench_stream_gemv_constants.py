"""`tuili bench latency` with stream_gemv's per-width constants overridden before the engine is built (the sweeps of
docs/benchmarks' INT8 stages). Device only.

usage: python scripts/bench_stream_gemv_constants.py STAGE_BYTES:8=16384 STAGES:8=6 PRE:8=4 -- --load-format dummy
         --model llama-3.1-8b --no-hf --quantization int8 ...   (NAME:BITS=VALUE; BITS 4: INT4 g128, 8: INT8)"""
import sys

from tuili.cli import main
from tuili.ops import stream_gemv

if __name__ == "__main__":
    split = sys.argv.index("--")
    for setting in sys.argv[1:split]:
        name, value = setting.split("=")
        name, bits = name.split(":")
        getattr(stream_gemv, name)[int(bits)] = int(value)
    sys.exit(main(["bench", "latency", *sys.argv[split + 1:]]))
