#!/usr/bin/env bash
# One device session: GPU tests, then the issue-4 benchmarks. Results land in $OUT (or ./out).
# usage: bash scripts/gpu_session.sh [tests] [kernels] [spec] [spec-fine] [spec-probe] [quant-sweep] [gemv] [quant] [stream] [kv] [distill] [latency] [prefill]
#        [throughput] [ablation] [serve]
# serve needs fastapi/uvicorn/pydantic, which the device lacks: carry .whl and begin the command with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
set -uo pipefail
HF_QWEN=${HF_QWEN---hf-batch-size 64}
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# the commit the results belong to: the device's copy has no (or stale) git metadata; write .commit before
[ -f .commit ] && export TUILI_COMMIT=$(cat .commit)
tuili() { python -m tuili.cli "$@"; }
# Workload 3: `tuili serve` with dummy weights of shape $1 under `tuili bench serve` with flags $4; $3: more server
# flags. Files: $OUT/serve_server.log, $OUT/serve_$2.{txt,json,png}. At most ~6 minutes: 240 s for the server to
# answer /health, the bench cut at 350 s from the start, the server stopped after.
serve_step() {
  local shape=$1 tag=$2 url=http://127.0.0.1:8000 start=$SECONDS server rc
  # a dummy shape has no tokenizer and the bench sends text: a word-level one over the shape's whole vocabulary
  python scripts/make_dummy_tokenizer.py "/tmp/tok_$shape" "$shape" || return
  local cmd=(python -m tuili.cli serve --load-format dummy --model "$shape" --tokenizer "/tmp/tok_$shape" --port 8000 $3)
  echo "${cmd[*]}" >"$OUT/serve_server.log"
  "${cmd[@]}" >>"$OUT/serve_server.log" 2>&1 &
  server=$!
  trap "kill -9 $server 2>/dev/null" EXIT; trap 'exit 143' INT TERM
  until python -c "import urllib.request as u; u.urlopen('$url/health', timeout=2)" 2>/dev/null; do
    if ! kill -0 $server 2>/dev/null; then
      echo "serve: the server exited before answering $url/health; the end of its log:"
      tail -25 "$OUT/serve_server.log"; trap - EXIT INT TERM; return 1
    fi
    if (( SECONDS - start > 240 )); then
      echo "serve: no answer at $url/health after 240 s; the end of the server's log:"
      tail -25 "$OUT/serve_server.log"; kill -9 $server; wait $server 2>/dev/null; trap - EXIT INT TERM; return 1
    fi
    sleep 2
  done
  echo "serve: $shape up after $((SECONDS - start)) s"
  TQDM_DISABLE=1 timeout $((350 - (SECONDS - start))) python -m tuili.cli bench serve --url $url $4 \
    --json "$OUT/serve_$tag.json" --plot "$OUT/serve_$tag.png" 2>&1 | tee "$OUT/serve_$tag.txt"
  rc=$?
  (( rc == 124 )) && echo "serve: the bench was stopped at its time limit (rows above are the rates that finished)"
  kill $server 2>/dev/null
  for _ in {1..20}; do kill -0 $server 2>/dev/null || break; sleep 0.5; done
  kill -9 $server 2>/dev/null; wait $server 2>/dev/null
  trap - EXIT INT TERM
  echo "serve: server stopped after $((SECONDS - start)) s in all"
  return $rc
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
for step in "$@"; do
  case $step in
    tests)
      python -m pytest tests/gpu tests/engine/test_engine.py -q -p no:cacheprovider 2>&1 | tail -30 | tee "$OUT/gpu_tests.log" ;;
    kernels)
      python -m pytest tests/ops tests/quant -q -p no:cacheprovider -k "not unquantized_model and not greedy_agreement and not perplexity and not answers_like" 2>&1 | tail -30 | tee "$OUT/kernel_tests.log" ;;
    spec)
      # issue 8: the engine's speculative tests on the GPU (graphs for verification), then the 8B benchmarks.
      # Dummy weights write no text an n-gram or a small draft could predict, so acceptance is set by --replay
      # (the target's own output proposed at no draft cost) with --noise.
      [ "${SKIP_TESTS:-0}" = 1 ] || python -m pytest tests/spec -q -p no:cacheprovider -k "not stop_string and not server" > "$OUT/spec_tests.log" 2>&1
      [ -f "$OUT/spec_tests.log" ] && tail -3 "$OUT/spec_tests.log"
      spec() { tuili bench spec --load-format dummy --input-len 64 --output-len 128 --ignore-eos --max-num-seqs 32 \
                 --speculative-disable-batch-size 32 "$@"; }
      # --replay: acceptance set by --noise at no draft cost (bf16: see tuili/bench/spec.py for why its text is
      # that of a verification-only run)
      for k in 4 8; do
        spec --model llama-3.1-8b --speculative-method ngram --num-speculative-tokens $k --replay --num-prompts 4 \
          --noise 0 --noise 0.1 --noise 0.2 --noise 0.3 --noise 0.5 --noise 0.8 --gpu-memory-utilization 0.5 \
          --json "$OUT/spec_8b_replay_k${k}.json" --plot "$OUT/spec_8b_replay_k${k}.png"
      done
      spec --model llama-3.1-8b --speculative-method ngram --replay --num-prompts 32 --output-len 64 --batch-size 1 \
        --batch-size 2 --batch-size 4 --batch-size 8 --batch-size 16 --batch-size 32 --noise 0 --noise 0.3 \
        --noise 0.6 --gpu-memory-utilization 0.5 --json "$OUT/spec_8b_replay_batch.json" \
        --plot "$OUT/spec_8b_replay_batch.png" ;;
    spec-fine)
      # batch 1, 64 new tokens (the replay text holds), acceptance 0.6-1.0
      python -m pytest tests/spec tests/gpu tests/engine/test_engine.py -q -p no:cacheprovider \
        -k "not stop_string and not server and not padded and not smollm" > "$OUT/spec_tests.log" 2>&1
      tail -3 "$OUT/spec_tests.log"
      tuili bench spec --load-format dummy --model llama-3.1-8b --speculative-method ngram --replay --input-len 64 \
        --output-len 64 --ignore-eos --num-prompts 16 --noise 0 --noise 0.03 --noise 0.06 --noise 0.1 --noise 0.15 \
        --noise 0.2 --gpu-memory-utilization 0.5 --json "$OUT/spec_8b_replay_fine.json" \
        --plot "$OUT/spec_8b_replay_fine.png" ;;
    spec-probe)
      # where a speculative step's time goes, without a profiler (graph launches, host phases, the host's path)
      python scripts/graph_launch_probe.py 2>&1 | grep -v "^loading" | tee "$OUT/graph_launch_probe.txt"
      python scripts/host_path_probe.py 2>&1 | grep -v "^loading" | tee "$OUT/host_path_probe.txt" ;;
    quant-sweep)
      python scripts/sweep_quant_matmul.py "$OUT/quant_sweep.json" 2>&1 | tail -12 ;;
    gemv)
      # the decode shapes as the engine's graph runs them: `_tiles`' choice and a grid of others (TILES: your own)
      python scripts/bench_gemv_layers.py "$OUT/gemv_layers.json" 2>&1 | tail -12 ;;
    quant)
      # workload 1 with packed weights, and bf16 as the peer in the same call
      for q in "bf16" "int8" "int4 --quant-group-size 128" "int4 --quant-group-size 128 --quant-symmetric"; do
        tag=$(cut -d' ' -f1 <<<"$q"); [[ $q == *symmetric ]] && tag=int4_symmetric
        flags="--quantization $q"; [ $tag = bf16 ] && flags=""
        tuili bench latency --load-format dummy --model llama-3.1-8b --input-len 128 --output-len 256 \
          --gpu-memory-utilization 0.5 --max-num-seqs 8 --no-hf $flags \
          --json "$OUT/latency_8b_bs1_$tag.json" | tail -1
      done ;;
    stream)
      # the batch-1 INT4 chain through the Triton GEMV and stream_gemv, with the stream alone and x not read
      python scripts/probe_stream_gemv.py "$OUT/stream_gemv_chain.json" \
        '[{}, {"nocompute": true}, {"xconst": true}, {"pre": 0}, {"stages": 4}]' 2>&1 | tail -8 ;;
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
      # HF's static batch as the peer (first batch of the workload, every row generating the batch's longest
      # output); the memory limit leaves room for HF's own KV cache. HF on qwen3 at batch 64 takes ~180 s.
      timeout 240 python -m tuili.cli bench throughput --load-format dummy --model qwen3-0.6b \
        --gpu-memory-utilization 0.45 $HF_QWEN --json "$OUT/throughput_qwen3.json" --plot "$OUT/throughput_qwen3.png"
      timeout 200 python -m tuili.cli bench throughput --load-format dummy --model llama-3.1-8b \
        --gpu-memory-utilization 0.6 --hf-batch-size 16 --json "$OUT/throughput_8b.json" --plot "$OUT/throughput_8b.png" ;;
    kv)
      # the throughput workload on 8B with a KV cache of bf16, fp8 and int8 in the same memory (0.3 of the GPU:
      # ~7 GB of KV on an H100 after the weights, so the cache's capacity limits the batch)
      for kv in auto fp8 int8; do
        timeout 170 python -m tuili.cli bench throughput --load-format dummy --model llama-3.1-8b \
          --gpu-memory-utilization 0.3 --kv-cache-dtype $kv --json "$OUT/throughput_8b_kv_$kv.json" 2>&1 | tail -2
      done ;;
    distill)
      # issue 7: the training loop's speed on random weights (no real weights travel): llama-3.2-1b pruned to
      # half by tuili prune, then distilled from it for 40 steps of 8 x 1024 tokens (bf16 teacher, fp32 student
      # with bf16 autocast)
      python scripts/make_dummy_tokenizer.py /tmp/tok_1b llama-3.2-1b >/dev/null
      tuili prune --model llama-3.2-1b --load-format dummy --tokenizer /tmp/tok_1b --ratio 0.5 --out /tmp/student_1b \
        --device cuda 2>&1 | tail -1 | tee "$OUT/distill_1b.txt"
      TQDM_MININTERVAL=10 tuili distill --teacher llama-3.2-1b --load-format dummy --tokenizer /tmp/tok_1b \
        --student /tmp/student_1b --out /tmp/distilled_1b --steps 40 --batch-size 8 --seq-len 1024 \
        --checkpoint-every 0 --device cuda 2>&1 | tail -2 | tee -a "$OUT/distill_1b.txt"
      cp /tmp/distilled_1b/distill.json "$OUT/distill_1b.json"; cp /tmp/distilled_1b/loss.png "$OUT/distill_1b_loss.png" ;;
    ablation|ablation8b)
      # workload 4 on workload 1: each technique off in turn, one JSON per configuration
      configs="all-on:
no-async-scheduling:--async-scheduling off
no-cuda-graphs:--enforce-eager
no-fused-ops:--no-fused-ops
torch-attention:--attention-backend torch --enforce-eager
all-off:--attention-backend torch --enforce-eager --no-fused-ops --async-scheduling off"
      model=llama-3.2-1b; tag=1b
      [ $step = ablation8b ] && { model=llama-3.1-8b; tag=8b; configs=$(head -3 <<<"$configs"); }
      while IFS=: read -r name flags; do
        tuili bench latency --load-format dummy --model $model --input-len 128 --output-len 128 --no-hf \
          --gpu-memory-utilization 0.5 --max-num-seqs 8 $flags --json "$OUT/ablation_${tag}_$name.json" | tail -1
      done <<<"$configs" 2>&1 | tee "$OUT/ablation_$tag.txt"
      python scripts/plot_ablation.py "$OUT/ablation_$tag.png" \
        $(cut -d: -f1 <<<"$configs" | sed "s|.*|$OUT/ablation_${tag}_&.json|") ;;
    profile)
      python scripts/profile_decode.py llama-3.2-1b 2>&1 | tee "$OUT/profile_1b.txt" ;;
    serve)
      serve_step llama-3.1-8b 8b "--gpu-memory-utilization 0.85" "--rates 1,4,16,inf --num-requests 64" ;;
  esac
done
