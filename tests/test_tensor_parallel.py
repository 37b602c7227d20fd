"""Tensor + expert parallelism (qwen3next/parallel/): the split plan and its errors; 2 ranks over gloo on loopback
give the logits of the unsharded model to fp32 rounding (plain forward, cached prefill and decode, the MTP head), on
tiny models whose head, key-head, expert and vocabulary counts split evenly and unevenly; each rank's cache holds its
share of the K/V heads and DeltaNet state."""

from __future__ import annotations

import json

import pytest
import torch

from qwen3next.config import Qwen3NextConfig
from qwen3next.parallel.launch import run_local
from qwen3next.parallel.plan import TPPlan, split_range
from tiny_models import config_dict, make_model

TOL = 2e-5  # fp32 rounding of sums taken in another order (logits are O(1); observed ~4e-6)


def test_split_range_covers_everything_once():
    for n in range(0, 12):
        for world in range(1, 6):
            parts = [split_range(n, world, r) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(b - a for a, b in parts) - min(b - a for a, b in parts) <= 1


def plan(world, rank=0, **overrides):
    return TPPlan(Qwen3NextConfig.from_dict({**config_dict("base"), **overrides}), world, rank)


def test_attention_split_keeps_gqa_groups_and_replicates_kv_heads():
    # 8 query heads over 2 kv heads (groups of 4)
    s0, s1 = (plan(2, r, num_attention_heads=8).attention() for r in range(2))
    assert (s0.q_heads, s0.kv_heads, s1.q_heads, s1.kv_heads) == ((0, 4), (0, 1), (4, 8), (1, 2))
    # 4 ranks, 2 kv heads: each kv head on 2 ranks, which split its 4 query heads
    shards = [plan(4, r, num_attention_heads=8, linear_num_key_heads=4).attention() for r in range(4)]
    assert [(s.q_heads, s.kv_heads) for s in shards] == [((0, 2), (0, 1)), ((2, 4), (0, 1)), ((4, 6), (1, 2)),
                                                         ((6, 8), (1, 2))]


def test_impossible_splits_name_the_field():
    with pytest.raises(ValueError, match="must divide num_key_value_heads"):
        plan(3)
    with pytest.raises(ValueError, match="exceeds linear_num_key_heads"):
        plan(4)  # 2 DeltaNet key heads
    with pytest.raises(ValueError, match="query heads .* cannot be split"):
        plan(4, num_attention_heads=2, linear_num_key_heads=4)
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive int"):
        plan(0)


def _parity(rank: int, name: str, out_dir: str) -> None:
    from qwen3next.model.batch import BatchInfo
    from qwen3next.parallel.comm import TPComm
    from qwen3next.parallel.shard import shard_model

    torch.set_flush_denormal(True)
    model = make_model(name)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # rows of different lengths
    step = torch.randint(0, model.config.vocab_size, (3, 2), generator=g)

    def run(m):
        plain = m(ids, attention_mask=mask)
        cache = m.new_cache(3, 32, block_size=8)
        prefill = m(ids[:, :6], cache)
        decode = [m(ids[:, 6 + i:7 + i], cache) for i in range(3)] + [m(step, cache)]
        ctx = m.context(BatchInfo([4]))
        h = m.hidden_states(ids[0, :4], ctx)
        mtp = m.lm_head(m.mtp_hidden(h, ids[0, 1:5], m.context(BatchInfo([4]))))
        return [plain, prefill, *decode, mtp]

    ref = run(model)
    comm = TPComm()
    full_layout = model.cache_layout()
    shard_model(model, TPPlan(model.config, comm.world, comm.rank), comm)
    got = run(model)
    layout = model.cache_layout()
    report = {"diffs": [(a - b).abs().max().item() for a, b in zip(ref, got)],
              "kv_heads": {k: v.num_kv_heads for k, v in layout.kv.items()},
              "full_kv_heads": {k: v.num_kv_heads for k, v in full_layout.kv.items()},
              "state": {k: [list(s.shape) for s in v] for k, v in layout.state.items()},
              "full_state": {k: [list(s.shape) for s in v] for k, v in full_layout.state.items()},
              "all_reduces": comm.num_all_reduce}
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(report, f)


@pytest.mark.parametrize("name", ["base", "mlp_only"])
def test_two_ranks_give_the_unsharded_logits(tmp_path, name):
    """base: every count even; mlp_only: 3 query heads over 1 kv head (replicated, split 2 + 1), 3 DeltaNet key
    heads (2 + 1), 5 experts (3 + 2), 97 vocabulary rows (49 + 48), dense MLP layers."""
    run_local(_parity, 2, name, str(tmp_path))
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rep in reports:
        assert max(rep["diffs"]) < TOL, rep["diffs"]
    config = make_model(name).config
    for key, full in reports[0]["full_kv_heads"].items():
        got = [rep["kv_heads"][key] for rep in reports]
        assert got == ([1, 1] if full == 1 else [full // 2, full - full // 2])  # replicated, or split
    for key, full in reports[0]["full_state"].items():
        conv, rec = full
        parts = [rep["state"][key] for rep in reports]
        assert sum(p[1][0] for p in parts) == rec[0]  # value heads split
        assert sum(p[0][0] for p in parts) == conv[0]  # conv channels split
    # one all-reduce per sublayer and one per embedding lookup: 2 per layer + 1 per forward of the model (plain,
    # prefill, 4 decodes, hidden_states), and 3 for the MTP head (its embedding, its attention, its MoE)
    per_forward = 2 * config.num_hidden_layers + 1
    assert reports[0]["all_reduces"] == 7 * per_forward + 3
