"""CUDA graphs for decode: one graph per batch-size bucket, replayed with static input buffers.

A decode step of a small model is hundreds of short kernel launches; replaying a captured graph removes the
launch overhead that otherwise dominates (HF transformers' 10 tok/s on an H100 is mostly launch overhead).
Batches are padded up to the next captured size; padded rows write their K/V into a scratch block that the
block manager never hands out, and their outputs are dropped.

Speculative verification steps, where every sequence has the same number q = k + 1 of new tokens, get graphs
of their own (keyed by (q, batch size), for the small batches where speculation runs): their attention goes
through the flash-decoding kernel with q tokens per sequence (the prefill kernel where q x group > 64 rows),
whose grid depends only on the batch size.
"""
from __future__ import annotations

import bisect

import torch
from torch import nn

from tuili.ops.attention_metadata import AttentionMetadata, set_attention_metadata
from tuili.ops.step_inputs import fill_step_inputs


def capture_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_batch (vLLM-like buckets: padding stays small)."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_batch]
    sizes += list(range(16, max_batch + 1, 16))
    if sizes[-1] < max_batch:
        sizes.append(max_batch)
    return sizes


class DecodeGraphs:
    """Captured decode forwards. `run` returns None when the batch has no graph (mixed or too big)."""

    def __init__(self, model: nn.Module, device: torch.device, max_batch: int, max_model_len: int,
                 block_size: int, scratch_block: int, spec_query_len: int = 0, spec_max_batch: int = 0) -> None:
        self.model = model
        self.sizes = {1: capture_sizes(max_batch)}             # query length -> captured batch sizes
        if spec_query_len > 1 and spec_max_batch > 0:
            self.sizes[spec_query_len] = capture_sizes(min(spec_max_batch, max_batch))
        self.block_size = block_size
        self.scratch_slot = scratch_block * block_size
        max_blocks = -(-max_model_len // block_size)
        self.max_model_len = max_model_len
        b = max(sizes[-1] for sizes in self.sizes.values())
        rows = max(q * sizes[-1] for q, sizes in self.sizes.items())
        self.input_ids = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((rows,), self.scratch_slot, dtype=torch.long, device=device)
        self.block_tables = torch.full((b, max_blocks), scratch_block, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(b, dtype=torch.int32, device=device)
        self.query_start_loc = {q: torch.arange(b + 1, dtype=torch.int32, device=device) * q for q in self.sizes}
        self.buffers = dict(input_ids=self.input_ids, positions=self.positions, slot_mapping=self.slot_mapping,
                            seq_lens=self.seq_lens, block_tables=self.block_tables)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.scratch_block = scratch_block

    def _metadata(self, q: int, bs: int) -> AttentionMetadata:
        # max_seq_len is the bound the decode kernels are launched for: the whole context window, so that one
        # captured launch serves every replay (the kernels read the true lengths from seq_lens)
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs * q], block_tables=self.block_tables[:bs], seq_lens=self.seq_lens[:bs],
            query_start_loc=self.query_start_loc[q][:bs + 1], seq_lens_cpu=[], query_lens_cpu=[q] * bs,
            max_query_len=q, max_seq_len=self.max_model_len, verification=q > 1)

    @torch.no_grad()
    def capture(self) -> None:
        pool = None
        # largest first: the smaller graphs reuse its memory pool
        for q, bs in sorted(((q, bs) for q, sizes in self.sizes.items() for bs in sizes),
                            key=lambda x: -x[0] * x[1]):
            self.seq_lens.fill_(q)  # while capturing: every row's position >= 0, all in the scratch block
            meta = self._metadata(q, bs)
            set_attention_metadata(meta)
            try:
                for _ in range(2):  # warm-up: Triton autotuning and lazy init happen outside the capture
                    self.model(self.input_ids[:bs * q], self.positions[:bs * q])
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[q, bs] = self.model(self.input_ids[:bs * q], self.positions[:bs * q])
            finally:
                set_attention_metadata(None)
            pool = graph.pool()
            self.graphs[q, bs] = graph
        torch.cuda.synchronize()

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            pending: tuple | None = None) -> torch.Tensor | None:
        """Replay the graph for this step (None: no graph fits). pending = (rows, tokens): row r's token id is
        tokens[rows[r]] where rows[r] >= 0 (the previous step's samples, still on the device)."""
        q, lens = meta.max_query_len, meta.query_lens_cpu
        bs = len(lens)
        sizes = self.sizes.get(q)
        if not sizes or bs > sizes[-1] or not self.graphs or (q > 1 and any(n != q for n in lens)):
            return None
        size = sizes[bisect.bisect_left(sizes, bs)]
        # one kernel writes the inputs; padded rows get length q and slots in the scratch block
        fill_step_inputs(self.buffers, input_ids, positions, meta.slot_mapping, meta.seq_lens, meta.block_tables,
                         size, q, self.scratch_slot, self.scratch_block, pending)
        self.graphs[q, size].replay()
        return self.outputs[q, size][:bs * q]
