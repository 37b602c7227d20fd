"""Cache continuation and mixed-length batches must be exact (transformers drops DeltaNet history here; we don't)."""

from __future__ import annotations

import pytest
import torch

from qwen3next.model.batch import BatchInfo
from qwen3next.model.cache import HybridCache
from tiny_models import make_model


@pytest.fixture(scope="module")
def model():
    return make_model("base")


def test_prefill_multi_token_then_steps_equals_full_forward(model):
    ids = torch.randint(0, model.config.vocab_size, (2, 150), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        for n1, n2 in ((70, 50), (1, 3), (64, 64)):
            cache = model.new_cache(2, 160)
            parts = [model(ids[:, :n1], cache), model(ids[:, n1:n1 + n2], cache)]
            for t in range(n1 + n2, 150):
                parts.append(model(ids[:, t:t + 1], cache))
            got = torch.cat(parts, dim=1)
            err = (got - full).abs().max().item()
            assert err < 1e-4, (n1, n2, err)
            assert cache.lengths == [150, 150]


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_sequence_alone(model, side):
    gen = torch.Generator().manual_seed(1)
    lens = [5, 67, 130, 1]
    T = max(lens)
    seqs = [torch.randint(0, model.config.vocab_size, (n,), generator=gen) for n in lens]
    ids = torch.zeros(len(lens), T, dtype=torch.long)
    mask = torch.zeros(len(lens), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        for i, s in enumerate(seqs):
            alone = model(s[None])[0]
            got = batched[i][mask[i].bool()]
            assert (got - alone).abs().max().item() < 1e-4, (side, i)
        assert batched[mask == 0].abs().max().item() == 0


def test_mixed_batch_with_cache_continues_each_sequence(model):
    """Different prompt lengths, then uneven multi-token continuations, then decode — all in one cache."""
    gen = torch.Generator().manual_seed(2)
    lens = [9, 70]
    seqs = [torch.randint(0, model.config.vocab_size, (n + 12,), generator=gen) for n in lens]
    with torch.no_grad():
        refs = [model(s[None])[0] for s in seqs]
        cache = model.new_cache(2, 128)
        T = max(lens)
        ids = torch.zeros(2, T, dtype=torch.long)
        mask = torch.zeros(2, T, dtype=torch.long)
        for i, n in enumerate(lens):
            ids[i, :n], mask[i, :n] = seqs[i][:n], 1
        out = model(ids, cache, attention_mask=mask)
        for i, n in enumerate(lens):
            assert (out[i, :n] - refs[i][:n]).abs().max() < 1e-4
        # row 0 gets 7 more tokens, row 1 gets 2 (right-padded), then both decode
        more = [7, 2]
        ids = torch.zeros(2, 7, dtype=torch.long)
        mask = torch.zeros(2, 7, dtype=torch.long)
        for i in range(2):
            ids[i, : more[i]] = seqs[i][lens[i]:lens[i] + more[i]]
            mask[i, : more[i]] = 1
        out = model(ids, cache, attention_mask=mask)
        for i in range(2):
            exp = refs[i][lens[i]:lens[i] + more[i]]
            assert (out[i, : more[i]] - exp).abs().max() < 1e-4
        pos = [lens[i] + more[i] for i in range(2)]
        for _ in range(3):
            step = torch.stack([seqs[i][pos[i]:pos[i] + 1] for i in range(2)])
            out = model(step, cache)
            for i in range(2):
                assert (out[i, 0] - refs[i][pos[i]]).abs().max() < 1e-4
                pos[i] += 1


def test_varlen_forward_with_scattered_blocks_and_slots(model):
    """The engine's path: arbitrary slot ids and non-contiguous block tables give the same logits."""
    gen = torch.Generator().manual_seed(3)
    a, b = (torch.randint(0, model.config.vocab_size, (n,), generator=gen) for n in (20, 11))
    cache = HybridCache(model.config, num_slots=5, num_blocks=12, block_size=4)
    cache.zero_slots([3, 1])
    with torch.no_grad():
        ref_a, ref_b = model(a[None])[0], model(b[None])[0]
        batch = BatchInfo([12, 11], [0, 0], slots=[3, 1], block_tables=[[7, 0, 9, 2, 5], [11, 4, 6]])
        ctx = model.context(batch, cache)
        logits = model.lm_head(model.hidden_states(torch.cat([a[:12], b]), ctx))
        assert (logits[:12] - ref_a[:12]).abs().max() < 1e-4
        assert (logits[12:] - ref_b).abs().max() < 1e-4
        batch = BatchInfo([8], [12], slots=[3], block_tables=[[7, 0, 9, 2, 5]])
        logits = model.lm_head(model.hidden_states(a[12:], model.context(batch, cache)))
        assert (logits - ref_a[12:]).abs().max() < 1e-4


def test_cache_overflow_is_a_clear_error(model):
    cache = model.new_cache(1, 8)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 9, dtype=torch.long), cache)
