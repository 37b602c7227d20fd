"""Hybrid prefix caching: KV blocks shared by content digest plus DeltaNet state snapshots, exact.

Every engine test runs the same requests with caching on and off and asserts token-identical outputs, and asserts
where the cached run resumed (`num_cached_tokens`), so a cache that silently never hits fails too.
"""

from __future__ import annotations

import random

import pytest
import torch
from test_engine_llm import model, model_dir, prompts_of, tokenizer

from qwen3next import kernels
from qwen3next.engine.block_manager import BlockManager
from qwen3next.engine.llm import Engine
from qwen3next.engine.memory import CacheGeometry, plan_cache
from qwen3next.engine.prefix_cache import ROOT, SnapshotPolicy, block_digest, default_snapshot_interval
from qwen3next.engine.sampling import SamplingParams
from qwen3next.engine.scheduler import Scheduler, SchedulerConfig
from qwen3next.engine.sequence import Sequence
from qwen3next.engine.speculative import DraftLengthPolicy
from qwen3next.model.batch import BatchInfo
from qwen3next.model.cache import HybridCache
from tiny_models import make_model

SHARED_FIXTURES = (model, model_dir, tokenizer)  # test_engine_llm's tiny model with a byte-level tokenizer
IM_END = 258  # the byte tokenizer's <|im_end|>
BS = 16
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def tokens(n: int, seed: int) -> list[int]:
    return prompts_of([n], seed)[0]


def engine(m, tok, on: bool, **kw) -> Engine:
    opts = dict(max_memory="64MiB", max_num_seqs=4, max_num_batched_tokens=256, max_model_len=400, block_size=BS,
                prefill_chunk_size=64)
    opts.update(kw)
    return Engine(m, tokenizer=tok, enable_prefix_caching=on, **opts)


def run(eng: Engine, prompts, params=GREEDY):
    """One request at a time (each sees what the earlier ones cached): (token ids, num_cached_tokens) per request."""
    out = []
    for p in prompts:
        req = eng.add_request(p, params)
        while eng.step():
            pass
        o = req.output()
        out.append(([c.token_ids for c in o.outputs], o.num_cached_tokens))
    return out


def both(m, tok, prompts, params=GREEDY, **kw):
    on, off = engine(m, tok, True, **kw), engine(m, tok, False, **kw)
    got, want = run(on, prompts, params), run(off, prompts, params)
    assert [g[0] for g in got] == [w[0] for w in want]
    assert all(w[1] == 0 for w in want)
    return [g[1] for g in got], on


# ---- where a request resumes ------------------------------------------------------------------------------------
def test_hit_at_a_block_boundary_inside_a_block_and_between_snapshots(model, tokenizer):
    a = tokens(70, 1)
    prompts = [a,
               a[:32] + tokens(20, 2),  # the interval snapshot at 32: a block boundary, every block shared
               a[:40] + tokens(20, 3),  # snapshots at 32 and 48: resumes from the earlier one, recomputes 32..40
               a + tokens(9, 4),  # a's prompt-end snapshot at 69: inside block 4, its 5 rows copied
               a]  # the same prompt: resumes one token before its end
    cached, eng = both(model, tokenizer, prompts, prefix_snapshot_interval=16)
    assert cached == [0, 32, 32, 69, 69]
    assert eng.block_manager.hits == 32 + 32 + 69 + 69


def test_hit_after_a_chat_turn_boundary(model, tokenizer):
    system = tokens(37, 5) + [IM_END]  # a system prompt ending in <|im_end|>: a snapshot after it (at 38)
    prompts = [system + tokens(30, 6), system + tokens(25, 7), system + tokens(12, 8)]
    cached, _ = both(model, tokenizer, prompts, prefix_snapshot_interval=0)
    assert cached == [0, 38, 38]


def test_next_turn_resumes_at_the_end_of_the_previous_reply(model, tokenizer):
    """The finished sequence's slot becomes a snapshot of prompt + reply (all but the last sampled token)."""
    on, off = engine(model, tokenizer, True), engine(model, tokenizer, False)
    history, prev_fed = tokens(50, 9), 0
    for turn in range(3):
        r_on, r_off = (e.add_request(history, GREEDY) for e in (on, off))
        while on.step() | off.step():
            pass
        reply = r_on.output().token_ids
        assert reply == r_off.output().token_ids
        if turn:
            assert r_on.output().num_cached_tokens == prev_fed
        prev_fed = len(history) + len(reply) - 1
        history = history + reply + tokens(20, 10 + turn)


def test_a_prefix_of_200_tokens_hits(model, tokenizer):
    """Shorter than any block size vLLM's hybrid caching supports (528+)."""
    shared = tokens(199, 11) + [IM_END]
    cached, _ = both(model, tokenizer, [shared + tokens(40, 12), shared + tokens(33, 13)])
    assert cached == [0, 200]


def test_prompt_logprobs_requests_compute_the_whole_prompt(model, tokenizer):
    a = tokens(60, 14)
    params = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=2)
    on, off = engine(model, tokenizer, True), engine(model, tokenizer, False)
    run(on, [a], GREEDY)
    r_on, r_off = on.add_request(a + tokens(5, 15), params), off.add_request(a + tokens(5, 15), params)
    while on.step() | off.step():
        pass
    assert r_on.output().num_cached_tokens == 0
    assert r_on.output().prompt_logprobs == r_off.output().prompt_logprobs
    assert r_on.output().token_ids == r_off.output().token_ids


# ---- concurrency, memory pressure, preemption, n > 1, speculative decoding -------------------------------------
def test_requests_sharing_a_prefix_while_it_runs(model, tokenizer):
    shared = tokens(80, 16) + [IM_END]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outs = {}
    for on in (True, False):
        eng = engine(model, tokenizer, on)
        first = eng.add_request(shared + tokens(10, 17), params)
        for _ in range(4):  # its prompt is in (two chunks of 64), it decodes
            eng.step()
        later = [eng.add_request(shared + tokens(n, 18 + n), params) for n in (5, 30)]
        while eng.step():
            pass
        outs[on] = [r.output() for r in (first, *later)]
    assert [o.token_ids for o in outs[True]] == [o.token_ids for o in outs[False]]
    assert [o.num_cached_tokens for o in outs[True]] == [0, 81, 81]


def test_eviction_under_memory_pressure_keeps_outputs(model, tokenizer):
    kv_token = model.config.kv_bytes_per_token(4)
    state = model.config.state_bytes_per_sequence(4, 4)
    # 2 sequence slots, 3 snapshot slots, 40 blocks of 16: a few prompts fill it
    kw = dict(max_memory=5 * state + 40 * BS * kv_token, max_num_seqs=2, prefix_snapshot_slots=3,
              max_model_len=300)
    firsts = [tokens(90, 30 + i) for i in range(5)]
    prompts = firsts + [firsts[i] + tokens(7, 40 + i) for i in reversed(range(5))]
    cached, eng = both(model, tokenizer, prompts, **kw)
    bm = eng.block_manager
    assert bm.evicted_blocks > 0 and bm.evicted_snapshots > 0
    # the latest prompt is still cached; three snapshot slots cannot keep the earlier ones
    assert cached[:6] == [0] * 5 + [89] and 0 in cached[6:]
    assert bm.num_free_blocks == bm.num_blocks and bm.num_free_slots == bm.num_slots


def test_preempting_a_sequence_that_holds_shared_blocks(model, tokenizer):
    kv_token = model.config.kv_bytes_per_token(4)
    state = model.config.state_bytes_per_sequence(4, 4)
    shared = tokens(47, 50) + [IM_END]
    prompts = [shared + tokens(12, 51 + i) for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    outs = {}
    for on in (True, False):
        # room for two sequences' KV (14 blocks) in both settings: the third forces preemptions
        eng = engine(model, tokenizer, on, max_memory=(7 if on else 3) * state + 14 * BS * kv_token, max_num_seqs=3,
                     prefix_snapshot_slots=4 if on else None, max_model_len=112)
        assert eng.plan.num_blocks == 14
        warm = eng.add_request(shared + tokens(3, 55), SamplingParams(temperature=0, max_tokens=1))
        while eng.step():
            pass
        reqs = [eng.add_request(p, params) for p in prompts]
        while eng.step():
            pass
        assert eng.scheduler.num_preemptions > 0
        outs[on] = [r.output() for r in (warm, *reqs)]
        assert eng.block_manager.num_free_blocks == eng.plan.num_blocks
    assert [o.token_ids for o in outs[True]] == [o.token_ids for o in outs[False]]
    assert all(o.num_cached_tokens == 48 for o in outs[True][1:])


def test_n_samples_and_seeded_sampling(model, tokenizer):
    a = tokens(45, 60) + [IM_END]
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=7, n=3, ignore_eos=True)
    cached, _ = both(model, tokenizer, [a + tokens(9, 61), a + tokens(20, 62)], params)
    assert cached == [0, 46]


def test_with_speculative_decoding(model, tokenizer):
    a = tokens(60, 70) + [IM_END]
    prompts = [a + tokens(8, 71), a + tokens(30, 72), a + tokens(8, 71)]
    cached, eng = both(model, tokenizer, prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                       speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    assert cached == [0, 61, 68]
    assert eng.spec_stats.num_drafts > 0


def test_resumed_state_equals_a_fresh_run(model, tokenizer):
    """After a cached-prefix resume and the rest of the prompt, every DeltaNet pool of the sequence's slot (and its
    K/V rows) equals a run without the cache, to fp32 rounding."""
    a = tokens(75, 80) + [IM_END]
    b = a + tokens(40, 81)
    states = {}
    for on in (True, False):
        eng = engine(model, tokenizer, on)
        run(eng, [a])
        req = eng.add_request(b, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
        seq = req.samples[0].seq
        while seq.num_computed_tokens < len(b):
            eng.step()
        assert seq.num_cached_tokens == (76 if on else 0)
        cache = eng.runner.cache
        kv_rows = [seq.block_table[p // BS] * BS + p % BS for p in range(len(b))]
        states[on] = ({(k, n): pool[seq.slot].clone() for k, pools in cache.state.items() for n, pool in pools.items()},
                      {k: pool[kv_rows].clone() for k, pool in cache.k.items()})
    for key, want in states[False][0].items():
        torch.testing.assert_close(states[True][0][key], want, rtol=1e-5, atol=1e-5)
    for key, want in states[False][1].items():
        torch.testing.assert_close(states[True][1][key], want, rtol=1e-5, atol=1e-5)


def test_options_are_checked(model, tokenizer):
    with pytest.raises(ValueError, match="prefix_snapshot_interval"):
        engine(model, tokenizer, True, prefix_snapshot_interval=20)
    with pytest.raises(ValueError, match="prefix_snapshot_slots"):
        engine(model, tokenizer, True, prefix_snapshot_slots=-1)
    off = engine(model, tokenizer, False)
    assert off.plan.num_snapshot_slots == 0 and not off.enable_prefix_caching
    on = engine(model, tokenizer, True, prefix_snapshot_slots=5)
    assert on.plan.num_snapshot_slots == 5 and on.plan.num_slots == on.plan.num_seq_slots + 5


# ---- the model stores snapshots inside a chunk ------------------------------------------------------------------
@pytest.mark.parametrize("native", [True, False])
def test_snapshots_inside_a_forward_equal_runs_over_the_prefix(native):
    if native and not kernels.available():
        pytest.skip(f"native kernels unavailable: {kernels.load_error()}")
    tiny = make_model("base")
    V = tiny.config.vocab_size
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, V, (n,), generator=g).tolist() for n in (20, 13)]
    snaps = [(0, 5, 4), (0, 12, 5), (0, 20, 7), (1, 13, 6), (1, 3, 3), (1, 4, 2), (0, 1, 8), (1, 2, 9)]  # m < W-1 too

    def forward(cache, batch, slots, tables, snapshots=None):
        info = BatchInfo([len(s) for s in batch], [0] * len(batch), slots, tables, snapshots=snapshots)
        ids = torch.tensor([t for s in batch for t in s])
        return tiny.hidden_states(ids, tiny.context(info, cache))

    previous = kernels.set_enabled(native)
    try:
        cache = HybridCache(tiny.config, 10, 8, 8, layout=tiny.cache_layout())
        hidden = forward(cache, seqs, [0, 1], [[0, 1, 2], [3, 4]], snaps)
        plain = []
        for s in seqs:
            alone = HybridCache(tiny.config, 1, 3, 8, layout=tiny.cache_layout())
            plain.append(forward(alone, [s], [0], [[0, 1, 2]]))
        torch.testing.assert_close(hidden, torch.cat(plain), rtol=1e-5, atol=1e-5)  # outputs: as without snapshots
        for b, m, slot in snaps:
            alone = HybridCache(tiny.config, 1, 3, 8, layout=tiny.cache_layout())
            forward(alone, [seqs[b][:m]], [0], [[0, 1, 2]])
            for key, pools in cache.state.items():
                for name, pool in pools.items():
                    torch.testing.assert_close(pool[slot], alone.state[key][name][0], rtol=1e-5, atol=1e-5)
    finally:
        kernels.set_enabled(previous)


def test_snapshot_requests_are_checked():
    tiny = make_model("base")
    cache = HybridCache(tiny.config, 4, 4, 8, layout=tiny.cache_layout())
    for bad in ([(0, 0, 2)], [(0, 6, 2)], [(1, 1, 2)], [(0, 2, 0)]):
        with pytest.raises(ValueError, match="snapshots"):
            tiny.context(BatchInfo([5], [0], [0], [[0]], snapshots=bad), cache)


# ---- the block manager's bookkeeping ----------------------------------------------------------------------------
def seq_of(ids, name="s"):
    return Sequence(name, ids, SamplingParams(max_tokens=4))


def feed(bm: BlockManager, seq: Sequence, n: int, snapshot_at: int | None = None):
    """What the scheduler and a forward do for `seq`: allocate, compute n tokens, index them."""
    bm.allocate(seq, n)
    slot = bm.take_snapshot_slot() if snapshot_at is not None else None
    seq.num_computed_tokens += n
    bm.register_blocks(seq)
    if slot is not None:
        bm.add_snapshot(seq, snapshot_at, slot)
    bm.end_step()


def test_digests_name_the_whole_prefix():
    a, b = list(range(4)), list(range(4, 8))
    assert block_digest(ROOT, a) != block_digest(ROOT, b)
    assert block_digest(block_digest(ROOT, a), b) != block_digest(block_digest(ROOT, b), b)
    assert block_digest(ROOT, [1, 2]) != block_digest(ROOT, [2, 1])


def test_finished_blocks_are_shared_by_reference_and_evicted_last_block_first():
    bm = BlockManager(num_blocks=6, block_size=4, num_slots=3, enable_prefix_caching=True)
    a = seq_of(list(range(10)), "a")
    feed(bm, a, 10)
    table = list(a.block_table)
    bm.free(a)  # two full blocks cached, the partial one pinned by a's end-of-sequence snapshot
    assert bm.num_cached_blocks == 2 and bm.num_snapshots == 1
    assert [bm.ref_count(x) for x in table] == [0, 0, 1]
    b = seq_of(list(range(10)) + [99, 98], "b")
    hit = bm.lookup(b)
    assert hit is not None and hit.position == 10 and hit.blocks == tuple(table[:2])
    bm.allocate_hit(b, hit, 2)
    assert b.block_table[:2] == table[:2] and b.block_table[2] != table[2]
    assert [bm.ref_count(x) for x in table] == [1, 1, 1]
    bm.end_step()
    bm.free(b)
    # evictable blocks are reclaimed before snapshots, tail first
    c = seq_of(list(range(50, 74)), "c")
    assert bm.num_free_blocks == 6
    assert bm.can_allocate(c, 24)  # 3 free + 2 evictable + the pinned partial block (its snapshot can go)
    bm.allocate(c, 24)
    assert bm.evicted_blocks >= 2 and bm.evicted_snapshots >= 1
    assert bm.lookup(seq_of(list(range(12)), "d")) is None


def test_lookup_takes_the_longest_prefix_with_blocks_and_a_snapshot():
    bm = BlockManager(num_blocks=20, block_size=4, num_slots=6, enable_prefix_caching=True)
    ids = list(range(100, 123))
    a = seq_of(ids, "a")
    feed(bm, a, 9, snapshot_at=5)
    feed(bm, a, 9, snapshot_at=16)
    assert bm.num_snapshots == 2
    probe = lambda t: bm.lookup(seq_of(t, "q"))  # noqa: E731
    assert probe(ids[:4] + [0, 0]) is None  # no snapshot at or before 4 tokens... of this content
    assert probe(ids[:6] + [0]).position == 5
    assert probe(ids[:16] + [0]).position == 16
    assert probe(ids[:17]).position == 16  # at least one token is left to feed
    assert probe(ids[:16]).position == 5
    assert probe([0] + ids[1:17] + [1]) is None  # a different first token changes every digest


def test_random_traffic_keeps_reference_counts_and_memory_consistent():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=30, block_size=4, num_slots=6, enable_prefix_caching=True)
    stems = [[rng.randrange(5) for _ in range(12)] for _ in range(3)]
    live: list[Sequence] = []
    for step in range(1500):
        if live and rng.random() < 0.35:
            bm.free(live.pop(rng.randrange(len(live))))
        elif live and rng.random() < 0.5:
            seq = rng.choice(live)
            n = rng.randint(1, 6)
            if seq.num_computed_tokens + n <= seq.num_tokens and bm.can_allocate(seq, n):
                feed(bm, seq, n, rng.choice([None, seq.num_computed_tokens + n, seq.num_computed_tokens + 1]))
        elif len(live) < 4:
            seq = seq_of(rng.choice(stems)[:rng.randint(2, 12)] + [rng.randrange(5) for _ in range(10)], f"s{step}")
            hit = bm.lookup(seq)
            n = min(seq.num_tokens - (hit.position if hit else 0), rng.randint(1, 8))
            if bm.can_allocate(seq, n, hit):
                if hit is not None:
                    assert seq.token_ids_between(0, hit.position) == seq.all_token_ids[:hit.position]
                    bm.allocate_hit(seq, hit, n)
                    seq.num_computed_tokens += n
                    bm.register_blocks(seq)
                    bm.end_step()
                else:
                    feed(bm, seq, n)
                live.append(seq)
        # every reference is accounted for: sequences' tables + snapshots' partial blocks
        refs = [0] * bm.num_blocks
        for s in live:
            for x in s.block_table:
                refs[x] += 1
        for snap in bm._snapshots.values():
            if snap.block is not None:
                refs[snap.block] += 1
        assert refs == [bm.ref_count(x) for x in range(bm.num_blocks)]
        pinned_only = {snap.block for snap in bm._snapshots.values() if snap.block is not None} - {
            x for s in live for x in s.block_table}
        used = sum(1 for r in refs if r)
        assert used - len(pinned_only) + bm.num_free_blocks == bm.num_blocks
        slots = [s.slot for s in live] + [snap.slot for snap in bm._snapshots.values()]
        assert len(slots) == len(set(slots)) and len(slots) + len(bm._free_slots) == bm.num_slots
    for s in live:
        bm.free(s)
    assert bm.num_free_blocks == bm.num_blocks and bm.num_free_slots == bm.num_slots


def test_snapshot_policy_positions():
    policy = SnapshotPolicy(interval=32, boundary_token_ids=(9,), max_per_chunk=3)
    ids = [1] * 100
    ids[40] = ids[70] = 9
    assert policy.positions(ids[0:64], 0, 64, prompt_len=100) == [32, 41, 64]
    assert policy.positions(ids[64:100], 64, 100, prompt_len=100) == [71, 96, 99]
    assert policy.positions(ids[64:98], 64, 98, prompt_len=100) == [71, 96]
    assert SnapshotPolicy(max_per_chunk=0).positions(ids, 0, 100, 100) == []
    # at least a chunk, at least one snapshot's worth of KV, at most a quarter of the slots per full-length prompt
    assert default_snapshot_interval(64, 512, 2048, 430080, 8192, 64) == 512
    assert default_snapshot_interval(64, 512, 24576, 77266944, 262144, 27) == 38848


# ---- speculative runs, tight memory ------------------------------------------------------------------------------
def spec_scheduler(num_slots=8):
    bm = BlockManager(num_blocks=64, block_size=4, num_slots=num_slots, enable_prefix_caching=True)
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64, prefill_chunk_size=64)
    return Scheduler(config, bm, DraftLengthPolicy(2, adaptive=False)), bm


def test_blocks_filled_by_accepted_drafts_get_the_digest_of_their_tokens():
    sched, bm = spec_scheduler()
    x = Sequence("x", list(range(100, 114)), SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    sched.add(x)
    sched.update(sched.schedule(), [7])  # 14 computed, 15 tokens
    x.draft_token_ids = [8, 9]
    sched.update(sched.schedule(), [[8, 9, 10]])  # both drafts accepted: 17 computed, 18 tokens
    assert x.num_computed_tokens == 17 and bm.num_cached_blocks == 4
    want = ROOT
    for i in range(4):
        want = block_digest(want, x.all_token_ids[4 * i:4 * i + 4])
    assert x.block_hashes[3] == want and bm._cached[want] == x.block_table[3]


def test_a_stop_token_accepted_before_more_drafts_leaves_no_snapshot_past_the_known_tokens():
    """The verification fed (and committed the state of) a draft after the stop token, which the output drops: the
    sequence's state is then of no known token sequence and must not become a snapshot."""
    sched, bm = spec_scheduler()
    x = Sequence("x", list(range(100, 112)), SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[5]))
    sched.add(x)
    sched.update(sched.schedule(), [7])
    x.draft_token_ids = [5, 9]
    sched.update(sched.schedule(), [[5, 9, 10]])
    assert x.is_finished and x.num_computed_tokens == x.num_tokens + 1
    assert all(s.position <= 11 for s in bm._snapshots.values())  # only the prompt-end snapshot
    y = Sequence("y", x.all_token_ids + [42, 43], SamplingParams(max_tokens=2))
    assert bm.lookup(y).position == 11


def test_one_slot_adopts_the_snapshot_and_a_hit_that_does_not_fit_starts_over(model, tokenizer):
    state = model.config.state_bytes_per_sequence(4, 4)
    kv_token = model.config.kv_bytes_per_token(4)
    a = tokens(40, 90)
    # one slot: the next turn's only slot holds the previous reply's snapshot, which it takes over
    one = engine(model, tokenizer, True, max_num_seqs=1, max_memory=state + 20 * BS * kv_token, max_model_len=300)
    assert one.plan.num_slots == 1
    first = run(one, [a])[0][0][0]
    assert run(one, [a + first + tokens(5, 91)])[0][1] == len(a) + len(first) - 1
    # a prompt needing the whole pool twice: the hit inside a block would need one block more; it starts over
    b = tokens(100, 92)
    full = engine(model, tokenizer, True, max_num_seqs=1, max_memory=3 * state + 7 * BS * kv_token,
                  max_model_len=112, prefix_snapshot_slots=2)
    assert full.plan.num_blocks == 7
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    got = [o[0] for o in run(full, [b, b], params)]
    assert got[0] == got[1]


def test_snapshot_slots_never_take_sequence_slots():
    g = CacheGeometry(kv_bytes_per_token=256, state_bytes_per_slot=9600, block_size=64)
    without = plan_cache(g, 183040, max_num_seqs=2, max_model_len=300)
    asked = plan_cache(g, 183040, max_num_seqs=2, max_model_len=300, snapshot_slots=10)
    assert asked.num_seq_slots == without.num_slots == 2 and 0 < asked.num_snapshot_slots < 10
    assert asked.num_full_length_seqs >= 1 and asked.total_bytes <= 183040
