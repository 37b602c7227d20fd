import random

import pytest

from qwen3next.engine.block_manager import BlockManager
from qwen3next.engine.memory import CacheGeometry, plan_cache
from qwen3next.engine.sequence import Sequence

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30


def make_seq(i: int, prompt_len: int = 5) -> Sequence:
    return Sequence(f"r{i}", list(range(1, prompt_len + 1)))


# ---- planner ----------------------------------------------------------------------------------------------------


def test_plan_80b_like_geometry_is_slot_capped_and_within_budget():
    # 12 attention layers x 2 KiB per token; 36 DeltaNet layers of (48 KiB conv + 2 MiB fp32 state).
    geo = CacheGeometry(kv_bytes_per_token=24 * KIB, state_bytes_per_slot=36 * (48 * KIB + 2 * MIB), block_size=16)
    budget = 40 * GIB
    plan = plan_cache(geo, budget, max_num_seqs=256, max_model_len=32768)
    assert plan.num_slots == 256
    # Everything that is not state goes to whole KV blocks.
    left = budget - 256 * geo.state_bytes_per_slot
    assert plan.num_blocks == left // (16 * 24 * KIB)
    assert plan.total_bytes <= budget < plan.total_bytes + geo.block_bytes
    assert plan.state_bytes == 256 * 36 * (48 * KIB + 2 * MIB)
    assert plan.num_kv_tokens == plan.num_blocks * 16
    assert plan.num_full_length_seqs == plan.num_blocks // (32768 // 16)
    text = plan.describe()
    assert "256 slots" in text and f"{plan.num_blocks:,} blocks" in text and "32,768" in text


def test_plan_small_budget_limits_slots_but_keeps_one_full_length_sequence():
    geo = CacheGeometry(kv_bytes_per_token=100, state_bytes_per_slot=10_000, block_size=10)  # block = 1000 B
    # One 100-token sequence: 10 blocks (10,000 B) + one slot (10,000 B) = 20,000 B.
    plan = plan_cache(geo, budget_bytes=45_500, max_num_seqs=100, max_model_len=100)
    # n slots cost n*10,000 + (10 + n - 1)*1,000 <= 45,500  ->  n = 3.
    assert plan.num_slots == 3
    assert plan.num_blocks == (45_500 - 3 * 10_000) // 1000 == 15
    assert plan.num_full_length_seqs == 1
    assert plan.total_bytes <= 45_500


def test_plan_rejects_budget_below_one_sequence_and_names_numbers():
    geo = CacheGeometry(kv_bytes_per_token=100, state_bytes_per_slot=10_000, block_size=10)
    with pytest.raises(ValueError) as err:
        plan_cache(geo, budget_bytes=19_999, max_num_seqs=4, max_model_len=100)
    msg = str(err.value)
    assert "19,999" in msg and "20,000" in msg and "max_model_len=100" in msg
    assert plan_cache(geo, budget_bytes=20_000, max_num_seqs=4, max_model_len=100).num_slots == 1


def test_plan_without_state_or_without_kv():
    no_state = plan_cache(CacheGeometry(100, 0, 10), 100_000, max_num_seqs=8, max_model_len=100)
    assert no_state.num_slots == 8 and no_state.num_blocks == 100
    no_kv = plan_cache(CacheGeometry(0, 1000, 10), 5_500, max_num_seqs=8, max_model_len=100)
    assert no_kv.num_slots == 5 and no_kv.num_blocks == 5 * 10
    with pytest.raises(ValueError, match="block_size"):
        CacheGeometry(100, 100, 0)
    with pytest.raises(ValueError, match="max_num_seqs"):
        plan_cache(CacheGeometry(100, 100, 10), 10**9, max_num_seqs=0, max_model_len=10)


# ---- block manager -----------------------------------------------------------------------------------------------


def test_allocate_grows_block_table_and_assigns_slot_once():
    bm = BlockManager(num_blocks=10, block_size=4, num_slots=2)
    seq = make_seq(0)
    assert bm.can_allocate(seq, 5)
    assert bm.allocate(seq, 5) is True  # fresh slot
    assert len(seq.block_table) == 2 and seq.slot is not None
    seq.num_computed_tokens = 5
    assert bm.allocate(seq, 3) is False  # 8 tokens: still 2 blocks, same slot
    assert len(seq.block_table) == 2
    seq.num_computed_tokens = 8
    bm.allocate(seq, 1)
    assert len(seq.block_table) == 3
    assert bm.num_free_blocks == 7 and bm.num_free_slots == 1
    assert all(bm.ref_count(b) == 1 for b in seq.block_table)
    bm.free(seq)
    assert seq.block_table == [] and seq.slot is None
    assert bm.num_free_blocks == 10 and bm.num_free_slots == 2 and bm.block_usage == 0.0


def test_can_allocate_respects_blocks_and_slots():
    bm = BlockManager(num_blocks=3, block_size=4, num_slots=2)
    a, b, c = make_seq(0), make_seq(1), make_seq(2)
    assert not bm.can_allocate(a, 13)  # 4 blocks > 3
    bm.allocate(a, 8)
    assert bm.can_allocate(b, 4) and not bm.can_allocate(b, 5)
    bm.allocate(b, 1)
    assert not bm.can_allocate(c, 1)  # no slot left even though no block is needed... and none free
    bm.free(b)
    assert bm.can_allocate(c, 4)
    a.num_computed_tokens = 8
    assert bm.can_allocate(a, 4) and not bm.can_allocate(a, 5)  # a keeps its slot; only blocks count


def test_slot_exhaustion_blocks_allocation_even_with_free_blocks():
    bm = BlockManager(num_blocks=100, block_size=4, num_slots=1)
    a, b = make_seq(0), make_seq(1)
    bm.allocate(a, 1)
    assert bm.num_free_blocks == 99
    assert not bm.can_allocate(b, 1)


def test_random_allocate_free_never_shares_blocks_and_returns_to_full():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=40, block_size=4, num_slots=6)
    live: list[Sequence] = []
    for step in range(2000):
        if live and rng.random() < 0.3:
            seq = live.pop(rng.randrange(len(live)))
            bm.free(seq)
        else:
            seq = live[rng.randrange(len(live))] if live and rng.random() < 0.6 else make_seq(step)
            n = rng.randint(1, 9)
            if bm.can_allocate(seq, n):
                bm.allocate(seq, n)
                seq.num_computed_tokens += n
                if seq not in live:
                    live.append(seq)
            else:
                # can_allocate must be exact: refused only when blocks or the slot are really missing.
                missing = bm.num_blocks_for(seq.num_computed_tokens + n) - len(seq.block_table)
                assert missing > bm.num_free_blocks or (seq.slot is None and bm.num_free_slots == 0)
        owned = [b for s in live for b in s.block_table]
        assert len(owned) == len(set(owned))
        assert len(owned) + bm.num_free_blocks == bm.num_blocks
        slots = [s.slot for s in live]
        assert None not in slots and len(slots) == len(set(slots))
        assert len(slots) + bm.num_free_slots == bm.num_slots
        assert all(len(s.block_table) == bm.num_blocks_for(s.num_computed_tokens) for s in live)
    for seq in live:
        bm.free(seq)
    assert bm.num_free_blocks == 40 and bm.num_free_slots == 6
    assert all(bm.ref_count(b) == 0 for b in range(40))


def test_double_free_is_caught():
    bm = BlockManager(num_blocks=4, block_size=4, num_slots=2)
    seq = make_seq(0)
    bm.allocate(seq, 4)
    table = list(seq.block_table)
    bm.free(seq)
    seq.block_table = table
    with pytest.raises(AssertionError):
        bm.free(seq)


def test_constructor_and_from_plan():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 4, 1)
    plan = plan_cache(CacheGeometry(100, 1000, 8), 50_000, max_num_seqs=4, max_model_len=64)
    bm = BlockManager.from_plan(plan)
    assert (bm.num_blocks, bm.block_size, bm.num_slots) == (plan.num_blocks, 8, plan.num_slots)
