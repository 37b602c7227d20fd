"""Operations on whole DeltaNet state slots, decided by the scheduler and executed by the runner. Plain Python.

A step's `ScheduledBatch.slot_ops` lists them in order; the runner applies each to the hybrid cache before the
forward, without knowing why it was asked (`op.apply(cache)` calls the cache method of the same meaning): `ZeroSlots`
for sequences that just got a slot; for a sequence that resumes after a cached prefix (prefix caching), `CopySlot`
restores the snapshot into its slot and `CopyKVRows` copies the rows of the prefix's partial last block into a block
of its own. (Snapshots are taken inside the forward, `BatchInfo.snapshots`; speculative decoding keeps the state of
the accepted position inside its step: `ForwardContext.commit_captured`, since only sampling knows which one it is.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class SlotStore(Protocol):
    """What a slot operation needs from the cache (`HybridCache` implements it; tests use fakes)."""

    def zero_slots(self, slots: list[int]) -> None: ...

    def copy_slot(self, src: int, dst: int) -> None: ...

    def copy_kv_rows(self, src_block: int, dst_block: int, num_rows: int) -> None: ...


@dataclass(frozen=True)
class ZeroSlots:
    """Reset these slots' state to zero (a sequence starts there with S = 0)."""

    slots: tuple[int, ...]

    def apply(self, store: SlotStore) -> None:
        store.zero_slots(list(self.slots))


@dataclass(frozen=True)
class CopySlot:
    """Copy slot `src`'s state to slot `dst` (snapshot or restore)."""

    src: int
    dst: int

    def apply(self, store: SlotStore) -> None:
        store.copy_slot(self.src, self.dst)


@dataclass(frozen=True)
class CopyKVRows:
    """Copy the first `num_rows` token rows of KV block `src_block` to block `dst_block` in every K/V pool."""

    src_block: int
    dst_block: int
    num_rows: int

    def apply(self, store: SlotStore) -> None:
        store.copy_kv_rows(self.src_block, self.dst_block, self.num_rows)


SlotOp = ZeroSlots | CopySlot | CopyKVRows
