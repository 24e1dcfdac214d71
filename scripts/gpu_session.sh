#!/usr/bin/env bash
# One device session: GPU tests, then the issue-4 benchmarks. Results land in $OUT (or ./out).
# usage: bash scripts/gpu_session.sh [tests] [latency] [prefill] [throughput] [ablation]
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
tuili() { python -m tuili.cli "$@"; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
for step in "$@"; do
  case $step in
    tests)
      python -m pytest tests/gpu -q -p no:cacheprovider 2>&1 | tail -30 | tee "$OUT/gpu_tests.log" ;;
    kernels)
      python -m pytest tests/ops -q -p no:cacheprovider 2>&1 | tail -30 | tee "$OUT/kernel_tests.log" ;;
    latency)
      tuili bench latency --load-format dummy --model llama-3.1-8b --input-len 128 --output-len 256 \
        --gpu-memory-utilization 0.5 --max-num-seqs 8 --hf-output-len 32 --json "$OUT/latency_8b_bs1.json" \
        --plot "$OUT/latency_8b_bs1.png"
      tuili bench latency --load-format dummy --model llama-3.2-1b --input-len 128 --output-len 256 \
        --gpu-memory-utilization 0.5 --max-num-seqs 8 --json "$OUT/latency_1b_bs1.json" --no-hf ;;
    prefill)
      tuili bench latency --load-format dummy --model llama-3.1-8b --input-len 8192 --output-len 2 --repeats 3 \
        --max-num-batched-tokens 8192 --max-num-seqs 1 --json "$OUT/prefill_8b_8192.json" --no-hf ;;
    throughput)
      timeout 200 python -m tuili.cli bench throughput --load-format dummy --model qwen3-0.6b \
        --json "$OUT/throughput_qwen3.json" --plot "$OUT/throughput_qwen3.png"
      timeout 200 python -m tuili.cli bench throughput --load-format dummy --model llama-3.1-8b \
        --json "$OUT/throughput_8b.json" ;;
    ablation)
      for flags in "--enforce-eager" "--no-fused-ops" "--attention-backend torch --enforce-eager"; do
        tuili bench latency --load-format dummy --model llama-3.2-1b --input-len 128 --output-len 128 --no-hf \
          --gpu-memory-utilization 0.5 --max-num-seqs 8 $flags | tail -2
      done 2>&1 | tee "$OUT/ablation_1b.txt" ;;
  esac
done
