"""Who owns which part of the hybrid cache. Plain Python, no torch.

Full-attention layers keep K/V in a paged pool of `num_blocks` blocks of `block_size` tokens; DeltaNet layers
keep one fixed-size state slot per running sequence. `BlockManager` hands blocks and slots to sequences, in the
numbers `memory.plan_cache` chose.

With prefix caching (prefix_cache.py) it also keeps what finished sequences leave behind: full KV blocks indexed by
content digest (shared by reference count; a block nobody references stays cached, "evictable", until its memory is
needed) and DeltaNet state snapshots in slots of their own. Memory is reclaimed in this order: free blocks / slots,
then the least recently used evictable blocks, then the least recently used snapshots; only then does the scheduler
preempt a running sequence.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from .memory import CachePlan, cdiv
from .prefix_cache import ROOT, PrefixHit, Snapshot, block_digest
from .sequence import Sequence


class BlockManager:
    """Owns the free lists of KV blocks and DeltaNet state slots (and, with prefix caching, the cached ones)."""

    def __init__(self, num_blocks: int, block_size: int, num_slots: int, enable_prefix_caching: bool = False):
        if num_blocks < 1 or block_size < 1 or num_slots < 1:
            raise ValueError(f"BlockManager needs num_blocks, block_size, num_slots >= 1; got "
                             f"{num_blocks}, {block_size}, {num_slots}")
        self.num_blocks, self.block_size, self.num_slots = num_blocks, block_size, num_slots
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        # Freed blocks go to the back: least recently freed first.
        self._free_blocks: deque[int] = deque(range(num_blocks))
        self._free_slots: deque[int] = deque(range(num_slots))
        # ---- prefix cache ----
        self._cached: dict[bytes, int] = {}  # digest -> block holding that prefix's last full block
        self._digest_of: dict[int, bytes] = {}  # the inverse, for cached blocks
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks with no reference, LRU first
        self._snapshots: OrderedDict[tuple, Snapshot] = OrderedDict()  # key -> snapshot, least recently used first
        self._snapshots_at: dict[bytes, dict[tuple[int, ...], Snapshot]] = {}  # digest -> partial tokens -> snapshot
        self._snap_pins: dict[int, int] = {}  # block -> how many snapshots pin it (their partial block)
        self._pinned: set[int] = set()  # slots of snapshots restored in the step being scheduled
        self._deferred: list[int] = []  # blocks to release at end_step (an adopted snapshot's partial block)
        self.queries = self.hits = 0  # prompt tokens looked up / found cached (counters)
        self.evicted_blocks = self.evicted_snapshots = 0

    @classmethod
    def from_plan(cls, plan: CachePlan, enable_prefix_caching: bool = False) -> BlockManager:
        return cls(plan.num_blocks, plan.block_size, plan.num_slots, enable_prefix_caching)

    # ---- counts ---------------------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks a sequence can have without preempting another: free, cached and evictable, or held only by
        snapshots (their rows of a prefix's partial last block)."""
        return self._reclaimable_blocks()

    @property
    def num_free_slots(self) -> int:
        """Slots no sequence uses: free, or holding a snapshot."""
        return len(self._free_slots) + len(self._snapshots)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def num_snapshots(self) -> int:
        return len(self._snapshots)

    @property
    def block_usage(self) -> float:
        """Fraction of KV blocks in use by sequences or snapshots, for metrics."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def num_blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    # ---- allocation -----------------------------------------------------------------------------------------------
    def _num_missing_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        need = self.num_blocks_for(seq.num_computed_tokens + num_new_tokens)
        return max(0, need - len(seq.block_table))

    def _reclaimable_blocks(self, keep: PrefixHit | None = None) -> int:
        """Blocks that can be had without preempting: free, evictable, and partial blocks only snapshots pin (minus
        what the hit `keep` is about to use)."""
        n = len(self._free_blocks) + len(self._evictable)
        kept = set() if keep is None else {*keep.blocks, keep.snapshot.block}
        held = {s.block for s in tuple(self._snapshots.values())  # a tuple: `LLM.stats()` reads from another thread
                if s.slot in self._pinned and s.block is not None}
        n += sum(1 for b, k in tuple(self._snap_pins.items())
                 if self._ref_counts[b] == k and b not in kept and b not in held)
        return n - sum(1 for b in kept if b in self._evictable)

    def _has_slot(self, keep: PrefixHit | None = None) -> bool:
        return bool(self._free_slots) or any(s.slot not in self._pinned and (keep is None or s is not keep.snapshot)
                                             for s in tuple(self._snapshots.values()))

    def can_allocate(self, seq: Sequence, num_new_tokens: int, hit: PrefixHit | None = None) -> bool:
        """Whether `seq` can get the blocks (and, if it has none, the slot) to cache `num_new_tokens` more (after the
        cached prefix `hit`, when given)."""
        if seq.slot is None and not self._has_slot(hit):
            return False
        if hit is not None:
            return self._hit_fits(hit, num_new_tokens)
        missing = self._num_missing_blocks(seq, num_new_tokens)
        # the common case without counting snapshot pins
        return missing <= len(self._free_blocks) + len(self._evictable) or missing <= self._reclaimable_blocks()

    def _hit_fits(self, hit: PrefixHit, num_new_tokens: int) -> bool:
        """Whether the blocks for `num_new_tokens` tokens after `hit` (beyond its shared ones) can be had."""
        missing = self.num_blocks_for(hit.position + num_new_tokens) - len(hit.blocks)
        return missing <= self._reclaimable_blocks(hit)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow `seq.block_table` to hold `num_new_tokens` more tokens; give it a slot if it has none.

        Returns True when the slot is new, i.e. the runner must zero (or restore) its DeltaNet state before this step.
        """
        missing = self._num_missing_blocks(seq, num_new_tokens)
        assert self.can_allocate(seq, num_new_tokens), f"allocate without room: {seq!r}, +{num_new_tokens} tokens"
        for _ in range(missing):
            block = self._take_block()
            self._ref_counts[block] = 1
            seq.block_table.append(block)
        if seq.slot is not None:
            return False
        seq.slot = self._take_slot()
        return True

    def free(self, seq: Sequence) -> None:
        """Return the blocks and slot of `seq` (finished, aborted or preempted). With prefix caching its full blocks
        stay cached and its slot becomes the snapshot of its fed tokens."""
        # The slot holds the state after num_computed_tokens, unless a stop rule dropped some of the tokens fed
        # (an accepted draft after a stop token): then it holds no state of known tokens.
        if self.enable_prefix_caching and seq.slot is not None and seq.num_computed_tokens <= seq.num_tokens:
            self.register_blocks(seq)
            if self._add_snapshot(seq, seq.num_computed_tokens, seq.slot):
                seq.slot = None
        for block in reversed(seq.block_table):  # the tail becomes the least recently used: evicted first
            self._release_block(block)
        seq.block_table = []
        seq.num_registered_blocks = 0
        if seq.slot is not None:
            self._free_slots.append(seq.slot)
            seq.slot = None

    def _take_block(self) -> int:
        while not self._free_blocks:
            if self._evictable:
                block, _ = self._evictable.popitem(last=False)
                digest = self._digest_of.pop(block)
                del self._cached[digest]
                for snap in list(self._snapshots_at.get(digest, {}).values()):  # their prefix is gone with the block
                    if snap.slot not in self._pinned:
                        self._drop_snapshot(snap)
                self._free_blocks.append(block)
                self.evicted_blocks += 1
                continue
            # the least recently used snapshot whose partial block nothing else holds
            victim = next((s for s in self._snapshots.values() if s.block is not None and s.slot not in self._pinned
                           and self._ref_counts[s.block] == self._snap_pins[s.block]), None)
            assert victim is not None, "no block to take: can_allocate() was not checked"
            self._drop_snapshot(victim)
        block = self._free_blocks.popleft()
        assert self._ref_counts[block] == 0
        return block

    def _release_block(self, block: int) -> None:
        assert self._ref_counts[block] > 0, f"double free of block {block}"
        self._ref_counts[block] -= 1
        if self._ref_counts[block] == 0:
            if block in self._digest_of:
                self._evictable[block] = None
            else:
                self._free_blocks.append(block)

    def _take_slot(self) -> int:
        if not self._free_slots:
            victim = next(s for s in self._snapshots.values() if s.slot not in self._pinned)
            self._drop_snapshot(victim)
        return self._free_slots.popleft()

    def take_snapshot_slot(self) -> int | None:
        """A slot for a new snapshot (free, or the least recently used unpinned snapshot's), or None."""
        if not self._has_slot():
            return None
        slot = self._take_slot()
        self._pinned.add(slot)
        return slot

    def release_slot(self, slot: int) -> None:
        """Give back a slot from `take_snapshot_slot` that did not become a snapshot."""
        self._pinned.discard(slot)
        self._free_slots.append(slot)

    def end_step(self) -> None:
        """The scheduled step ran: the snapshots it restored may be evicted again."""
        self._pinned.clear()
        for block in self._deferred:
            self._release_block(block)
        self._deferred.clear()

    # ---- the prefix index ---------------------------------------------------------------------------------------
    def _digests(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The digests of `seq`'s first `num_blocks` full blocks (computed once per sequence)."""
        hashes, bs = seq.block_hashes, self.block_size
        assert num_blocks * bs <= seq.num_tokens, f"digest of a block past {seq!r}'s known tokens"
        while len(hashes) < num_blocks:
            i = len(hashes)
            hashes.append(block_digest(hashes[-1] if hashes else ROOT, seq.token_ids_between(i * bs, (i + 1) * bs)))
        return hashes

    def lookup(self, seq: Sequence) -> PrefixHit | None:
        """The longest cached prefix of `seq`'s tokens that leaves at least one token to feed and has both its full KV
        blocks and a state snapshot. None without prefix caching or a hit."""
        if not self.enable_prefix_caching:
            return None
        bs, limit = self.block_size, seq.num_tokens - 1
        best, depth, digest = None, 0, ROOT
        while True:
            for partial, snap in self._snapshots_at.get(digest, {}).items():
                p = depth * bs + len(partial)
                if 0 < p <= limit and (best is None or p > best.position) and (
                        not partial or tuple(seq.token_ids_between(depth * bs, p)) == partial):
                    best = snap
            if (depth + 1) * bs > limit:
                break
            digest = self._digests(seq, depth + 1)[depth]
            if digest not in self._cached:
                break
            depth += 1
        if best is None:
            return None
        blocks = tuple(self._cached[d] for d in self._digests(seq, best.position // bs)[:best.position // bs])
        return PrefixHit(best.position, blocks, best)

    def count_query(self, seq: Sequence, hit: PrefixHit | None) -> None:
        """Count a sequence's first admission: its prompt tokens looked up, and those found cached."""
        if self.enable_prefix_caching and seq.num_preemptions == 0:
            self.queries += seq.num_prompt_tokens
            self.hits += min(hit.position, seq.num_prompt_tokens) if hit is not None else 0

    def can_adopt(self, seq: Sequence, num_new_tokens: int, hit: PrefixHit) -> bool:
        """Whether `seq` can start after `hit` by taking the snapshot's slot itself (when no other slot is left)."""
        return hit.snapshot.slot not in self._pinned and self._hit_fits(hit, num_new_tokens)

    def allocate_hit(self, seq: Sequence, hit: PrefixHit, num_new_tokens: int, adopt: bool = False) -> None:
        """Start `seq` (no blocks, no slot) after the cached prefix `hit`: share its full blocks, then allocate a slot
        and blocks for `num_new_tokens` more tokens. The caller restores the snapshot into the slot (and copies the
        partial block's rows) before the step's forward; the snapshot stays pinned until `end_step()`. `adopt`
        (`can_adopt`): the sequence takes the snapshot's slot instead, and the snapshot leaves the cache."""
        assert not seq.block_table and seq.slot is None and seq.num_computed_tokens == 0
        if adopt:
            assert self.can_adopt(seq, num_new_tokens, hit), f"allocate_hit without room: {seq!r}"
        else:
            assert self.can_allocate(seq, num_new_tokens, hit), f"allocate_hit without room: {seq!r}"
        for block in hit.blocks:
            if self._ref_counts[block] == 0:
                del self._evictable[block]
            self._ref_counts[block] += 1
        snap = hit.snapshot
        if adopt:  # its partial block stays held until the step has copied its rows
            self._remove_snapshot(snap)
            if snap.block is not None:
                self._deferred.append(snap.block)
            seq.slot = snap.slot
        else:
            self._pinned.add(snap.slot)
            self._snapshots.move_to_end(snap.key)
        seq.block_table = list(hit.blocks)
        seq.num_computed_tokens = hit.position
        seq.num_registered_blocks = len(hit.blocks)
        self.allocate(seq, num_new_tokens)

    def register_blocks(self, seq: Sequence) -> None:
        """Index `seq`'s full blocks of fed tokens by digest (a prefix another sequence cached first keeps its
        block; this one then stays private)."""
        if not self.enable_prefix_caching:
            return
        full = min(min(seq.num_computed_tokens, seq.num_tokens) // self.block_size, len(seq.block_table))
        if full <= seq.num_registered_blocks:
            return
        digests = self._digests(seq, full)
        for i in range(seq.num_registered_blocks, full):
            block, digest = seq.block_table[i], digests[i]
            if digest not in self._cached and block not in self._digest_of:
                self._cached[digest] = block
                self._digest_of[block] = digest
        seq.num_registered_blocks = full

    def add_snapshot(self, seq: Sequence, position: int, slot: int) -> None:
        """Index the state that a forward stored in `slot` (from `take_snapshot_slot`): `seq`'s state after `position`
        tokens. An equal snapshot already cached keeps its place; the slot is then given back."""
        self._pinned.discard(slot)
        if not self._add_snapshot(seq, position, slot):
            self._free_slots.append(slot)

    def _add_snapshot(self, seq: Sequence, position: int, slot: int) -> bool:
        bs = self.block_size
        full = position // bs
        if not 1 <= position <= min(seq.num_computed_tokens, seq.num_tokens) or len(seq.block_table) * bs < position:
            return False
        digest = self._digests(seq, full)[full - 1] if full else ROOT
        partial = tuple(seq.token_ids_between(full * bs, position))
        existing = self._snapshots.get((digest, partial))
        if existing is not None:
            self._snapshots.move_to_end(existing.key)
            return False
        block = seq.block_table[full] if partial else None
        if block is not None:
            self._ref_counts[block] += 1
            self._snap_pins[block] = self._snap_pins.get(block, 0) + 1
        snap = Snapshot(slot, position, digest, partial, block)
        self._snapshots[snap.key] = snap
        self._snapshots_at.setdefault(digest, {})[partial] = snap
        return True

    def _remove_snapshot(self, snap: Snapshot) -> None:
        """Take `snap` out of the index (its slot and partial block are the caller's)."""
        del self._snapshots[snap.key]
        at = self._snapshots_at[snap.digest]
        del at[snap.partial]
        if not at:
            del self._snapshots_at[snap.digest]
        if snap.block is not None:
            self._snap_pins[snap.block] -= 1
            if not self._snap_pins[snap.block]:
                del self._snap_pins[snap.block]

    def _drop_snapshot(self, snap: Snapshot) -> None:
        self._remove_snapshot(snap)
        if snap.block is not None:
            self._release_block(snap.block)
        self._free_slots.append(snap.slot)
        self.evicted_snapshots += 1
