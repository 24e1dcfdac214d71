"""BlockManager: hands out fixed-size KV cache blocks to sequences (allocate / append / free)."""
from __future__ import annotations

from collections import deque

from tuili.engine.sequence import Sequence


class BlockManager:
    """A free list of block ids. A sequence owns the blocks in its `block_table`, in order."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.peak_used = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """How many more blocks `seq` needs to hold K/V for `num_tokens` tokens in total."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self.free_blocks)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq`'s block table so that it holds `num_tokens` tokens (allocate and append in one)."""
        needed = self.blocks_needed(seq, num_tokens)
        assert needed <= len(self.free_blocks), "allocate() called without can_allocate()"
        for _ in range(needed):
            seq.block_table.append(self.free_blocks.popleft())
        self.peak_used = max(self.peak_used, self.num_used_blocks)

    def free(self, seq: Sequence) -> None:
        """Return all of `seq`'s blocks; its K/V must be recomputed if it runs again."""
        self.free_blocks.extend(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_draft_computed = 0

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Return the blocks past those that hold `num_tokens` tokens (rejected speculative tokens' slots)."""
        keep = -(-num_tokens // self.block_size)
        if len(seq.block_table) > keep:
            self.free_blocks.extend(seq.block_table[keep:])
            del seq.block_table[keep:]
