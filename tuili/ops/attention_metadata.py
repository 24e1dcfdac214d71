"""AttentionMetadata: the one object that carries a step's batch layout from the runner to the kernels.

It lives at the bottom of the import graph (ops/) so that layers and kernels can read it without knowing
about sequences; the runner sets it before each forward pass and clears it after.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Layout of one step's flattened batch of T new tokens from B sequences."""

    slot_mapping: torch.Tensor      # [T] int32 (CPU: int64): each new token's K/V slot, block * block_size + offset
    block_tables: torch.Tensor      # [B, max_blocks] int32: each sequence's blocks, padded with 0
    seq_lens: torch.Tensor          # [B] int32: context length of each sequence after this step
    query_start_loc: torch.Tensor   # [B + 1] int32: where each sequence's new tokens start in the batch
    seq_lens_cpu: list[int]         # the same on the host, for the reference path
    query_lens_cpu: list[int]
    max_query_len: int
    max_seq_len: int
    verification: bool = False      # speculative verification: every sequence the same k + 1 new tokens

    @property
    def is_pure_decode(self) -> bool:
        return self.max_query_len == 1


_current: AttentionMetadata | None = None


def set_attention_metadata(metadata: AttentionMetadata | None) -> None:
    global _current
    _current = metadata


def get_attention_metadata() -> AttentionMetadata:
    assert _current is not None, "attention called outside a forward pass set up by the model runner"
    return _current
