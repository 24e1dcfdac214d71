"""CUDA graphs for decode: one graph per batch-size bucket, replayed with static input buffers.

A decode step of a small model is hundreds of short kernel launches; replaying a captured graph removes the
launch overhead that otherwise dominates (HF transformers' 10 tok/s on an H100 is mostly launch overhead).
Batches are padded up to the next captured size; padded rows write their K/V into a scratch block that the
block manager never hands out, and their outputs are dropped.
"""
from __future__ import annotations

import bisect

import torch
from torch import nn

from tuili.ops.attention_metadata import AttentionMetadata, set_attention_metadata


def capture_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_batch (vLLM-like buckets: padding stays small)."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_batch]
    sizes += list(range(16, max_batch + 1, 16))
    if sizes[-1] < max_batch:
        sizes.append(max_batch)
    return sizes


class DecodeGraphs:
    """Captured decode forwards. `run` returns None when the batch is not pure decode or too big."""

    def __init__(self, model: nn.Module, device: torch.device, max_batch: int, max_model_len: int,
                 block_size: int, scratch_block: int) -> None:
        self.model = model
        self.sizes = capture_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        self.block_size = block_size
        self.scratch_slot = scratch_block * block_size
        max_blocks = -(-max_model_len // block_size)
        self.max_model_len = max_model_len
        b = self.max_batch
        self.input_ids = torch.zeros(b, dtype=torch.long, device=device)
        self.positions = torch.zeros(b, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((b,), self.scratch_slot, dtype=torch.long, device=device)
        self.block_tables = torch.full((b, max_blocks), scratch_block, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(b, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(b + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.scratch_block = scratch_block

    def _metadata(self, bs: int) -> AttentionMetadata:
        # max_seq_len is the bound the kernels are launched for: the whole context window, so that one
        # captured launch serves every replay (the kernels read the true lengths from seq_lens)
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs], block_tables=self.block_tables[:bs], seq_lens=self.seq_lens[:bs],
            query_start_loc=self.query_start_loc[:bs + 1], seq_lens_cpu=[], query_lens_cpu=[1] * bs,
            max_query_len=1, max_seq_len=self.max_model_len)

    @torch.no_grad()
    def capture(self) -> None:
        pool = None
        for bs in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory pool
            meta = self._metadata(bs)
            set_attention_metadata(meta)
            try:
                for _ in range(2):  # warm-up: Triton autotuning and lazy init happen outside the capture
                    self.model(self.input_ids[:bs], self.positions[:bs])
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[bs] = self.model(self.input_ids[:bs], self.positions[:bs])
            finally:
                set_attention_metadata(None)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor | None:
        bs = input_ids.shape[0]
        if not meta.is_pure_decode or bs > self.max_batch or not self.graphs:
            return None
        size = self.sizes[bisect.bisect_left(self.sizes, bs)]
        self.input_ids[:bs].copy_(input_ids)
        self.positions[:bs].copy_(positions)
        self.slot_mapping[:bs].copy_(meta.slot_mapping)
        self.seq_lens[:bs].copy_(meta.seq_lens)
        width = meta.block_tables.shape[1]
        self.block_tables[:bs, :width].copy_(meta.block_tables)
        if size > bs:  # padded rows: length 1, writing into the scratch block
            self.slot_mapping[bs:size].fill_(self.scratch_slot)
            self.seq_lens[bs:size].fill_(1)
            self.block_tables[bs:size, 0].fill_(self.scratch_block)
        self.graphs[size].replay()
        return self.outputs[size][:bs]
