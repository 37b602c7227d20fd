"""The hybrid cache's declared layout and its slot operations, on real tensors and through the model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qwen3next.engine.runner import cache_geometry
from qwen3next.engine.slot_ops import CopySlot, ZeroSlots
from qwen3next.model.batch import BatchInfo
from qwen3next.model.cache import HybridCache, cache_layout
from tiny_models import make_model


@pytest.fixture(scope="module")
def model():
    return make_model("base")


def _state_pools(cache):
    return [pool for pools in cache.state.values() for pool in pools.values()]


def test_layers_declare_the_layout_the_cache_allocates(model):
    c = model.config
    layout = model.cache_layout()
    assert layout == cache_layout(c)  # the layers' own declarations and the config-only path agree
    cache = HybridCache(c, num_slots=3, num_blocks=2, block_size=4)
    conv_dim = 2 * c.linear_num_key_heads * c.linear_key_head_dim + c.linear_num_value_heads * c.linear_value_head_dim
    for i in c.linear_layers:
        assert cache.state[str(i)]["conv"].shape == (3, conv_dim, c.linear_conv_kernel_dim - 1)
        assert cache.state[str(i)]["recurrent"].shape == (3, c.linear_num_value_heads, c.linear_key_head_dim,
                                                          c.linear_value_head_dim)
        assert cache.state[str(i)]["recurrent"].dtype == torch.float32
    for key in [*map(str, c.attention_layers), "mtp0"]:
        assert cache.k[key].shape == cache.v[key].shape == (8, c.num_key_value_heads, c.head_dim)
    # The engine's byte accounting comes from the same declarations and equals the config's closed forms.
    g = cache_geometry(model, 4)
    assert g.kv_bytes_per_token == c.kv_bytes_per_token(4)
    assert g.state_bytes_per_slot == c.state_bytes_per_sequence(4, 4)


def test_half_the_heads_gives_the_cache_of_a_half_width_layer():
    """What a rank of a 2-way tensor-parallel model holds: half the DeltaNet key and value heads, and KV heads
    split (or replicated once there are fewer KV heads than ranks)."""
    full = make_model("base").config
    half = dataclasses.replace(full, linear_num_key_heads=full.linear_num_key_heads // 2,
                               linear_num_value_heads=full.linear_num_value_heads // 2,
                               num_key_value_heads=max(1, full.num_key_value_heads // 2))
    sharded = HybridCache(full, num_slots=2, num_blocks=2, block_size=4, layout=cache_layout(full, tp_size=2))
    reference = HybridCache(half, num_slots=2, num_blocks=2, block_size=4)
    for key, pools in reference.state.items():
        for name, pool in pools.items():
            assert sharded.state[key][name].shape == pool.shape
    assert {k: v.shape for k, v in sharded.k.items()} == {k: v.shape for k, v in reference.k.items()}
    assert sharded.nbytes() < HybridCache(full, num_slots=2, num_blocks=2, block_size=4).nbytes()
    with pytest.raises(ValueError, match="tp_size"):
        cache_layout(full, tp_size=full.linear_num_key_heads + 1)
    with pytest.raises(ValueError, match="tp_size: 2 must divide the 3 attention key/value heads"):
        cache_layout(dataclasses.replace(full, num_key_value_heads=3, num_attention_heads=6), tp_size=2)


def test_a_cached_forward_without_slots_is_a_clear_error(model):
    cache = HybridCache(model.config, num_slots=1, num_blocks=1, block_size=4)
    with pytest.raises(ValueError, match="needs slots and block_tables"):
        model.context(BatchInfo([2]), cache)


def test_zero_and_copy_slot_ops_change_exactly_their_rows(model):
    cache = HybridCache(model.config, num_slots=4, num_blocks=2, block_size=4)
    gen = torch.Generator().manual_seed(0)
    for pool in _state_pools(cache):
        pool.copy_(torch.randn(pool.shape, generator=gen))
    before = [pool.clone() for pool in _state_pools(cache)]
    ZeroSlots((1, 3)).apply(cache)
    for pool, old in zip(_state_pools(cache), before):
        assert pool[[1, 3]].abs().sum() == 0
        assert torch.equal(pool[[0, 2]], old[[0, 2]])
    CopySlot(0, 1).apply(cache)
    for pool, old in zip(_state_pools(cache), before):
        assert torch.equal(pool[1], old[0]) and torch.equal(pool[0], old[0]) and torch.equal(pool[2], old[2])
        assert pool[3].abs().sum() == 0
    with pytest.raises(ValueError, match="slot 4 outside"):
        cache.copy_slot(0, 4)


def test_snapshot_and_restore_continue_exactly(model):
    """Save a sequence's DeltaNet state after a prefix (copy to a spare slot), run on, restore, and run the same
    continuation again: the logits are the same as the first time (K/V of the prefix are untouched)."""
    ids = torch.randint(0, model.config.vocab_size, (24,), generator=torch.Generator().manual_seed(1))
    cache = HybridCache(model.config, num_slots=3, num_blocks=8, block_size=4)
    table = [5, 1, 7, 2, 0, 3]

    def run(start, stop):
        batch = BatchInfo([stop - start], [start], [2], [table])
        return model.lm_head(model.hidden_states(ids[start:stop], model.context(batch, cache)))

    with torch.no_grad():
        ZeroSlots((2,)).apply(cache)
        run(0, 10)
        CopySlot(2, 0).apply(cache)  # save
        first = torch.cat([run(10, 17), run(17, 18), run(18, 19)])
        CopySlot(0, 2).apply(cache)  # restore
        again = torch.cat([run(10, 17), run(17, 18), run(18, 19)])
        reference = model(ids[None, :19])[0, 10:]
    assert torch.equal(first, again)
    assert (first - reference).abs().max() < 1e-4
