"""ModelRunner: owns the model and its KV cache; turns a scheduled batch into tensors, runs it, samples."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tuili.engine.scheduler import ScheduledSeq
from tuili.engine.sequence import Sequence
from tuili.ops.attention import QMAX
from tuili.ops.attention_metadata import AttentionMetadata, set_attention_metadata
from tuili.runner.cpu_step import CpuStep
from tuili.runner.cuda_graph import DecodeGraphs
from tuili.runner.sampler import Sampler, SamplerOutput, top_logprobs
from tuili.sampling_params import PositionLogprobs


@dataclass
class RunnerOutput:
    sampled: list[tuple[Sequence, int, PositionLogprobs | None]]           # (seq, new token, its logprobs)
    prompt_logprobs: list[tuple[Sequence, list[PositionLogprobs]]]          # entries to append per sequence
    spec: list[tuple[Sequence, list[int], int, int]]                   # (seq, new tokens, proposed, filler)


class ModelRunner:
    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype, block_size: int,
                 eos_token_ids: set[int], fused_ops: bool = False, triton_attention: bool = False,
                 kv_cache_dtype: torch.dtype | None = None, l2_prefetch: bool = True) -> None:
        self.model = model
        self.device, self.dtype, self.block_size = device, dtype, block_size
        self.kv_cache_dtype = kv_cache_dtype or dtype
        self.kv_quantized = self.kv_cache_dtype in QMAX
        if self.kv_cache_dtype == torch.float8_e4m3fn and device.type == "cuda" and \
                torch.cuda.get_device_capability(device) < (8, 9):
            raise ValueError("kv_cache_dtype fp8 needs a GPU with fp8 support (compute capability 8.9+: Ada, "
                             "Hopper); use int8 here")
        self.triton_attention = triton_attention
        model.set_backends(fused_ops, triton_attention, l2_prefetch)
        self.graphs: DecodeGraphs | None = None
        self.cpu_step: CpuStep | None = None
        self.verify_query_len = 0  # k + 1 when speculating with Triton attention (set by warm_up_kernels)
        config = model.config
        self.num_layers = config.num_hidden_layers
        attn = model.layers[0].self_attn
        self.num_kv_heads, self.head_dim = attn.num_kv_heads, attn.head_dim
        self.sampler = Sampler(config.vocab_size, eos_token_ids)
        self.num_blocks = 0

    # ---- KV cache -------------------------------------------------------------------------------------
    def bytes_per_block(self) -> int:
        """K and V of block_size tokens in every layer (+ one fp32 scale per token and head when quantized)."""
        per_head = self.head_dim * self.kv_cache_dtype.itemsize + 4 * self.kv_quantized
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * per_head

    @torch.no_grad()
    def profile_free_memory(self, num_tokens: int, utilization: float) -> int:
        """GPU bytes left for the KV cache: utilization * total - (weights + peak of a worst-case forward)."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        meta, _ = self._metadata([num_tokens], [num_tokens], [[]], list(range(num_tokens)))
        positions = torch.arange(num_tokens, device=self.device) % self.model.config.max_position_embeddings
        set_attention_metadata(meta)
        try:
            hidden = self.model(ids, positions)
            self.model.compute_logits(hidden[-min(num_tokens, 256):])  # logits of up to 256 sampled rows
        finally:
            set_attention_metadata(None)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        total = torch.cuda.get_device_properties(self.device).total_memory
        return int(total * utilization - peak)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """`num_blocks` for the block manager plus one scratch block (padding rows of CUDA graphs write there)."""
        self.num_blocks = num_blocks
        shape = (num_blocks + 1, self.block_size, self.num_kv_heads, self.head_dim)
        for layer in self.model.layers:
            attn = layer.self_attn.attn
            attn.k_cache = torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device)
            attn.v_cache = torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device)
            if self.kv_quantized:
                attn.k_scale = torch.zeros(shape[:3], dtype=torch.float32, device=self.device)
                attn.v_scale = torch.zeros(shape[:3], dtype=torch.float32, device=self.device)

    def warm_up_kernels(self, verify_query_len: int = 0) -> None:
        """Compile the attention kernel variants of mixed steps (and of verification steps of verify_query_len
        tokens per sequence) before the first request (Triton attention)."""
        from tuili.ops.attention_triton import warm_up_kernels

        self.verify_query_len = verify_query_len
        attn = self.model.layers[0].self_attn
        rope = (attn.rotary.cos, attn.rotary.sin) if attn.q_norm is None and attn.rotary.triton else None
        warm_up_kernels(attn.attn.k_cache, attn.attn.v_cache, attn.num_heads, self.dtype,
                        k_scale=attn.attn.k_scale, v_scale=attn.attn.v_scale, verify_query_len=verify_query_len,
                        rope_tables=rope, launch_early=bool(attn.attn.launch_early_rows))
        torch.cuda.synchronize(self.device)

    def capture_cuda_graphs(self, max_batch: int, max_model_len: int, spec_query_len: int = 0,
                            spec_max_batch: int = 0) -> None:
        """Capture decode graphs (GPU, Triton attention only: the torch path reads lengths on the host), and
        verification graphs for batches of up to spec_max_batch sequences of spec_query_len tokens each."""
        assert self.device.type == "cuda" and self.triton_attention and self.num_blocks
        self.graphs = DecodeGraphs(self.model, self.device, max_batch, max_model_len, self.block_size,
                                   scratch_block=self.num_blocks, spec_query_len=spec_query_len,
                                   spec_max_batch=spec_max_batch)
        self.graphs.capture()

    # ---- one step -------------------------------------------------------------------------------------
    def _metadata(self, query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]],
                  slots: list[int], *extra: list[int]) -> tuple[AttentionMetadata, list[torch.Tensor]]:
        """The step's metadata (plus `extra` int lists, e.g. input ids and positions) on the device.

        Everything travels in one int32 buffer, pinned on GPU machines: one host-to-device copy per step."""
        width = max(len(t) for t in block_tables) or 1
        starts = [0]
        for q in query_lens:
            starts.append(starts[-1] + q)
        flat = [x for t in block_tables for x in t + [0] * (width - len(t))]
        parts = [slots, seq_lens, starts, flat, *extra]
        host = torch.tensor([x for part in parts for x in part], dtype=torch.int32)
        if self.device.type == "cuda":
            host = host.pin_memory()
        buffer = host.to(self.device, non_blocking=True)
        views, offset = [], 0
        for part in parts:
            views.append(buffer[offset:offset + len(part)])
            offset += len(part)
        slot_mapping, seq_lens_t, starts_t, tables = views[:4]
        if self.device.type == "cpu":  # the torch store indexes with int64: converted once, not in every layer
            slot_mapping = slot_mapping.long()
        meta = AttentionMetadata(
            slot_mapping=slot_mapping, block_tables=tables.view(len(block_tables), width), seq_lens=seq_lens_t,
            query_start_loc=starts_t, seq_lens_cpu=seq_lens, query_lens_cpu=query_lens,
            max_query_len=max(query_lens), max_seq_len=max(seq_lens))
        return meta, views[4:]

    def build_cpu_step(self) -> None:
        """The CPU's counterpart of CUDA graphs: one sequence's step as one TorchScript call, decode steps as one
        C++ call (runner/cpu_step.py)."""
        assert self.device.type == "cpu" and self.num_blocks
        self.cpu_step = CpuStep.build(self.model, self.dtype)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                 pending: tuple | None = None) -> torch.Tensor:
        """pending = (rows, tokens): row r's token id is tokens[rows[r]] where rows[r] >= 0 (samples of the step
        before, still on the device)."""
        if self.graphs is not None:
            hidden = self.graphs.run(input_ids, positions, meta, pending)
            if hidden is not None:
                return hidden
        if pending is not None:
            rows, tokens = pending
            input_ids = torch.where(rows >= 0, tokens[rows.clamp(min=0).long()].to(input_ids.dtype), input_ids)
        if self.cpu_step is not None and self.cpu_step.handles(meta):
            return self.cpu_step.run(input_ids, positions, meta)
        set_attention_metadata(meta)
        try:
            return self.model(input_ids, positions)
        finally:
            set_attention_metadata(None)

    @torch.no_grad()
    def execute(self, batch: list[ScheduledSeq]) -> RunnerOutput:
        return self.finish(self.launch(batch))

    @torch.no_grad()
    def launch(self, batch: list[ScheduledSeq], prev: "Launched | None" = None) -> "Launched":
        """Build the step's tensors, run the model and sample, without waiting for the device.

        A sequence whose last token was sampled by `prev` (still in flight) reads it from `prev`'s device
        tensor: the host does not need to know it yet (async scheduling)."""
        bs = self.block_size
        batch = sorted(batch, key=lambda item: item.num_new_tokens != 1)  # decodes first (stable)
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []          # row of each sampling sequence's last token
        spec_rows: list[int] = []            # rows of speculating sequences: their token, then each proposal
        pending: list[int] = []              # per row: index of its token in prev's sampled tensor, or -1
        prompt_rows: list[tuple[int, Sequence, int, int]] = []  # (first row, seq, first target, count)
        for item in batch:
            seq, start, n = item.seq, item.seq.num_computed_tokens, item.num_new_tokens
            row0 = len(input_ids)
            drafts = item.draft_token_ids
            ids = seq.token_ids[start:start + n - len(drafts)]
            pending += [-1] * n
            if len(ids) < n - len(drafts):  # the last token is still on the device
                assert len(ids) == n - 1 and prev is not None and not drafts, "only the newest token can be pending"
                pending[row0 + n - 1] = prev.row_of[seq.seq_id]
                ids.append(0)
            input_ids += ids + drafts
            pos = range(start, start + n)
            positions += pos
            slots += [seq.block_table[p // bs] * bs + p % bs for p in pos]
            if drafts:
                spec_rows += range(row0, row0 + n)
            elif item.samples:
                sample_rows.append(row0 + n - 1)
            if seq.wants_prompt_logprobs:  # logits at position p score prompt token p + 1
                first = len(seq.prompt_logprobs)
                last = min(start + n, seq.num_prompt_tokens - 1)
                if first - 1 >= start and last >= first:
                    prompt_rows.append((row0 + first - 1 - start, seq, first, last - first + 1))
        any_pending = prev is not None and any(p >= 0 for p in pending)
        meta, (input_ids_t, positions_t, sample_rows_t, spec_rows_t, pending_t) = self._metadata(
            [i.num_new_tokens for i in batch], [i.seq.num_computed_tokens + i.num_new_tokens for i in batch],
            [i.seq.block_table for i in batch], slots, input_ids, positions, sample_rows, spec_rows,
            pending if any_pending else [])
        # a verification of k + 1 tokens per sequence (the shape the attention kernels were warmed up for)
        meta.verification = len(spec_rows) == len(input_ids) and \
            all(i.num_new_tokens == self.verify_query_len for i in batch)
        hidden = self._forward(input_ids_t, positions_t, meta,
                               (pending_t, prev.sampled.token_ids) if any_pending else None)

        sampled_seqs = [item.seq for item in batch if item.samples and not item.draft_token_ids]
        spec = []
        if spec_rows:  # verification: the host waits for it (the proposals of the next step depend on it)
            items = [item for item in batch if item.draft_token_ids]
            rows = hidden if len(spec_rows) == hidden.shape[0] else hidden[spec_rows_t.long()]
            tokens = self.sampler.verify(self.model.compute_logits(rows),
                                         [i.seq for i in items], [i.draft_token_ids for i in items],
                                         [i.draft_probs for i in items])
            spec = [(i.seq, t, len(i.draft_token_ids), i.num_filler) for i, t in zip(items, tokens)]
        out = None
        if sampled_seqs:
            rows = hidden if len(sample_rows) == hidden.shape[0] else hidden[sample_rows_t]  # pure decode: all
            out = self.sampler(self.model.compute_logits(rows), sampled_seqs)
        prompt_lps = []
        for row, seq, first, count in prompt_rows:
            logprobs = torch.log_softmax(self.model.compute_logits(hidden[row:row + count]).float(), dim=-1)
            targets = torch.tensor(seq.token_ids[first:first + count], device=self.device)
            prompt_lps.append((seq, top_logprobs(logprobs, targets, [seq.params.prompt_logprobs] * count)))
        return Launched(sampled_seqs, out, self._to_host(out.tensors() if out else []), prompt_lps, spec)

    def _to_host(self, tensors: list[torch.Tensor]):
        """Start copying `tensors` to the host; on CUDA, (pinned copies, the event that marks them done)."""
        if self.device.type != "cuda" or not tensors:  # nothing to copy (verification-only steps): no event
            return tensors
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        for h, t in zip(host, tensors):
            h.copy_(t, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    def finish(self, launched: "Launched") -> RunnerOutput:
        """Wait for a launched step's samples and turn them into host lists."""
        sampled = []
        if launched.sampled is not None:
            host = launched.host
            if isinstance(host, tuple):
                host, event = host
                event.synchronize()
            out = launched.sampled
            tokens, logprobs = out.to_lists(host, out.logprob_rows, out.logprob_nums, len(launched.seqs))
            sampled = list(zip(launched.seqs, tokens, logprobs))
        return RunnerOutput(sampled, launched.prompt_logprobs, launched.spec)


class Launched:
    """A step whose model pass and sampling are queued on the device; `ModelRunner.finish` collects it."""

    def __init__(self, seqs: list[Sequence], sampled: SamplerOutput | None, host, prompt_logprobs,
                 spec=()) -> None:
        self.seqs = seqs
        self.spec = list(spec)                # verified speculative sequences: (seq, tokens, proposed, filler)
        self.sampled = sampled
        self.host = host                      # host copies of sampled.tensors() (+ the event that ends them)
        self.prompt_logprobs = prompt_logprobs
        self.row_of = {seq.seq_id: i for i, seq in enumerate(seqs)}
        self.start = 0.0                      # the engine's bookkeeping: when it was launched, its StepStats
        self.stats = None
        self.draft_seconds = 0.0              # time the proposer took for this step's speculating sequences
