"""A decode step's inputs into the static buffers its CUDA graph reads, as one Triton kernel: the token ids (the
pending ones taken from the previous step's samples, still on the device under async scheduling), positions,
slots, lengths and block tables, and the padded rows' scratch values. In torch this was ten small kernels and
copies per step (~25 us of a batch-1 step on an H100, before the graph's first kernel)."""
from __future__ import annotations

import functools

import torch

tl = None  # triton.language, bound when the kernel is first built (see ops/rmsnorm.py)


def _fill_kernel(ids_ptr, pos_ptr, slot_ptr, lens_ptr, table_ptr, pending_ptr, tokens_ptr,
                 ids_out, pos_out, slot_out, lens_out, table_out, bs, width, stride_table, stride_table_out,
                 max_blocks, scratch_slot, scratch_block, Q: tl.constexpr, BLOCK_Q: tl.constexpr,
                 BLOCK_T: tl.constexpr, HAS_PENDING: tl.constexpr):
    """Grid (padded batch,): program b writes sequence b's Q rows and its length and block table (b < bs), or a
    padded sequence's scratch slots, length Q and block table of scratch blocks (b >= bs)."""
    b = tl.program_id(0)
    rq = b * Q + tl.arange(0, BLOCK_Q)
    mq = tl.arange(0, BLOCK_Q) < Q
    if b < bs:
        ids = tl.load(ids_ptr + rq, mask=mq, other=0).to(tl.int64)
        if HAS_PENDING:  # the row's token is the previous step's sample number pending[row] (-1: not pending)
            pending = tl.load(pending_ptr + rq, mask=mq, other=-1)
            sampled = tl.load(tokens_ptr + tl.maximum(pending, 0), mask=mq & (pending >= 0), other=0)
            ids = tl.where(pending >= 0, sampled.to(tl.int64), ids)
        tl.store(ids_out + rq, ids.to(ids_out.dtype.element_ty), mask=mq)
        tl.store(pos_out + rq, tl.load(pos_ptr + rq, mask=mq).to(pos_out.dtype.element_ty), mask=mq)
        tl.store(slot_out + rq, tl.load(slot_ptr + rq, mask=mq).to(slot_out.dtype.element_ty), mask=mq)
        tl.store(lens_out + b, tl.load(lens_ptr + b).to(lens_out.dtype.element_ty))
        for t0 in range(0, width, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            row = tl.load(table_ptr + b.to(tl.int64) * stride_table + t, mask=t < width)
            tl.store(table_out + b.to(tl.int64) * stride_table_out + t, row.to(table_out.dtype.element_ty),
                     mask=t < width)
    else:
        tl.store(slot_out + rq, tl.full([BLOCK_Q], scratch_slot, tl.int64).to(slot_out.dtype.element_ty), mask=mq)
        tl.store(lens_out + b, tl.full([], Q, tl.int32).to(lens_out.dtype.element_ty))
        for t0 in range(0, max_blocks, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            tl.store(table_out + b.to(tl.int64) * stride_table_out + t,
                     tl.full([BLOCK_T], scratch_block, tl.int32).to(table_out.dtype.element_ty), mask=t < max_blocks)


@functools.cache
def _kernel():
    global tl
    import triton
    import triton.language

    tl = triton.language
    return triton.jit(_fill_kernel)


def fill_step_inputs(out: dict, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                     seq_lens: torch.Tensor, block_tables: torch.Tensor, size: int, query_len: int,
                     scratch_slot: int, scratch_block: int, pending: tuple | None = None) -> None:
    """Write a step of len(seq_lens) sequences of query_len rows each into the buffers of `out` (input_ids,
    positions, slot_mapping [rows], seq_lens [batch], block_tables [batch, max_blocks]), padded to `size`
    sequences: what DecodeGraphs.run did with copies and fills. pending = (rows, tokens): row r's token id is
    tokens[rows[r]] where rows[r] >= 0."""
    bs, width = block_tables.shape
    if input_ids.numel() != bs * query_len or size > out["seq_lens"].shape[0] or \
            width > out["block_tables"].shape[1] or block_tables.stride(1) != 1:
        raise ValueError("fill_step_inputs: the step does not fit the buffers")
    rows, tokens = pending if pending is not None else (input_ids, input_ids)
    tables = out["block_tables"]
    _kernel()[(size,)](
        input_ids, positions, slot_mapping, seq_lens, block_tables, rows, tokens, out["input_ids"], out["positions"],
        out["slot_mapping"], out["seq_lens"], tables, bs, width, block_tables.stride(0), tables.stride(0),
        tables.shape[1], scratch_slot, scratch_block, Q=query_len, BLOCK_Q=1 << max(query_len - 1, 0).bit_length(),
        BLOCK_T=1024, HAS_PENDING=pending is not None, num_warps=4)
