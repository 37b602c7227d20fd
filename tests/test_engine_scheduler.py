"""Scheduler + block manager driven by a fake model runner (pure Python, no torch).

The fake runner imitates the hybrid cache: a recurrent "state" per slot (a hash chain of the tokens fed, so a
slot that is not zeroed when reused, or fed tokens twice, changes the outputs) and a paged "KV" pool in which
every fed token is written at its kv_write_index and the whole context is read back through the block table
(so a block shared with another sequence, or a wrong block table, is caught). The next token is a deterministic
function of the token history, so every run must reproduce `reference_generate`.
"""

import random

import pytest

from qwen3next.engine.block_manager import BlockManager
from qwen3next.engine.sampling import SamplingParams
from qwen3next.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from qwen3next.engine.sequence import FinishReason, Sequence, SequenceStatus
from qwen3next.engine.slot_ops import CopySlot, ZeroSlots

VOCAB = 50
EOS = 7
MOD = (1 << 61) - 1


def chain(state: int, token: int) -> int:
    return (state * 1_000_003 + token + 1) % MOD


def next_token(state: int) -> int:
    return (state >> 7) % VOCAB


def reference_generate(prompt: list[int], params: SamplingParams, max_model_len: int,
                       eos: tuple[int, ...] = (EOS,)) -> tuple[list[int], str]:
    state = 0
    for t in prompt:
        state = chain(state, t)
    out: list[int] = []
    while True:
        t = next_token(state)
        out.append(t)
        if (t in eos and not params.ignore_eos) or t in params.stop_token_ids:
            return out, "stop"
        if len(out) >= params.max_tokens or len(prompt) + len(out) >= max_model_len:
            return out, "length"
        state = chain(state, t)


class FakeRunner:
    def __init__(self, bm: BlockManager):
        self.kv: list[tuple[int, int] | None] = [None] * (bm.num_blocks * bm.block_size)
        self.state: list[int | None] = [None] * bm.num_slots  # None: never zeroed
        self.block_size = bm.block_size

    # The slot operations' store interface (what HybridCache implements on tensors).
    def zero_slots(self, slots: list[int]) -> None:
        for slot in slots:
            self.state[slot] = 0

    def copy_slot(self, src: int, dst: int) -> None:
        self.state[dst] = self.state[src]

    def step(self, batch: ScheduledBatch) -> list:
        bs = self.block_size
        for op in batch.slot_ops:  # executed without knowing why, as the real runner does
            op.apply(self)
        if batch.num_steps > 1:
            return self.steps(batch)
        for row, tok, pos in zip(batch.kv_write_indices, batch.input_ids, batch.positions, strict=True):
            self.kv[row] = (tok, pos)
        sampled = []
        for i, e in enumerate(batch.entries):
            lo, hi = batch.query_start_loc[i], batch.query_start_loc[i + 1]
            assert hi - lo == e.num_new_tokens
            assert batch.positions[lo:hi] == list(range(e.context_len, e.context_len + e.num_new_tokens))
            state = self.state[batch.slots[i]]
            assert state is not None, "slot used before being zeroed"
            for tok in batch.input_ids[lo:hi]:
                state = chain(state, tok)
            self.state[batch.slots[i]] = state
            # Attention reads the whole context through the block table.
            table = batch.block_tables[i]
            seen = [self.kv[table[p // bs] * bs + p % bs] for p in range(e.context_len + e.num_new_tokens)]
            expected = list(enumerate(e.seq.token_ids_between(0, e.context_len + e.num_new_tokens)))
            assert seen == [(t, p) for p, t in expected], f"KV of {e.seq.request_id} corrupted"
            if e.needs_sample:
                assert i in batch.sample_indices and batch.logits_indices[batch.sample_indices.index(i)] == hi - 1
                sampled.append(next_token(state))
        return sampled


    def steps(self, batch: ScheduledBatch) -> list[list[int]]:
        """A multi-step batch: every entry decodes num_steps tokens in a row, each fed to the next step, its K/V
        written into the blocks the scheduler allocated ahead (IndexError past the table)."""
        bs, runs = self.block_size, []
        for i, e in enumerate(batch.entries):
            assert e.num_new_tokens == 1 and e.needs_sample and not e.draft_token_ids
            table, tok, state, run = batch.block_tables[i], batch.input_ids[i], self.state[batch.slots[i]], []
            for k in range(batch.num_steps):
                p = e.context_len + k
                self.kv[table[p // bs] * bs + p % bs] = (tok, p)
                state = chain(state, tok)
                tok = next_token(state)
                run.append(tok)
            self.state[batch.slots[i]] = state
            runs.append(run)
        return runs


def check_invariants(sched: Scheduler, batch: ScheduledBatch | None) -> None:
    cfg, bm = sched.config, sched.block_manager
    running = sched.running
    owned = [b for s in running for b in s.block_table]
    assert len(owned) == len(set(owned)), "a block is shared by two live sequences"
    assert len(owned) + bm.num_free_blocks == bm.num_blocks
    slots = [s.slot for s in running]
    assert None not in slots and len(set(slots)) == len(slots)
    assert len(slots) + bm.num_free_slots == bm.num_slots
    assert len(running) <= min(cfg.max_num_seqs, bm.num_slots)
    assert all(s.block_table == [] and s.slot is None for s in sched.waiting)
    assert all(s.status in (SequenceStatus.WAITING, SequenceStatus.PREEMPTED) for s in sched.waiting)
    if batch is not None:
        assert batch.num_tokens <= cfg.max_num_batched_tokens
        assert len(batch) <= cfg.max_num_seqs
        assert len({id(e.seq) for e in batch.entries}) == len(batch)
        for e in batch.entries:
            if cfg.chunked_prefill and e.num_new_tokens > 1:
                assert e.num_new_tokens <= cfg.prefill_chunk_size


def run_to_completion(sched: Scheduler, runner: FakeRunner, max_steps: int = 10_000,
                      on_step=None) -> list[ScheduledBatch]:
    batches = []
    for step in range(max_steps):
        decoding = [s for s in sched.running if not s.is_prefilling]
        batch = sched.schedule()
        check_invariants(sched, batch)
        # Every running decode is in the step, unless it was preempted to make room.
        in_batch = set() if batch is None else {id(s) for s in batch.seqs}
        assert all(id(s) in in_batch or s.status is SequenceStatus.PREEMPTED for s in decoding)
        if batch is None:
            assert not sched.has_unfinished()
            return batches
        batches.append(batch)
        sched.update(batch, runner.step(batch))
        check_invariants(sched, None)
        if on_step is not None:
            on_step(step)
    raise AssertionError("did not finish")


def make(num_blocks=64, block_size=4, num_slots=8, **cfg) -> tuple[Scheduler, FakeRunner]:
    cfg.setdefault("eos_token_ids", (EOS,))
    cfg.setdefault("max_num_seqs", 4)
    bm = BlockManager(num_blocks, block_size, num_slots)
    return Scheduler(SchedulerConfig(**cfg), bm), FakeRunner(bm)


def random_requests(n: int, seed: int, max_prompt: int = 30, max_out: int = 20) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(VOCAB) for _ in range(rng.randint(1, max_prompt))], rng.randint(1, max_out))
            for _ in range(n)]


def submit(sched: Scheduler, reqs, ignore_eos=False) -> list[Sequence]:
    seqs = [Sequence(f"r{i}", p, SamplingParams(max_tokens=m, ignore_eos=ignore_eos)) for i, (p, m) in enumerate(reqs)]
    for s in seqs:
        sched.add(s)
    return seqs


def assert_reference_outputs(sched: Scheduler, seqs: list[Sequence]) -> None:
    for s in seqs:
        out, reason = reference_generate(s.prompt_token_ids, s.params, sched.config.max_model_len,
                                         sched.config.eos_token_ids)
        assert s.output_token_ids == out, s.request_id
        assert s.finish_reason == FinishReason(reason)
        assert s.status is SequenceStatus.FINISHED


def assert_pool_full(sched: Scheduler) -> None:
    bm = sched.block_manager
    assert bm.num_free_blocks == bm.num_blocks and bm.num_free_slots == bm.num_slots
    assert sched.num_running == 0 and sched.num_waiting == 0


# ---- end to end ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [True, False])
def test_unconstrained_run_matches_reference(chunked):
    sched, runner = make(num_blocks=400, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64,
                         chunked_prefill=chunked, prefill_chunk_size=8)
    seqs = submit(sched, random_requests(30, seed=1))
    run_to_completion(sched, runner)
    assert_reference_outputs(sched, seqs)
    assert sched.num_preemptions == 0
    assert_pool_full(sched)
    assert {s.finish_reason for s in seqs} == {FinishReason.STOP, FinishReason.LENGTH}


@pytest.mark.parametrize("chunked", [True, False])
def test_tiny_pool_preempts_and_still_matches_reference(chunked):
    # 12 blocks of 4 tokens: a single 46-token sequence uses all of them.
    sched, runner = make(num_blocks=12, block_size=4, num_slots=6, max_num_seqs=6, max_num_batched_tokens=48,
                         max_model_len=48, chunked_prefill=chunked, prefill_chunk_size=5)
    reqs = random_requests(20, seed=2, max_prompt=25, max_out=20)
    seqs = submit(sched, reqs, ignore_eos=True)
    run_to_completion(sched, runner)
    assert sched.num_preemptions > 0
    assert any(s.num_preemptions > 0 for s in seqs)
    assert_reference_outputs(sched, seqs)
    assert_pool_full(sched)


def test_random_arrivals_and_aborts_keep_invariants():
    rng = random.Random(3)
    sched, runner = make(num_blocks=20, block_size=4, num_slots=4, max_num_seqs=4, max_num_batched_tokens=16,
                         max_model_len=40, chunked_prefill=True, prefill_chunk_size=6)
    reqs = iter(random_requests(40, seed=4, max_prompt=20, max_out=19))
    seqs: list[Sequence] = []
    aborted: set[str] = set()

    def on_step(step):
        for _ in range(rng.choice([0, 0, 1, 2])):
            nxt = next(reqs, None)
            if nxt is not None:
                s = Sequence(f"r{len(seqs)}", nxt[0], SamplingParams(max_tokens=nxt[1]))
                sched.add(s)
                seqs.append(s)
        live = sched.running + list(sched.waiting)
        if live and rng.random() < 0.1:
            victim = rng.choice(live)
            assert sched.abort(victim.request_id) is victim
            aborted.add(victim.request_id)

    submit_first = Sequence("first", [1, 2, 3], SamplingParams(max_tokens=5))
    sched.add(submit_first)
    run_to_completion(sched, runner, on_step=on_step)
    while next(reqs, None) is not None:  # the loop may end before every request arrived; run the rest
        pass
    assert aborted and all(sched.abort(r) is None for r in aborted)
    for s in seqs:
        if s.request_id in aborted:
            assert s.finish_reason is FinishReason.ABORT
    assert_reference_outputs(sched, [s for s in seqs if s.request_id not in aborted])
    assert_pool_full(sched)


# ---- behaviour of single steps -----------------------------------------------------------------------------------


def test_continuous_batching_admits_mid_flight():
    sched, runner = make(max_num_batched_tokens=64, max_model_len=64)
    a = Sequence("a", [1, 2, 3], SamplingParams(max_tokens=10, ignore_eos=True))
    sched.add(a)
    for _ in range(3):
        b0 = sched.schedule()
        sched.update(b0, runner.step(b0))
    assert a.num_output_tokens == 3
    b = Sequence("b", [4, 5, 6, 8], SamplingParams(max_tokens=3, ignore_eos=True))
    sched.add(b)
    batch = sched.schedule()
    by_id = {e.seq.request_id: e for e in batch.entries}
    assert by_id["a"].num_new_tokens == 1 and by_id["a"].needs_sample and not by_id["a"].is_fresh_slot
    assert by_id["b"].num_new_tokens == 4 and by_id["b"].needs_sample and by_id["b"].is_fresh_slot
    assert batch.fresh_slots == [b.slot]
    assert batch.entries[0].seq is a  # running decodes come first
    sched.update(batch, runner.step(batch))
    assert a.num_output_tokens == 4 and b.num_output_tokens == 1


def test_chunked_prefill_splits_long_prompt_and_keeps_decoding():
    sched, runner = make(num_blocks=64, max_num_batched_tokens=10, max_model_len=64, prefill_chunk_size=6)
    a = Sequence("a", [1, 2], SamplingParams(max_tokens=30, ignore_eos=True))
    sched.add(a)
    first = sched.schedule()
    sched.update(first, runner.step(first))
    long = Sequence("long", list(range(10, 40)), SamplingParams(max_tokens=2, ignore_eos=True))  # 30 tokens
    sched.add(long)
    chunks = []
    while long.num_output_tokens == 0:
        before = a.num_output_tokens
        batch = sched.schedule()
        by_id = {e.seq.request_id: e for e in batch.entries}
        assert by_id["a"].num_new_tokens == 1  # the decode is never stalled
        e = by_id["long"]
        chunks.append((e.context_len, e.num_new_tokens, e.needs_sample, e.is_fresh_slot))
        # The long prompt only gets what the decode leaves, capped by the chunk size.
        assert e.num_new_tokens <= min(6, 10 - 1)
        sched.update(batch, runner.step(batch))
        assert a.num_output_tokens == before + 1
    assert [c[1] for c in chunks] == [6, 6, 6, 6, 6]
    assert [c[0] for c in chunks] == [0, 6, 12, 18, 24]
    assert [c[2] for c in chunks] == [False] * 4 + [True]
    assert [c[3] for c in chunks] == [True] + [False] * 4
    run_to_completion(sched, runner)
    assert_reference_outputs(sched, [a, long])


def test_prefill_chunk_takes_remaining_budget_after_decodes():
    sched, runner = make(num_blocks=64, max_num_seqs=4, max_num_batched_tokens=8, max_model_len=64,
                         prefill_chunk_size=100)
    decoders = [Sequence(f"d{i}", [i + 1], SamplingParams(max_tokens=20, ignore_eos=True)) for i in range(3)]
    for s in decoders:
        sched.add(s)
    batch = sched.schedule()
    sched.update(batch, runner.step(batch))
    long = Sequence("long", list(range(20)), SamplingParams(max_tokens=1, ignore_eos=True))
    sched.add(long)
    batch = sched.schedule()
    assert [e.num_new_tokens for e in batch.entries] == [1, 1, 1, 5]
    assert batch.num_tokens == 8 and batch.sample_indices == [0, 1, 2]
    sched.update(batch, runner.step(batch))


def test_without_chunked_prefill_prompt_runs_whole_and_waits_for_budget():
    sched, runner = make(num_blocks=64, max_num_seqs=4, max_num_batched_tokens=20, max_model_len=20,
                         chunked_prefill=False)
    a = Sequence("a", [1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True))
    a2 = Sequence("a2", [4], SamplingParams(max_tokens=3, ignore_eos=True))
    sched.add(a)
    sched.add(a2)
    batch = sched.schedule()
    sched.update(batch, runner.step(batch))
    big = Sequence("big", list(range(1, 20)), SamplingParams(max_tokens=1, ignore_eos=True))  # 19 + 2 decodes > 20
    sched.add(big)
    batch = sched.schedule()
    assert [e.seq.request_id for e in batch.entries] == ["a", "a2"]  # big must not be split
    sched.update(batch, runner.step(batch))
    batches = run_to_completion(sched, runner)
    assert max(b.num_tokens for b in batches) == 20  # big ran whole, next to the last decode of a
    assert_reference_outputs(sched, [a, a2, big])


def test_max_num_seqs_and_slots_limit_running():
    sched, runner = make(num_blocks=64, num_slots=2, max_num_seqs=3, max_num_batched_tokens=64, max_model_len=64)
    seqs = submit(sched, [([1, 2], 5), ([3, 4], 5), ([5, 6], 5)], ignore_eos=True)
    batch = sched.schedule()
    assert len(batch) == 2 and sched.num_waiting == 1  # only 2 state slots
    sched.update(batch, runner.step(batch))
    run_to_completion(sched, runner)
    assert_reference_outputs(sched, seqs)


def test_preempted_sequence_goes_to_front_and_recomputes_prompt_plus_output():
    # 4 blocks of 2 tokens; two sequences of 3 prompt tokens, growing, cannot both stay.
    sched, runner = make(num_blocks=4, block_size=2, num_slots=2, max_num_seqs=2, max_num_batched_tokens=8,
                         max_model_len=8)
    old = Sequence("old", [1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True))
    new = Sequence("new", [4, 5, 6], SamplingParams(max_tokens=5, ignore_eos=True))
    tail = Sequence("tail", [9], SamplingParams(max_tokens=1, ignore_eos=True))
    for s in (old, new, tail):
        sched.add(s)
    victim_seen = False
    while sched.has_unfinished():
        batch = sched.schedule()
        if new.status is SequenceStatus.PREEMPTED and not victim_seen:
            victim_seen = True
            assert old.status is SequenceStatus.RUNNING  # the oldest is never the victim while others run
            assert sched.waiting[0] is new and new.num_output_tokens > 0 and new.num_computed_tokens == 0
            assert new.slot is None and new.block_table == []
        sched.update(batch, runner.step(batch))
    assert victim_seen
    assert_reference_outputs(sched, [old, new, tail])
    assert_pool_full(sched)


# ---- finishing ---------------------------------------------------------------------------------------------------


def test_abort_mid_prefill_frees_immediately():
    sched, runner = make(num_blocks=64, max_num_batched_tokens=8, max_model_len=64, prefill_chunk_size=4)
    long = Sequence("long", list(range(1, 30)), SamplingParams(max_tokens=4))
    waiting = Sequence("waiting", [1], SamplingParams(max_tokens=4))
    sched.add(long)
    batch = sched.schedule()
    sched.update(batch, runner.step(batch))
    assert long.status is SequenceStatus.RUNNING and long.is_prefilling and long.block_table
    sched.add(waiting)
    assert sched.abort("long") is long
    assert long.finish_reason is FinishReason.ABORT and long.block_table == [] and long.slot is None
    assert sched.abort("waiting") is waiting and waiting.finish_reason is FinishReason.ABORT
    assert sched.abort("long") is None and sched.abort("nope") is None
    assert sched.schedule() is None
    assert_pool_full(sched)


def test_abort_between_schedule_and_update_is_skipped():
    sched, runner = make()
    a = Sequence("a", [1, 2], SamplingParams(max_tokens=5, ignore_eos=True))
    b = Sequence("b", [3, 4], SamplingParams(max_tokens=5, ignore_eos=True))
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    sampled = runner.step(batch)
    sched.abort("a")
    assert sched.update(batch, sampled) == []
    assert a.output_token_ids == [] and b.num_output_tokens == 1
    run_to_completion(sched, runner)
    assert_reference_outputs(sched, [b])
    assert_pool_full(sched)


def test_finish_from_outside_with_stop():
    sched, runner = make()
    a = Sequence("a", [1, 2], SamplingParams(max_tokens=50, ignore_eos=True))
    sched.add(a)
    for _ in range(3):
        batch = sched.schedule()
        sched.update(batch, runner.step(batch))
    sched.finish(a, "stop")  # e.g. the detokenizer saw a stop string
    assert a.finish_reason is FinishReason.STOP and a.num_output_tokens == 3
    sched.finish(a, "abort")  # no-op once finished
    assert a.finish_reason is FinishReason.STOP
    assert_pool_full(sched)


def test_update_finish_reasons():
    sched, _ = make(max_model_len=10, max_num_seqs=8)
    seqs = {
        "eos": Sequence("eos", [1], SamplingParams(max_tokens=5)),
        "ignore": Sequence("ignore", [1], SamplingParams(max_tokens=5, ignore_eos=True)),
        "stop_id": Sequence("stop_id", [1], SamplingParams(max_tokens=5, ignore_eos=True, stop_token_ids=[9])),
        "max_tokens": Sequence("max_tokens", [1], SamplingParams(max_tokens=1)),
        "model_len": Sequence("model_len", list(range(1, 9)), SamplingParams(max_tokens=2)),
    }
    for s in seqs.values():
        sched.add(s)
    batch = sched.schedule()
    tokens = {"eos": EOS, "ignore": EOS, "stop_id": 9, "max_tokens": 3, "model_len": 3}
    finished = sched.update(batch, [tokens[s.request_id] for s in batch.sampled_seqs])
    assert {s.request_id for s in finished} == {"eos", "stop_id", "max_tokens"}
    assert seqs["eos"].finish_reason is FinishReason.STOP and seqs["stop_id"].finish_reason is FinishReason.STOP
    assert seqs["max_tokens"].finish_reason is FinishReason.LENGTH
    batch = sched.schedule()
    finished = sched.update(batch, [3] * len(batch.sample_indices))
    assert [s.request_id for s in finished] == ["model_len"]  # 8 + 2 = max_model_len
    assert seqs["model_len"].finish_reason is FinishReason.LENGTH
    assert seqs["ignore"].status is SequenceStatus.RUNNING and seqs["ignore"].output_token_ids == [EOS, 3]


def test_update_checks_token_count():
    sched, _ = make()
    sched.add(Sequence("a", [1, 2], SamplingParams()))
    batch = sched.schedule()
    with pytest.raises(ValueError, match="expected 1 sampled"):
        sched.update(batch, [])


# ---- rejection and config ----------------------------------------------------------------------------------------


def test_add_rejects_requests_that_can_never_fit():
    sched, _ = make(num_blocks=4, block_size=4, max_num_batched_tokens=64, max_model_len=32)
    with pytest.raises(ValueError) as err:
        sched.add(Sequence("long", list(range(20)), SamplingParams(max_tokens=13)))
    assert "20" in str(err.value) and "13" in str(err.value) and "33" in str(err.value) and "32" in str(err.value)
    with pytest.raises(ValueError) as err:
        sched.add(Sequence("big", list(range(10)), SamplingParams(max_tokens=8)))  # 17 cached tokens: 5 blocks
    assert "5 KV blocks" in str(err.value) and "only has 4" in str(err.value)
    sched.add(Sequence("ok", list(range(10)), SamplingParams(max_tokens=7)))  # 16 cached tokens: 4 blocks
    with pytest.raises(ValueError, match="already queued"):
        sched.add(Sequence("ok", [1], SamplingParams()))
    assert sched.num_waiting == 1
    with pytest.raises(ValueError, match="prompt_token_ids"):
        Sequence("empty", [], SamplingParams())


def greedy_requests(sched: Scheduler, reqs, ignore_eos=False) -> list[Sequence]:
    seqs = [Sequence(f"r{i}", p, SamplingParams(temperature=0, max_tokens=m, ignore_eos=ignore_eos))
            for i, (p, m) in enumerate(reqs)]
    for s in seqs:
        sched.add(s)
    return seqs


@pytest.mark.parametrize("num_blocks", [64, 12])
def test_multi_step_runs_match_reference(num_blocks):
    """num_scheduler_steps=8 with a measured step time that allows it: greedy requests (EOS ends some inside a run)
    arriving while others decode, in a roomy pool and in one small enough to preempt: the reference outputs; runs of
    several steps happen only when every entry decodes and nothing waits, and never pass max_tokens."""
    sched, runner = make(num_blocks=num_blocks, num_scheduler_steps=8, max_model_len=48)
    sched.record_decode_step(0.001)
    reqs = random_requests(12, seed=3, max_out=30)
    seqs = greedy_requests(sched, reqs[:6])
    runs = []

    def check(batch):
        if batch.num_steps > 1:
            assert not sched.waiting and all(e.num_new_tokens == 1 and e.needs_sample for e in batch.entries)
            assert all(batch.num_steps <= e.seq.params.max_tokens - e.seq.num_output_tokens for e in batch.entries)
        runs.append(batch.num_steps)

    for step in range(10_000):
        if step == 5:
            seqs += [Sequence(f"late{i}", p, SamplingParams(temperature=0, max_tokens=m))
                     for i, (p, m) in enumerate(reqs[6:])]
            for s in seqs[6:]:
                sched.add(s)
        batch = sched.schedule()
        check_invariants(sched, batch)
        if batch is None:
            break
        check(batch)
        sched.update(batch, runner.step(batch))
        check_invariants(sched, None)
    assert_reference_outputs(sched, seqs)
    assert_pool_full(sched)
    assert max(runs) == 8
    if num_blocks == 12:
        assert sched.num_preemptions > 0


def test_multi_step_only_where_it_is_exact_and_timely():
    """One step per schedule before any step was timed, with a sampled sequence in the batch, while a request
    waits, and with num_scheduler_steps 1; runs as long as multi_step_seconds / the step time allows, at most
    the tokens left before max_tokens, with the blocks for all of them allocated."""
    sched, runner = make(num_blocks=64, num_scheduler_steps=8, max_num_seqs=2)
    a, b = greedy_requests(sched, [([1, 2, 3], 30), ([4, 5], 5)], ignore_eos=True)

    def step():
        batch = sched.schedule()
        sched.update(batch, runner.step(batch))
        return batch

    assert step().num_steps == 1  # the prompts
    assert step().num_steps == 1  # no step time measured yet
    sched.record_decode_step(0.005)
    batch = step()
    assert batch.num_steps == 3  # b had 3 tokens left
    assert all(len(t) * 4 >= c + 3 for t, c in zip(batch.block_tables, batch.context_lens))  # blocks for the run
    assert b.is_finished and a.num_output_tokens == 5
    assert step().num_steps == 4  # 0.02 s at 0.005 s a step
    sched.record_decode_step(0.05)
    sched.record_decode_step(0.05)
    assert step().num_steps == 1  # now too slow for two steps within 0.02 s
    sched.seconds_per_decode_step = 0.001
    c = Sequence("c", [7, 8], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    d = Sequence("d", [9], SamplingParams(temperature=0.7, max_tokens=40, ignore_eos=True))
    sched.add(c)
    sched.add(d)
    assert step().num_steps == 1  # c admitted, d waits (max_num_seqs 2)
    assert step().num_steps == 1  # d still waits
    while not c.is_finished:
        step()
    step()  # d's prompt
    assert d.status is SequenceStatus.RUNNING and step().num_steps == 1  # d samples
    single, _ = make(num_scheduler_steps=1)
    single.record_decode_step(0.001)
    (e,) = greedy_requests(single, [([1, 2], 9)])
    assert single.schedule().num_steps == 1


def test_scheduler_config_validation():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4)
    with pytest.raises(ValueError, match="max_model_len"):
        SchedulerConfig(max_num_batched_tokens=100, max_model_len=200, chunked_prefill=False)
    with pytest.raises(ValueError, match="prefill_chunk_size"):
        SchedulerConfig(prefill_chunk_size=0)
    with pytest.raises(ValueError, match="num_scheduler_steps"):
        SchedulerConfig(num_scheduler_steps=0)
    with pytest.raises(ValueError, match="multi_step_seconds"):
        SchedulerConfig(multi_step_seconds=0)
    SchedulerConfig(max_num_batched_tokens=100, max_model_len=200, chunked_prefill=True)


# ---- sequence ------------------------------------------------------------------------------------------------------


def test_sequence_token_slices_and_seeds():
    s = Sequence("s", [1, 2, 3], SamplingParams(seed=42))
    s.output_token_ids += [4, 5]
    full = s.all_token_ids
    for lo in range(6):
        for hi in range(lo, 6):
            assert s.token_ids_between(lo, hi) == full[lo:hi]
    assert s.last_token_id == 5 and s.num_tokens == 5
    # The seed depends on (seed, sample index, tokens generated so far) only.
    twin = Sequence("t", [9], SamplingParams(seed=42))
    twin.output_token_ids += [0, 0]
    assert twin.sampling_seed() == s.sampling_seed()
    seeds = set()
    for _ in range(5):
        twin.output_token_ids.append(0)
        seeds.add(twin.sampling_seed())
    assert len(seeds) == 5 and all(0 <= x < 2**63 for x in seeds)
    assert Sequence("u", [1], SamplingParams(seed=42), sample_index=1).sampling_seed() != \
        Sequence("u", [1], SamplingParams(seed=42), sample_index=0).sampling_seed()
    assert Sequence("v", [1], SamplingParams(seed=-5)).sampling_seed() is not None
    assert Sequence("w", [1], SamplingParams()).sampling_seed() is None


def test_slot_ops_zero_each_new_or_reused_slot_exactly_once():
    """Every step's slot operations: one ZeroSlots listing exactly the entries that got a slot this step (first
    admission and re-admission after preemption alike); nothing for sequences continuing in their slot."""
    sched, runner = make(num_blocks=6, block_size=4, num_slots=2, max_num_batched_tokens=16, max_model_len=20)
    seqs = [Sequence(f"s{i}", list(range(1, 6 + i)), SamplingParams(max_tokens=8, ignore_eos=True)) for i in range(4)]
    for s in seqs:
        sched.add(s)
    zeroed_per_seq = {s.request_id: 0 for s in seqs}
    while sched.has_unfinished():
        batch = sched.schedule()
        fresh = [e for e in batch.entries if e.is_fresh_slot]
        assert batch.slot_ops == ([ZeroSlots(tuple(e.seq.slot for e in fresh))] if fresh else [])
        for e in fresh:
            zeroed_per_seq[e.seq.request_id] += 1
        sched.update(batch, runner.step(batch))
    for s in seqs:
        assert zeroed_per_seq[s.request_id] == 1 + s.num_preemptions
        assert s.output_token_ids == reference_generate(s.prompt_token_ids, s.params, 20)[0]
    assert sched.num_preemptions > 0  # the pool is small enough that the re-admission path ran


def test_copy_slot_op_snapshots_and_restores_a_state():
    """CopySlot through the store interface: a snapshot slot keeps a sequence's state; restoring it rewinds."""
    _, runner = make(num_slots=4)
    ZeroSlots((0, 3)).apply(runner)
    runner.state[0] = chain(chain(0, 5), 6)
    CopySlot(0, 3).apply(runner)  # save
    runner.state[0] = chain(runner.state[0], 9)
    assert runner.state[3] == chain(chain(0, 5), 6) != runner.state[0]
    CopySlot(3, 0).apply(runner)  # restore
    assert runner.state[0] == runner.state[3]
