"""Continuous-batching scheduler with chunked prefill and recompute preemption. Plain Python, no torch.

Every step is one forward over a flat batch that mixes decodes (1 token each) and prefill chunks:
1. every running sequence is scheduled, oldest admission first: decodes get 1 token, partial prefills get a
   chunk from whatever token budget the decodes leave (so a long prompt never stalls decoding);
2. if that needs more KV blocks than are free, the most recently admitted running sequence is preempted
   (cache dropped, back to the front of the waiting queue, recomputed later as prompt + output so far);
3. waiting sequences are admitted in order while tokens, blocks, slots and `max_num_seqs` allow.
The oldest running sequence is preempted only when it is the last one; since `add` refuses requests bigger
than the whole pool, it then always fits, so every step makes progress.

Multi-step decoding (vLLM's `num_scheduler_steps`): when every running sequence decodes, takes the argmax of its
logits (`Sequence.samples_argmax`) and nothing waits, one schedule runs up to `num_scheduler_steps` decode steps in a
row, each step's tokens fed to the next inside the runner (`ScheduledBatch.num_steps`), with the blocks for all of
them allocated here: the scheduling, batch metadata and output processing of a step are paid once per run. Runs are
kept to about `multi_step_seconds` of decoding (from the measured time per step, `record_decode_step`), so a stream
or a request that arrives meanwhile waits at most that long, and never pass max_tokens or max_model_len; a stop token
or string inside a run ends the sequence there (the rest of its run is dropped, as for rejected drafts). With
speculative decoding, the steps the draft policy gives no drafts can run so too.

With speculative decoding (speculative.py), the decode entries of a step get drafts afterwards: each sequence feeds
its last token plus up to k drafts (k from the `DraftLengthPolicy`), with blocks allocated for the positions the MTP
head drafts at (`num_lookahead`). Drafts only use blocks and budget left after the plain schedule, so they never
preempt or delay anyone (prefill chunks in the same step are verified apart by the runner).

With prefix caching (prefix_cache.py), a waiting sequence is admitted after the longest cached prefix of its tokens
(its blocks shared, the snapshot restored by the step's slot ops) and computes only the rest; prefill chunks leave
state snapshots where the `SnapshotPolicy` says, in slots that free memory allows (never preempting for one). The
scheduler indexes what a step computed in `update`, and a finished sequence's blocks and slot stay cached.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence as SequenceLike
from dataclasses import dataclass, replace

from ..model.layout import paged_row
from .block_manager import BlockManager
from .prefix_cache import PrefixHit, SnapshotPolicy
from .sequence import FinishReason, Sequence, SequenceStatus
from .slot_ops import CopyKVRows, CopySlot, SlotOp, ZeroSlots
from .speculative import DraftLengthPolicy
from .stopping import StopRules

# Engine(num_scheduler_steps=None)'s value: runs of up to 8 steps (module docstring).
DEFAULT_SCHEDULER_STEPS = 8


def _room(max_tokens: int, limit: str) -> str:
    """What the request could ask for instead: at most `max_tokens` new tokens, or a shorter prompt."""
    if max_tokens >= 1:
        return f"max_tokens can be at most {max_tokens} with this prompt"
    return f"the prompt alone does not fit {limit}: shorten it"


@dataclass
class SchedulerConfig:
    """max_num_batched_tokens: tokens per forward. prefill_chunk_size: most prompt tokens one sequence feeds
    per step when chunked_prefill is on. eos_token_ids: end a sequence (unless its params say ignore_eos).
    snapshot_policy: where prefill chunks leave DeltaNet state snapshots when the block manager caches prefixes.
    num_scheduler_steps / multi_step_seconds: multi-step decoding (module docstring)."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    chunked_prefill: bool = True
    prefill_chunk_size: int = 512
    eos_token_ids: tuple[int, ...] = ()
    snapshot_policy: SnapshotPolicy = SnapshotPolicy()
    num_scheduler_steps: int = 1  # most decode steps one schedule runs (1: one step per schedule)
    multi_step_seconds: float = 0.02  # a run of several steps is kept to about this long

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "prefill_chunk_size",
                     "num_scheduler_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                             f"({self.max_num_seqs}) so that every running sequence can decode each step")
        if not self.multi_step_seconds > 0:
            raise ValueError(f"multi_step_seconds must be > 0, got {self.multi_step_seconds}")
        if not self.chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"without chunked_prefill, max_num_batched_tokens ({self.max_num_batched_tokens}) must "
                             f"be >= max_model_len ({self.max_model_len}) so that any prompt fits in one step")
        self.eos_token_ids = tuple(self.eos_token_ids)


@dataclass(frozen=True)
class ScheduledEntry:
    """One sequence's share of a step: feed tokens [context_len, context_len + num_new_tokens)."""

    seq: Sequence
    num_new_tokens: int
    context_len: int  # tokens already cached before this step
    is_fresh_slot: bool  # the slot was just assigned: the batch's slot_ops zero its DeltaNet state first
    needs_sample: bool  # the last fed token is the last known token, so its logits give the next token
    draft_token_ids: tuple[int, ...] = ()  # fed after the last known token, verified against the target's samples
    restore: PrefixHit | None = None  # resumes after this cached prefix (context_len == restore.position)
    snapshots: tuple[tuple[int, int], ...] = ()  # (position p, slot): leave the state after p tokens in slot

    @property
    def num_drafts(self) -> int:
        return len(self.draft_token_ids)


class ScheduledBatch:
    """What the runner computes in one forward, with flattened per-token and per-sequence lists.

    Per token (N = num_tokens): `input_ids`, `positions`, `kv_write_indices` (row of the paged KV pool
    `[num_blocks * block_size]` that the token's K/V goes to); the runner's `BatchInfo` takes positions and rows
    from here. Per sequence (B = len(entries)): `num_new_tokens`, `context_lens`, `slots`, `block_tables`
    (snapshots taken at schedule time), `query_start_loc` ([B + 1] offsets into the flat tokens). Sampling:
    `sample_indices` (entry positions that need a token, in order) and `logits_indices` (flat index of each of
    their last tokens, or of every fed token of an entry with drafts: 1 + its drafts rows). `next_token_ids` (per
    entry): the known token after its last fed one (a prompt chunk that is not the last), None where that token is
    sampled in this step. `num_lookahead`: how many drafts the MTP head proposes for the next step (0: none).
    `slot_ops`: operations on whole state slots that the runner applies, in order, before the forward (zeroing
    fresh slots; restoring the prefix of sequences that resume after a cached one). `snapshots` (b, m, slot): the
    forward also leaves entry b's state after its first m new tokens in `slot` (`BatchInfo.snapshots`).
    Prompt logprobs: `prompt_logprob_spans` (entry, first, stop): the entry's prompt positions [first, stop) whose
    next prompt token's logprob this step computes (those of its chunk not done before a preemption, never the
    last prompt position, which predicts the first output token); `prompt_logprob_rows` / `_targets`: per such
    position, its flat token index and the prompt token after it.
    `num_steps` > 1: a multi-step decode (every entry decodes one token, greedy, no drafts): the runner runs that many
    steps in a row, each feeding the tokens the one before it picked (the per-token lists describe the first), and
    returns up to that many tokens per entry; the blocks for all of them are allocated.
    """

    def __init__(self, entries: list[ScheduledEntry], block_size: int, num_lookahead: int = 0, num_steps: int = 1):
        self.entries = entries
        self.block_size = block_size
        self.num_steps = num_steps
        self.input_ids: list[int] = []
        self.positions: list[int] = []
        self.kv_write_indices: list[int] = []
        self.query_start_loc: list[int] = [0]
        self.sample_indices: list[int] = []
        self.logits_indices: list[int] = []
        self.block_tables: list[list[int]] = []
        self.next_token_ids: list[int | None] = []
        self.num_lookahead = num_lookahead
        self.prompt_logprob_spans: list[tuple[int, int, int]] = []
        self.prompt_logprob_rows: list[int] = []
        self.prompt_logprob_targets: list[int] = []
        for i, e in enumerate(entries):
            start, stop = e.context_len, e.context_len + e.num_new_tokens
            table = list(e.seq.block_table)
            self.block_tables.append(table)
            known = stop - e.num_drafts
            self.input_ids += e.seq.token_ids_between(start, known) + list(e.draft_token_ids)
            self.positions += range(start, stop)
            self.kv_write_indices += [paged_row(table, p, block_size) for p in range(start, stop)]
            self.query_start_loc.append(self.query_start_loc[-1] + e.num_new_tokens)
            nxt = e.seq.token_ids_between(stop, stop + 1)  # empty after a whole prompt with max_tokens 0
            self.next_token_ids.append(nxt[0] if nxt and not e.needs_sample else None)
            if e.seq.wants_prompt_logprobs:
                first, last = max(start, e.seq.num_prompt_logprobs), min(known, e.seq.num_prompt_tokens - 1)
                if first < last:
                    row = self.query_start_loc[-2] - start
                    self.prompt_logprob_spans.append((i, first, last))
                    self.prompt_logprob_rows += range(row + first, row + last)
                    self.prompt_logprob_targets += e.seq.token_ids_between(first + 1, last + 1)
            if e.needs_sample:
                self.sample_indices.append(i)
                self.logits_indices += range(self.query_start_loc[-1] - 1 - e.num_drafts, self.query_start_loc[-1])
        self.num_new_tokens = [e.num_new_tokens for e in entries]
        self.context_lens = [e.context_len for e in entries]
        self.slots: list[int] = [e.seq.slot for e in entries]
        fresh = tuple(e.seq.slot for e in entries if e.is_fresh_slot)
        self.slot_ops: list[SlotOp] = [ZeroSlots(fresh)] if fresh else []
        self.snapshots: list[tuple[int, int, int]] = []
        for b, e in enumerate(entries):
            if e.restore is not None:
                snap, p = e.restore.snapshot, e.restore.position
                if snap.slot != e.seq.slot:  # else the sequence adopted the snapshot's slot
                    self.slot_ops.append(CopySlot(snap.slot, e.seq.slot))
                if snap.block is not None:
                    self.slot_ops.append(CopyKVRows(snap.block, self.block_tables[b][p // block_size], p % block_size))
            self.snapshots += [(b, p - e.context_len, slot) for p, slot in e.snapshots]

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc[-1]

    @property
    def fresh_slots(self) -> list[int]:
        """Slots zeroed before this step's forward."""
        return [slot for op in self.slot_ops if isinstance(op, ZeroSlots) for slot in op.slots]

    @property
    def seqs(self) -> list[Sequence]:
        return [e.seq for e in self.entries]

    @property
    def sampled_seqs(self) -> list[Sequence]:
        return [self.entries[i].seq for i in self.sample_indices]

    @property
    def decode_entries(self) -> list[int]:
        """Entries that feed their last token (and drafts) only; the others are prefill chunks."""
        return [b for b, e in enumerate(self.entries) if e.needs_sample and e.num_new_tokens == 1 + e.num_drafts]

    @property
    def is_decode_step(self) -> bool:
        """Every entry decodes (with or without drafts)."""
        return len(self.decode_entries) == len(self.entries)

    @property
    def has_drafts(self) -> bool:
        return any(e.draft_token_ids for e in self.entries)

    @property
    def num_drafts(self) -> int:
        """The most drafts of any entry (the step's draft length)."""
        return max((e.num_drafts for e in self.entries), default=0)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 draft_policy: DraftLengthPolicy | None = None):
        self.config = config
        self.block_manager = block_manager
        self.draft_policy = draft_policy  # speculative decoding: how many drafts per step (None: off)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order, oldest first
        self._live: dict[str, Sequence] = {}
        self._arrivals = 0
        self.num_preemptions = 0
        self.stop_rules = StopRules(config.eos_token_ids, config.max_model_len)
        self.seconds_per_decode_step: float | None = None  # measured (record_decode_step); None: not yet

    # ---- queue management -------------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence. Raises ValueError if it could never run within max_model_len or the KV pool."""
        if seq.status is not SequenceStatus.WAITING or seq.num_computed_tokens or seq.block_table:
            raise ValueError(f"only fresh sequences can be added, got {seq!r}")
        if seq.request_id in self._live:
            raise ValueError(f"request id {seq.request_id!r} is already queued or running")
        max_len = self.config.max_model_len
        total = seq.num_prompt_tokens + seq.params.max_tokens
        if total > max_len:
            raise ValueError(f"request {seq.request_id!r}: prompt ({seq.num_prompt_tokens} tokens) + max_tokens "
                             f"({seq.params.max_tokens}) = {total} exceeds max_model_len={max_len}; "
                             f"{_room(max_len - seq.num_prompt_tokens, 'max_model_len')}, or raise "
                             f"max_model_len (--max-model-len)")
        # The last generated token is never fed back, so at most total - 1 tokens are ever cached (all of a prompt
        # that generates nothing).
        bm = self.block_manager
        cached = total - 1 if seq.params.max_tokens else total
        need = bm.num_blocks_for(cached)
        if need > bm.num_blocks:
            pool = bm.num_blocks * bm.block_size
            raise ValueError(f"request {seq.request_id!r}: {cached} cached tokens need {need} KV blocks of "
                             f"{bm.block_size} but the pool only has {bm.num_blocks} ({pool} tokens); "
                             f"{_room(pool + 1 - seq.num_prompt_tokens, 'the pool')}, or raise max_memory "
                             f"(--max-memory)")
        seq.arrival = self._arrivals
        self._arrivals += 1
        self._live[seq.request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Finish a queued or running request with reason abort, freeing its cache now.

        Returns the sequence, or None if the id is unknown or already finished.
        """
        seq = self._live.get(request_id)
        if seq is None:
            return None
        self.finish(seq, FinishReason.ABORT)
        return seq

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End `seq` now, freeing its cache (a `StopRules` reason, or abort); no-op if already finished."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq)
        else:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = FinishReason(reason)
        del self._live[seq.request_id]

    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- one step ---------------------------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch | None:
        """Pick the work of the next forward; None when nothing is queued or running."""
        cfg = self.config
        self.block_manager.end_step()
        chunk_cap = cfg.prefill_chunk_size if cfg.chunked_prefill else cfg.max_num_batched_tokens
        entries, budget, preempted = self._schedule_running(cfg.max_num_batched_tokens, chunk_cap)
        if not preempted:  # admitting after a preemption would just thrash
            entries += self._admit_waiting(budget, chunk_cap)
        if not entries:
            assert not self.has_unfinished(), "scheduler made no progress with work queued"
            return None
        lookahead = 0
        if self.draft_policy is not None:
            sampled = sum(1 for e in entries if e.needs_sample)  # the sequences that decode at the next step
            lookahead = self.draft_policy.choose(sampled) if sampled else 0
            if lookahead:
                budget = cfg.max_num_batched_tokens - sum(e.num_new_tokens for e in entries)
                entries = self._add_drafts(entries, lookahead, budget)
        if self.block_manager.enable_prefix_caching:
            entries = self._add_snapshots(entries)
        steps = 1
        if lookahead == 0 and not preempted and not self.waiting:  # with speculative decoding: a step not drafting
            steps = self._decode_steps(entries)
        return ScheduledBatch(entries, self.block_manager.block_size, lookahead, steps)

    def record_decode_step(self, seconds: float) -> None:
        """The measured time of one decode step (a run's time over its steps), which bounds how many steps a run
        takes (`multi_step_seconds`); a moving average over the last few."""
        prev = self.seconds_per_decode_step
        self.seconds_per_decode_step = seconds if prev is None else 0.8 * prev + 0.2 * seconds

    def _decode_steps(self, entries: list[ScheduledEntry]) -> int:
        """How many decode steps the schedule `entries` runs in a row (module docstring), with the blocks for them
        allocated; 1 unless every entry decodes one token by argmax and the measured step time leaves room."""
        cfg, per_step = self.config, self.seconds_per_decode_step
        if cfg.num_scheduler_steps < 2 or per_step is None:
            return 1
        n = min(cfg.num_scheduler_steps, int(cfg.multi_step_seconds / max(per_step, 1e-9)))
        for e in entries:
            seq = e.seq
            if not (e.needs_sample and e.num_new_tokens == 1 and not e.draft_token_ids and not e.snapshots
                    and e.restore is None and seq.samples_argmax):
                return 1
            # every step appends a token: never past max_tokens, nor past max_model_len
            n = min(n, seq.params.max_tokens - seq.num_output_tokens, cfg.max_model_len - seq.num_tokens)
        if n < 2:
            return 1
        bm = self.block_manager
        for e in entries:  # blocks ahead for steps 2..n (blocks taken before a failure are used by later steps)
            if not bm.can_allocate(e.seq, n):
                return 1
            bm.allocate(e.seq, n)
        return n

    def _add_drafts(self, entries: list[ScheduledEntry], k: int, budget: int) -> list[ScheduledEntry]:
        """Give decode entries up to `k` of their sequence's drafts, within the tokens left in the step's `budget`
        and the free blocks (for the verified positions and the k - 1 the MTP head drafts at after them), never past
        max_tokens or max_model_len. Prefill chunks in the same step keep what they were given."""
        bm, max_len = self.block_manager, self.config.max_model_len
        out = []
        for e in entries:
            seq = e.seq
            if e.num_new_tokens != 1 or not e.needs_sample:
                out.append(e)
                continue
            room = min(seq.params.max_tokens - seq.num_output_tokens, max_len - seq.num_tokens) - 1
            n = min(k, len(seq.draft_token_ids), room, budget)
            if n > 0:
                # blocks for the verified positions, then as many lookahead positions as fit (max_model_len)
                ahead = min(k - 1, max_len - 1 - (seq.num_computed_tokens + 1 + n))
                for extra in (max(ahead, 0), 0):
                    if bm.can_allocate(seq, 1 + n + extra):
                        bm.allocate(seq, 1 + n + extra)
                        e = replace(e, num_new_tokens=1 + n, draft_token_ids=tuple(seq.draft_token_ids[:n]))
                        budget -= n
                        break
            out.append(e)
        return out

    def _add_snapshots(self, entries: list[ScheduledEntry]) -> list[ScheduledEntry]:
        """Give prefill chunks (2+ tokens, no drafts) the snapshots the policy asks for, while slots can be had
        without taking one from a sequence (the least recently used snapshots are replaced)."""
        policy, bm, out = self.config.snapshot_policy, self.block_manager, []
        for e in entries:
            if e.num_new_tokens >= 2 and not e.num_drafts:
                start, stop, seq = e.context_len, e.context_len + e.num_new_tokens, e.seq
                taken = []
                for p in policy.positions(seq.token_ids_between(start, stop), start, stop, seq.num_prompt_tokens):
                    slot = bm.take_snapshot_slot()
                    if slot is None:
                        break
                    taken.append((p, slot))
                if taken:
                    e = replace(e, snapshots=tuple(taken))
            out.append(e)
        return out

    def _schedule_running(self, budget: int, chunk_cap: int) -> tuple[list[ScheduledEntry], int, bool]:
        """Entries for the running sequences, oldest first, preempting the newest when blocks run out.
        Returns (entries, token budget left, whether anything was preempted)."""
        bm = self.block_manager
        entries: list[ScheduledEntry] = []
        # Budget kept back so that every running decode behind a prefill chunk still fits.
        pending_decodes = sum(1 for s in self.running if not s.is_prefilling)
        preempted = False
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            if seq.is_prefilling:
                n = min(seq.num_uncomputed_tokens, chunk_cap, budget - pending_decodes)
                if n <= 0:
                    i += 1
                    continue
            else:
                pending_decodes -= 1
                n = 1
            while not bm.can_allocate(seq, n):
                victim = self.running[-1]
                if not victim.is_prefilling and victim is not seq:
                    pending_decodes -= 1
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:  # preempted itself: it was the newest
                break
            entries.append(self._take(seq, n, bm.allocate(seq, n)))
            budget -= n
            i += 1
        return entries, budget, preempted

    def _admit_waiting(self, budget: int, chunk_cap: int) -> list[ScheduledEntry]:
        """Entries for waiting sequences admitted in order while tokens, blocks, slots and max_num_seqs allow."""
        cfg, bm = self.config, self.block_manager
        entries: list[ScheduledEntry] = []
        max_running = min(cfg.max_num_seqs, bm.num_slots)
        while self.waiting and budget > 0 and len(self.running) < max_running:
            seq = self.waiting[0]
            # A request for prompt logprobs computes every prompt position (its other samples may use the cache).
            hit = None if seq.wants_prompt_logprobs else bm.lookup(seq)
            adopt = False
            if hit is not None:
                n = min(seq.num_tokens - hit.position, chunk_cap, budget)
                if not bm.can_allocate(seq, n, hit):
                    # no other slot: take the snapshot's own; no room for the hit at all: start from scratch
                    adopt = bm.can_adopt(seq, n, hit)
                    hit = hit if adopt else None
            todo = seq.num_tokens - hit.position if hit is not None else seq.num_uncomputed_tokens
            n = min(todo, chunk_cap, budget)
            if n < todo and not cfg.chunked_prefill:
                break
            if hit is None and not bm.can_allocate(seq, n):
                break
            self.waiting.popleft()
            bm.count_query(seq, hit)
            if hit is not None:
                bm.allocate_hit(seq, hit, n, adopt)
            else:
                fresh = bm.allocate(seq, n)
                assert fresh, "a waiting sequence cannot already hold a slot"
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = hit.position if hit is not None else 0
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            entry = self._take(seq, n, hit is None)
            entries.append(entry if hit is None else replace(entry, restore=hit))
            budget -= n
        return entries

    def update(self, batch: ScheduledBatch, sampled_token_ids: SequenceLike[int]) -> list[Sequence]:
        """Account for a finished forward: advance cached counts, append the sampled tokens, finish sequences
        that a token rule of `StopRules` ends (EOS / stop token, max_tokens / max_model_len) and those with
        max_tokens 0 whose prompt is now cached; count the prompt logprobs computed.

        `sampled_token_ids` holds, per entry in `batch.sample_indices` (in that order), the token sampled for it,
        or the list of tokens its verification emitted (its accepted drafts, then one sampled token: 1 to
        1 + num_drafts tokens). The tokens are appended one by one; a stop rule ends the sequence at once and the rest
        of its run is dropped. The rejected drafts' positions are uncomputed again. Sequences finished meanwhile
        (aborted, stop string) are skipped. Returns the sequences that finished in this call.
        """
        if len(sampled_token_ids) != len(batch.sample_indices):
            raise ValueError(f"expected {len(batch.sample_indices)} sampled tokens (one per entry that needs a "
                             f"sample), got {len(sampled_token_ids)}")
        runs = iter(sampled_token_ids)
        finished: list[Sequence] = []
        for e in batch.entries:
            run = next(runs) if e.needs_sample else None
            if run is not None:
                run = [int(t) for t in run] if isinstance(run, (list, tuple)) else [int(run)]
                most = max(1 + e.num_drafts, batch.num_steps)
                if not 1 <= len(run) <= most:
                    raise ValueError(f"{e.seq.request_id}: expected 1 to {most} tokens, got {len(run)}")
            seq = e.seq
            if seq.is_finished:
                for _, slot in e.snapshots:
                    self.block_manager.release_slot(slot)
                continue
            assert seq.num_computed_tokens == e.context_len, "batch applied twice or out of order"
            kept = e.num_new_tokens if run is None else e.num_new_tokens - e.num_drafts + len(run) - 1
            seq.num_computed_tokens += kept
            for p, slot in e.snapshots:  # prefill chunks (no drafts): every position fed is a known token
                self.block_manager.add_snapshot(seq, p, slot)
            if seq.wants_prompt_logprobs:
                done = min(seq.num_computed_tokens, seq.num_prompt_tokens - 1)
                seq.num_prompt_logprobs = max(seq.num_prompt_logprobs, done)
            if run is None:
                if seq.num_computed_tokens == seq.num_tokens and seq.params.max_tokens == 0:
                    self.finish(seq, FinishReason.LENGTH)  # prefill only: the prompt is all there is to do
                    finished.append(seq)
                continue
            for token in run:
                seq.output_token_ids.append(token)
                reason = self.stop_rules.by_token(seq)
                if reason is not None:
                    self.finish(seq, reason)
                    finished.append(seq)
                    break
        for e in batch.entries:  # after the tokens are appended: a verification feeds drafts that are known only now
            if not e.seq.is_finished:
                self.block_manager.register_blocks(e.seq)
        self.block_manager.end_step()  # the snapshots this step restored may be evicted again
        return finished

    # ---- helpers ----------------------------------------------------------------------------------------------

    def _take(self, seq: Sequence, n: int, fresh: bool) -> ScheduledEntry:
        ctx = seq.num_computed_tokens
        return ScheduledEntry(seq, n, ctx, fresh, needs_sample=ctx + n == seq.num_tokens and seq.params.max_tokens > 0)

    def _preempt(self, seq: Sequence) -> None:
        """Drop the cache of a running sequence; it will recompute prompt + output from the front of the queue."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.draft_token_ids = []
        seq.status = SequenceStatus.PREEMPTED
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
