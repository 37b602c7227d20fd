"""Operations on whole DeltaNet state slots, decided by the scheduler and executed by the runner. Plain Python.

A step's `ScheduledBatch.slot_ops` lists them in order; the runner applies each to the hybrid cache before the
forward, without knowing why it was asked (`op.apply(cache)` calls the cache method of the same meaning). Today the
scheduler emits `ZeroSlots` for sequences that just got a slot. `CopySlot` is the primitive that prefix caching's
snapshot/restore (sequence slot <-> snapshot slot) builds on. (Speculative decoding keeps the state of the accepted
position inside its step instead: `ForwardContext.commit_captured`, since only sampling knows which one it is.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class SlotStore(Protocol):
    """What a slot operation needs from the cache (`HybridCache` implements it; tests use fakes)."""

    def zero_slots(self, slots: list[int]) -> None: ...

    def copy_slot(self, src: int, dst: int) -> None: ...


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


SlotOp = ZeroSlots | CopySlot
