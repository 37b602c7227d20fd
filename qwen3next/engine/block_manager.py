"""Who owns which part of the hybrid cache. Plain Python, no torch.

Full-attention layers keep K/V in a paged pool of `num_blocks` blocks of `block_size` tokens; DeltaNet layers
keep one fixed-size state slot per running sequence. `BlockManager` hands blocks and slots to sequences, in the
numbers `memory.plan_cache` chose.

Blocks carry a reference count so that prefix caching can later share a block between sequences (a block
goes back to the free list when its count drops to zero); today every live block has count 1.
"""

from __future__ import annotations

from collections import deque

from .memory import CachePlan, cdiv
from .sequence import Sequence


class BlockManager:
    """Owns the free lists of KV blocks and DeltaNet state slots."""

    def __init__(self, num_blocks: int, block_size: int, num_slots: int):
        if num_blocks < 1 or block_size < 1 or num_slots < 1:
            raise ValueError(f"BlockManager needs num_blocks, block_size, num_slots >= 1; got "
                             f"{num_blocks}, {block_size}, {num_slots}")
        self.num_blocks, self.block_size, self.num_slots = num_blocks, block_size, num_slots
        self._ref_counts = [0] * num_blocks
        # Freed blocks go to the back: least recently freed first, which suits a later prefix cache.
        self._free_blocks: deque[int] = deque(range(num_blocks))
        self._free_slots: deque[int] = deque(range(num_slots))

    @classmethod
    def from_plan(cls, plan: CachePlan) -> BlockManager:
        return cls(plan.num_blocks, plan.block_size, plan.num_slots)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def block_usage(self) -> float:
        """Fraction of KV blocks in use, for metrics."""
        return 1.0 - len(self._free_blocks) / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def num_blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def _num_missing_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        need = self.num_blocks_for(seq.num_computed_tokens + num_new_tokens)
        return max(0, need - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether `seq` can get the blocks (and, if it has none, the slot) to cache `num_new_tokens` more."""
        if seq.slot is None and not self._free_slots:
            return False
        return self._num_missing_blocks(seq, num_new_tokens) <= len(self._free_blocks)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow `seq.block_table` to hold `num_new_tokens` more tokens; give it a slot if it has none.

        Returns True when the slot is new, i.e. the runner must zero its DeltaNet state before this step.
        """
        missing = self._num_missing_blocks(seq, num_new_tokens)
        assert self.can_allocate(seq, num_new_tokens), f"allocate without room: {seq!r}, +{num_new_tokens} tokens"
        for _ in range(missing):
            block = self._free_blocks.popleft()
            assert self._ref_counts[block] == 0
            self._ref_counts[block] = 1
            seq.block_table.append(block)
        if seq.slot is not None:
            return False
        seq.slot = self._free_slots.popleft()
        return True

    def free(self, seq: Sequence) -> None:
        """Return the blocks and slot of `seq` (finished, aborted or preempted)."""
        for block in seq.block_table:
            assert self._ref_counts[block] > 0, f"double free of block {block}"
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free_blocks.append(block)
        seq.block_table = []
        if seq.slot is not None:
            self._free_slots.append(seq.slot)
            seq.slot = None
