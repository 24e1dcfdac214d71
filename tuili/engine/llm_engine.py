"""LLMEngine: the one loop. add_request / step / abort; each step schedules, runs the model, samples, detokenizes."""
from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass

import torch

from tuili.config import CacheConfig, EngineArgs, SchedulerConfig, parse_dtype
from tuili.engine.block_manager import BlockManager
from tuili.engine.detokenizer import Detokenizer, find_stop_string
from tuili.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput, SpecMetrics
from tuili.engine.scheduler import Scheduler
from tuili.engine.sequence import Request, Sequence
from tuili.loader import load_model_source
from tuili.loader.dummy import init_random_weights
from tuili.models.registry import build_model
from tuili.quant import QuantConfig, prepare_packed, prepare_quantized, quantize_model
from tuili.runner.model_runner import ModelRunner
from tuili.sampling_params import SamplingParams
from tuili.spec.draft import DraftProposer
from tuili.spec.ngram import NgramProposer

logger = logging.getLogger("tuili")


@dataclass
class SpecStats:
    """Speculative decoding since the engine started: verification steps, per-sequence steps, tokens."""

    steps: int = 0
    seq_steps: int = 0
    proposed: int = 0
    accepted: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "acceptance_rate": self.proposed and self.accepted / self.proposed,
                "mean_accepted_length": self.seq_steps and self.accepted / self.seq_steps}


@dataclass
class StepStats:
    """One engine step, for benchmarks: its batch and how long it took (the sampled tokens synced it)."""

    num_seqs: int
    num_tokens: int          # tokens computed (prefill chunks + one per decode)
    context_tokens: int      # sum of context lengths: K/V tokens read
    attention_pairs: float   # causal (query, key) pairs: attention FLOPs / (4 layers heads head_dim)
    blocks_used: int
    seconds: float


def load_model(source, device: torch.device, dtype: torch.dtype, quantization: QuantConfig | None = None,
               seed: int = 0, show_progress: bool = False):
    """Build the model of `source` on `device` in `dtype` and fill it: its checkpoint (quantized or not) or
    random weights; `quantization` quantizes a float checkpoint after loading."""
    # a GGUF kept packed is built on the CPU (its float linears are only address space there, never touched)
    # and moved once its packed parameters replace them: on a GPU the float model would be allocated first
    packed = bool(source.packed) and quantization is None
    with torch.device("cpu" if packed else device):
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = build_model(source.config)
        finally:
            torch.set_default_dtype(default_dtype)
    model.eval()
    if source.quantization is not None:  # a checkpoint saved quantized: load its packed tensors as they are
        if quantization is not None and quantization != source.quantization:
            raise ValueError(f"the checkpoint is quantized as {source.quantization}; "
                             f"it cannot be loaded with quantization {quantization}")
        prepare_quantized(model, source.quantization)
    if packed:  # a GGUF's quantized blocks, transcoded as they load
        plan = prepare_packed(model, source.packed)
        model.to(device)
        counts = collections.Counter(str(fmt) for fmt in plan.values())
        logger.info("GGUF blocks kept packed: %s", ", ".join(f"{n} layers {fmt}" for fmt, n in counts.items()))
    elif source.packed:
        source.packed = None  # --quantization requantizes the float weights
    if source.weights is None:
        init_random_weights(model, seed)
    else:
        model.load_weights(_progress(source.weights(), show_progress, f"loading {source.name}"))
    if quantization is not None and source.quantization is None:
        saved = quantize_model(model, quantization)
        logger.info("%s weights: %.0f MB saved", quantization, saved / 2**20)
    if packed and device.type == "cpu" and dtype == torch.bfloat16 and model.lm_head is None and \
            hasattr(torch, "_weight_int8pack_mm"):
        # a GGUF run on the CPU in bf16: the tied head (the largest matmul of a small model's decode step) reads
        # an INT8 per-row copy of the embedding, 2.5x faster than the bf16 one (+0.07% perplexity on the default
        # model, whose embedding is Q8_0 in the file; docs/benchmarks). fp32 keeps the float head (exact vs HF).
        from tuili.quant.int8 import quantize_per_channel

        qweight, scales = quantize_per_channel(model.embed_tokens.weight.float())
        model.lm_head_int8 = (qweight, scales.to(dtype))
    return model


def _as_set(value) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, (list, tuple, set)) else {int(value)}


class LLMEngine:
    """Owns the model, KV cache, scheduler and tokenizer; `step()` advances every running request by one step."""

    def __init__(self, args: EngineArgs, show_progress: bool = False) -> None:
        self.args = args
        self.device = args.resolve_device()
        source = load_model_source(args.model, args.load_format, args.tokenizer, args.gguf_dequantize)
        self.model_name = source.name
        self.model_config = config = source.config
        self.tokenizer = source.tokenizer
        self.dtype = parse_dtype(args.dtype) or self._auto_dtype(source.checkpoint_dtype)
        torch.manual_seed(args.seed)
        quantization = args.quant_config()
        self.model = model = load_model(source, self.device, self.dtype, quantization, args.seed, show_progress)
        # what the weights are (reports name it): a checkpoint saved quantized says so itself
        quantization = source.quantization or quantization
        self.quantization = str(quantization) if quantization is not None else None

        self.eos_token_ids = _as_set(getattr(config, "eos_token_id", None))
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        fused_ops, triton_attention = args.use_triton(self.device)
        self.runner = ModelRunner(model, self.device, self.dtype, args.block_size, self.eos_token_ids,
                                  fused_ops, triton_attention, args.kv_dtype(), not args.no_l2_prefetch)
        self.proposer, self.draft_runner = None, None
        if args.speculative_method == "ngram":
            self.proposer = NgramProposer(args.prompt_lookup_max, args.prompt_lookup_min)
        elif args.speculative_method == "draft":
            self.draft_runner = self._load_draft(fused_ops, triton_attention, show_progress)
            self.proposer = DraftProposer(self.draft_runner, args.max_num_batched_tokens, config.vocab_size)
        runners = [r for r in (self.runner, self.draft_runner) if r is not None]
        self.cache_config = CacheConfig(args.block_size, self._num_kv_blocks(), self.runner.kv_cache_dtype)
        num_blocks = self.cache_config.num_blocks
        for runner in runners:  # the draft's cache has the same blocks (see tuili/spec/draft.py)
            runner.allocate_kv_cache(num_blocks)
        logger.info("KV cache: %d blocks of %d tokens (%d tokens, %.2f GiB, %s%s)", num_blocks, args.block_size,
                    num_blocks * args.block_size, num_blocks * self._bytes_per_block() / 2**30,
                    str(self.runner.kv_cache_dtype).removeprefix("torch."),
                    ", with the draft model's" if self.draft_runner is not None else "")
        self.max_model_len = self._max_model_len()
        if self.draft_runner is not None:
            draft_len = self.draft_runner.model.config.max_position_embeddings
            if draft_len < self.max_model_len:
                logger.warning("max_model_len capped from %d to the draft model's %d positions", self.max_model_len,
                               draft_len)
                self.max_model_len = draft_len
        if self.device.type == "cuda" and triton_attention:
            for runner in runners:
                spec = (args.num_speculative_tokens + 1, args.speculative_disable_batch_size) \
                    if runner is self.runner and self.proposer is not None else (0, 0)
                runner.warm_up_kernels(spec[0])
                if not args.enforce_eager:  # the target also gets graphs for verification steps
                    runner.capture_cuda_graphs(min(args.max_num_seqs, 512), self.max_model_len, *spec)
        elif self.device.type == "cpu" and not args.enforce_eager:
            for runner in runners:
                runner.build_cpu_step()
        self.scheduler_config = SchedulerConfig(
            args.max_num_seqs, args.max_num_batched_tokens, self.max_model_len,
            args.num_speculative_tokens or 0, args.speculative_disable_batch_size if self.proposer else 0)
        self.block_manager = BlockManager(self.cache_config.num_blocks, args.block_size)
        self.scheduler = Scheduler(self.scheduler_config, self.block_manager)
        self.detokenizer = Detokenizer(self.tokenizer) if self.tokenizer is not None else None
        self.requests: dict[str, Request] = {}
        self._request_ids = itertools.count()
        self.step_log: list[StepStats] | None = None  # benchmarks set a list to record every step
        self.async_scheduling = args.async_scheduling == "on" or (
            args.async_scheduling == "auto" and self.device.type == "cuda")
        self._in_flight = None     # the launched step not yet collected (async scheduling)
        self._last_collect = 0.0
        self.spec_stats = SpecStats()
        # where verification has CUDA graphs (k proposals per sequence), every verification takes that shape: k
        # lookahead slots up to max_tokens (the scheduler), n-gram proposals padded to k with filler (step)
        self.scheduler.full_lookahead = self.proposer is not None and self.runner.graphs is not None

    def _load_draft(self, fused_ops: bool, triton_attention: bool, show_progress: bool) -> ModelRunner:
        """The draft model of --speculative-model, in the target's dtype, load format and KV cache dtype."""
        args = self.args
        source = load_model_source(args.speculative_model, args.load_format, args.tokenizer, args.gguf_dequantize)
        same_tokenizer = None
        if source.tokenizer is not None and self.tokenizer is not None:
            probe = "Speculative decoding: 1234 tokens, naïve café! def f(x): return x"
            same_tokenizer = source.tokenizer.encode(probe) == self.tokenizer.encode(probe) and \
                len(source.tokenizer) == len(self.tokenizer)
            if not same_tokenizer:
                raise ValueError(f"the draft model {source.name} tokenizes text differently from the target: "
                                 "they must share the tokenizer")
        if source.config.vocab_size != self.model_config.vocab_size and not same_tokenizer:
            # (with the same tokenizer, embedding tables padded to different sizes are fine, e.g. Qwen2.5 7B / 0.5B)
            raise ValueError(f"the draft model {source.name} has a vocabulary of {source.config.vocab_size} tokens; "
                             f"the target's has {self.model_config.vocab_size}: they must share the tokenizer")
        model = load_model(source, self.device, self.dtype, None, args.seed, show_progress)
        logger.info("speculative decoding: draft model %s, %d tokens per step", source.name,
                    args.num_speculative_tokens)
        return ModelRunner(model, self.device, self.dtype, args.block_size, self.eos_token_ids, fused_ops,
                           triton_attention, args.kv_dtype())

    def _bytes_per_block(self) -> int:
        return self.runner.bytes_per_block() + (self.draft_runner.bytes_per_block() if self.draft_runner else 0)

    # ---- setup ----------------------------------------------------------------------------------------
    def _auto_dtype(self, checkpoint_dtype: torch.dtype) -> torch.dtype:
        if self.device.type == "cpu":
            return torch.bfloat16
        return checkpoint_dtype if checkpoint_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16

    def _num_kv_blocks(self) -> int:
        args = self.args
        if args.num_gpu_blocks_override is not None:
            return args.num_gpu_blocks_override
        per_block = self._bytes_per_block()
        if self.device.type == "cuda":
            free = self.runner.profile_free_memory(args.max_num_batched_tokens, args.gpu_memory_utilization)
            if free < per_block:
                raise RuntimeError(f"no GPU memory left for the KV cache at gpu_memory_utilization="
                                   f"{args.gpu_memory_utilization}; raise it or lower max_num_batched_tokens")
            return free // per_block
        return max(1, int(args.kv_cache_memory * 2**30) // per_block)

    def _max_model_len(self) -> int:
        config = self.model_config
        limit = self.args.max_model_len or config.max_position_embeddings
        if limit > config.max_position_embeddings:
            raise ValueError(f"max_model_len {limit} exceeds the model's max_position_embeddings "
                             f"{config.max_position_embeddings}")
        window = getattr(config, "sliding_window", None)
        if window and getattr(config, "use_sliding_window", True) and window < limit:
            logger.warning("max_model_len capped to the sliding window (%d): tuili attends to full context", window)
            limit = window
        capacity = self.cache_config.num_blocks * self.cache_config.block_size
        if capacity < limit:
            logger.warning("max_model_len capped from %d to %d tokens: that is all the KV cache holds", limit, capacity)
            limit = capacity
        return limit

    # ---- requests -------------------------------------------------------------------------------------
    def add_request(self, request_id: str | None, prompt: str | list[int],
                    params: SamplingParams | None = None) -> str:
        """Validate and queue a request. Raises ValueError on bad input; nothing else is affected."""
        request = self.make_request(request_id, prompt, params)
        self.add(request)
        return request.request_id

    def make_request(self, request_id: str | None, prompt: str | list[int],
                     params: SamplingParams | None = None) -> Request:
        """Validate and tokenize a request without touching the engine's state (any thread may call it)."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > self.args.max_logprobs:
                raise ValueError(f"{name} must be <= {self.args.max_logprobs} (max_logprobs), got {value}")
        request_id = str(next(self._request_ids)) if request_id is None else str(request_id)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, token_ids = self._tokenize(prompt)
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens; max_model_len is {self.max_model_len}, "
                             "which must leave room for at least one generated token")
        return Request(request_id, text, token_ids, params)

    def add(self, request: Request) -> None:
        """Queue a request made by make_request."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        for seq in request.seqs:
            self.scheduler.add(seq)

    def _tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids, or --tokenizer")
            return prompt, self.tokenizer.encode(prompt)
        token_ids = list(prompt)
        if not token_ids:
            raise ValueError("prompt is empty")
        vocab = self.model_config.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in token_ids):
            raise ValueError(f"prompt token ids must be ints in [0, {vocab})")
        return None, token_ids

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks; unknown or finished ids are ignored."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
        request.finish_time = time.time()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ---- the step -------------------------------------------------------------------------------------
    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Run one scheduled batch; return the outputs of every request that advanced or finished
        (`finished_only`: of those that finished, for callers that do not stream).

        With async scheduling (CUDA by default) the step launched here is collected by the next call: the
        host schedules and prepares step N+1 while the device still runs step N, and the sequences that
        sampled in step N take their new token from the device. Outputs thus lag one step behind."""
        prev, self._in_flight = self._in_flight, None
        outputs: list[RequestOutput] = []
        running = self.scheduler.running
        speculating = self.scheduler.speculation_on() and any(self.scheduler.can_speculate(s) for s in running)
        if prev is not None and (speculating or any(s.needs_host_tokens for s in running)):
            # penalties, prompt logprobs or speculation (proposals need the newest token): no overlap
            outputs += self._collect(prev, finished_only)
            prev = None
        batch = self.scheduler.schedule()
        draft_seconds = 0.0
        if self.proposer is not None and any(item.num_lookahead for item in batch):
            start = time.perf_counter()
            self.proposer.propose([item for item in batch if item.num_lookahead])
            draft_seconds = time.perf_counter() - start
            k = self.scheduler_config.num_speculative_tokens
            if self.scheduler.full_lookahead and all(i.num_lookahead == k and i.draft_probs is None for i in batch):
                for item in batch:  # every sequence k proposals: the verification step's CUDA graph
                    item.pad_drafts()
            for item in batch:  # slots reserved for proposals that did not come
                if len(item.draft_token_ids) < item.num_lookahead:
                    self.block_manager.trim(item.seq, item.seq.num_computed_tokens + item.num_new_tokens)
        launched = self._launch(batch, prev) if batch else None
        if prev is not None:
            outputs += self._collect(prev, finished_only)
        if launched is not None:
            launched.draft_seconds = draft_seconds
            if self.async_scheduling and not launched.spec:
                self._in_flight = launched
            else:
                outputs += self._collect(launched, finished_only)
        return outputs

    def _launch(self, batch, prev):
        start = time.perf_counter()
        launched = self.runner.launch(batch, prev)
        launched.start = start
        if self.step_log is not None:
            launched.stats = StepStats(
                num_seqs=len(batch), num_tokens=sum(i.num_new_tokens for i in batch),
                context_tokens=sum(i.seq.num_computed_tokens + i.num_new_tokens for i in batch),
                attention_pairs=sum(i.num_new_tokens * (i.seq.num_computed_tokens + (i.num_new_tokens + 1) / 2)
                                    for i in batch),
                blocks_used=self.block_manager.num_used_blocks, seconds=0.0)
        for item in batch:
            if item.samples:
                item.seq.num_pending += 1
            item.seq.num_computed_tokens += item.num_new_tokens
        return launched

    def _collect(self, launched, finished_only: bool) -> list[RequestOutput]:
        result = self.runner.finish(launched)
        if launched.stats is not None and self.step_log is not None:  # from its launch (or the last collect)
            end = time.perf_counter()
            launched.stats.seconds = end - max(launched.start, self._last_collect)
            self.step_log.append(launched.stats)
            self._last_collect = end
        for seq, entries in result.prompt_logprobs:
            self._decode_logprobs(entries)
            seq.prompt_logprobs.extend(entries)
        now = time.time()
        touched: dict[str, Request] = {}
        entries = [(seq, [token], [logprobs], None) for seq, token, logprobs in result.sampled]
        if result.spec:
            entries += [(seq, tokens, [None] * len(tokens), proposed) for seq, tokens, proposed, _ in result.spec]
            self._count_spec(result.spec, launched.draft_seconds, time.perf_counter() - launched.start)
        for seq, tokens, logprobs, proposed in entries:
            seq.num_pending -= 1
            if seq.is_finished:  # stopped or aborted while this step ran: its token is dropped
                continue
            if proposed is not None:  # rejected proposals: their K/V (target and draft) no longer count
                seq.num_computed_tokens -= proposed - (len(tokens) - 1)
                seq.num_draft_computed = min(seq.num_draft_computed, seq.num_computed_tokens)
            request = seq.request
            touched[request.request_id] = request
            try:
                for token, lp in zip(tokens, logprobs):  # stop conditions apply inside an accepted run
                    self._append_token(seq, token, lp)
                    if seq.is_finished:
                        break
                if proposed is not None and not seq.is_finished:
                    self.block_manager.trim(seq, seq.num_computed_tokens)
            except Exception as e:  # a failure in one request ends that request only
                logger.exception("request %s failed", request.request_id)
                for s in request.seqs:
                    if not s.is_finished:
                        self.scheduler.finish(s, "error")
                request.error = str(e)
            if request.first_token_time is None:
                request.first_token_time = now
        outputs = []
        for request in touched.values():
            if request.is_finished:
                request.finish_time = now
                self.requests.pop(request.request_id, None)
            elif finished_only:
                continue
            outputs.append(self.make_output(request))
        return outputs

    def _count_spec(self, spec, draft_seconds: float, verify_seconds: float) -> None:
        stats = self.spec_stats
        stats.steps += 1
        stats.draft_seconds += draft_seconds
        stats.verify_seconds += verify_seconds
        for seq, tokens, proposed, filler in spec:
            real = proposed - filler
            if seq.params.max_tokens is not None:  # proposals past max_tokens (full_lookahead) do not count
                real = max(0, min(real, seq.params.max_tokens - seq.num_output_tokens - 1))
            accepted = min(len(tokens) - 1, real)
            seq.spec_steps += 1
            seq.spec_proposed += real
            seq.spec_accepted += accepted
            stats.seq_steps += 1
            stats.proposed += real
            stats.accepted += accepted
        for request in {id(seq.request): seq.request for seq, *_ in spec}.values():
            request.draft_time += draft_seconds
            request.verify_time += verify_seconds

    def _append_token(self, seq: Sequence, token: int, logprobs) -> None:
        params = seq.params
        seq.append_token(token)
        if logprobs is not None:
            self._decode_logprobs([logprobs])
            seq.logprobs.append(logprobs)
            seq.cumulative_logprob += logprobs[token].logprob
        n_out = seq.num_output_tokens
        if token in params.stop_token_ids:
            self.scheduler.finish(seq, "stop")
            seq.stop_reason = token
            return
        if token in self.eos_token_ids and not params.ignore_eos:
            self.scheduler.finish(seq, "stop")
            return
        if self.detokenizer is not None:
            new_text = self.detokenizer.decode_new_tokens(seq)
            if params.stop and new_text and n_out >= params.min_tokens:
                stop = find_stop_string(seq, len(new_text))
                if stop is not None:
                    self.scheduler.finish(seq, "stop")
                    seq.stop_reason = stop
                    return
        if (params.max_tokens is not None and n_out >= params.max_tokens) or len(seq) >= self.max_model_len:
            self.scheduler.finish(seq, "length")

    def _decode_logprobs(self, entries) -> None:
        if self.tokenizer is None:
            return
        for entry in entries:
            if entry is not None:
                for token_id, lp in entry.items():
                    lp.decoded_token = self.tokenizer.decode([token_id])

    def make_output(self, request: Request) -> RequestOutput:
        outputs = []
        for seq in request.seqs:
            text = seq.output_text
            if not seq.is_finished and seq.params.max_stop_len > 1:
                text = text[: max(0, len(text) - seq.params.max_stop_len + 1)]  # may be a stop string's start
            outputs.append(CompletionOutput(
                index=seq.index, text=text, token_ids=list(seq.output_token_ids),
                cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
                logprobs=seq.logprobs, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        first = request.seqs[0]
        spec = None
        if self.proposer is not None:
            spec = SpecMetrics(sum(s.spec_steps for s in request.seqs), sum(s.spec_proposed for s in request.seqs),
                               sum(s.spec_accepted for s in request.seqs), request.draft_time, request.verify_time)
        return RequestOutput(
            request_id=request.request_id, prompt=request.prompt, prompt_token_ids=request.prompt_token_ids,
            prompt_logprobs=first.prompt_logprobs, outputs=outputs, finished=request.is_finished,
            metrics=RequestMetrics(request.arrival_time, request.first_token_time, request.finish_time, spec),
            error=request.error)


def _progress(iterable, show: bool, desc: str):
    if not show:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, unit=" tensors", leave=False)
