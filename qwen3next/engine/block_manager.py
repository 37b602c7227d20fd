"""Hybrid cache memory: how much of it to allocate, and who owns which part. Plain Python, no torch.

Full-attention layers keep K/V in a paged pool of `num_blocks` blocks of `block_size` tokens; DeltaNet layers
keep one fixed-size state slot per running sequence. `plan_cache` splits a byte budget between the two and
`BlockManager` hands blocks and slots to sequences.

Blocks carry a reference count so that prefix caching can later share a block between sequences (a block
goes back to the free list when its count drops to zero); today every live block has count 1.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class CacheGeometry:
    """Per-token and per-sequence cache sizes of a model.

    kv_bytes_per_token: K + V bytes of one token summed over all attention layers
        (`Qwen3NextConfig.kv_bytes_per_token()`; 24 KiB for the 80B model in bf16).
    state_bytes_per_slot: conv + recurrent state bytes of one sequence summed over all DeltaNet layers
        (`Qwen3NextConfig.state_bytes_per_sequence()`; ~73.7 MiB with an fp32 recurrent state).
    """

    kv_bytes_per_token: int
    state_bytes_per_slot: int
    block_size: int

    def __post_init__(self) -> None:
        if self.kv_bytes_per_token < 0 or self.state_bytes_per_slot < 0:
            raise ValueError(f"cache byte sizes must be >= 0, got kv_bytes_per_token={self.kv_bytes_per_token}, "
                             f"state_bytes_per_slot={self.state_bytes_per_slot}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")

    @property
    def block_bytes(self) -> int:
        return self.kv_bytes_per_token * self.block_size


@dataclass(frozen=True)
class CachePlan:
    """How many KV blocks and state slots to allocate, and what that buys."""

    geometry: CacheGeometry
    num_blocks: int
    num_slots: int
    budget_bytes: int
    max_model_len: int

    @property
    def block_size(self) -> int:
        return self.geometry.block_size

    @property
    def kv_bytes(self) -> int:
        return self.num_blocks * self.geometry.block_bytes

    @property
    def state_bytes(self) -> int:
        return self.num_slots * self.geometry.state_bytes_per_slot

    @property
    def total_bytes(self) -> int:
        return self.kv_bytes + self.state_bytes

    @property
    def num_kv_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_full_length_seqs(self) -> int:
        """How many sequences of max_model_len tokens fit at once."""
        return min(self.num_slots, self.num_blocks // cdiv(self.max_model_len, self.block_size))

    def describe(self) -> str:
        g = self.geometry
        avg = self.num_kv_tokens // self.num_slots
        lines = [
            f"cache plan: {_fmt_bytes(self.total_bytes)} of a {_fmt_bytes(self.budget_bytes)} budget",
            f"  DeltaNet state: {self.num_slots:,} slots x {_fmt_bytes(g.state_bytes_per_slot)} "
            f"= {_fmt_bytes(self.state_bytes)}",
            f"  attention KV: {self.num_blocks:,} blocks x {self.block_size} tokens = {self.num_kv_tokens:,} tokens "
            f"x {_fmt_bytes(g.kv_bytes_per_token)} = {_fmt_bytes(self.kv_bytes)}",
            f"  fits {self.num_slots:,} concurrent sequences averaging {avg:,} tokens of context, "
            f"or {self.num_full_length_seqs:,} at max_model_len={self.max_model_len:,}",
        ]
        return "\n".join(lines)


def plan_cache(geometry: CacheGeometry, budget_bytes: int, max_num_seqs: int, max_model_len: int) -> CachePlan:
    """Split `budget_bytes` into state slots and KV blocks.

    Slots come first: as many as `max_num_seqs` asks for, as long as one sequence can still reach
    `max_model_len` and every other slot keeps at least one KV block; every remaining byte goes to KV blocks.
    Raises ValueError when not even one sequence of `max_model_len` tokens fits.
    """
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    if max_model_len < 1:
        raise ValueError(f"max_model_len must be >= 1, got {max_model_len}")
    blocks_per_seq = cdiv(max_model_len, geometry.block_size)
    slot_b, block_b = geometry.state_bytes_per_slot, geometry.block_bytes
    if slot_b + block_b == 0:
        raise ValueError("cache geometry has neither KV nor state bytes; nothing to plan")
    one_seq = slot_b + blocks_per_seq * block_b
    if budget_bytes < one_seq:
        raise ValueError(
            f"cache budget {budget_bytes:,} B ({_fmt_bytes(budget_bytes)}) cannot hold one sequence of "
            f"max_model_len={max_model_len:,}: that needs {slot_b:,} B of DeltaNet state + {blocks_per_seq:,} KV "
            f"blocks x {block_b:,} B = {one_seq:,} B ({_fmt_bytes(one_seq)}); lower max_model_len or raise the budget"
        )
    # n slots need n*slot_b + (blocks_per_seq + n - 1)*block_b <= budget.
    num_slots = min(max_num_seqs, (budget_bytes - (blocks_per_seq - 1) * block_b) // (slot_b + block_b))
    if block_b == 0:  # no attention layers: blocks cost nothing, give every slot a full-length table
        num_blocks = num_slots * blocks_per_seq
    else:
        num_blocks = (budget_bytes - num_slots * slot_b) // block_b
    return CachePlan(geometry, num_blocks, num_slots, budget_bytes, max_model_len)


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


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
