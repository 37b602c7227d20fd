"""Chunked prefill over a long cached context: exact (equal to a one-shot forward to fp32 rounding), mask-free
attention (`attention_context_split`) equal to its masked twin, no [T, L] mask built, and index arithmetic that
stays in int64 past 2^31 elements."""

from __future__ import annotations

import pytest
import torch

from qwen3next.model.attention import context_split_attention
from qwen3next.model.batch import BatchInfo
from qwen3next.ops.dispatch import set_threshold
from tiny_models import make_model


@pytest.fixture
def split_always():
    previous = set_threshold("attention_context_split", 0)
    yield
    set_threshold("attention_context_split", previous)


def _chunked_logits(model, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    with torch.no_grad():
        return torch.cat([model(ids[:, a:a + chunk], cache) for a in range(0, ids.shape[1], chunk)], dim=1)


@pytest.mark.parametrize("chunk", [64, 100])
def test_chunked_prefill_equals_one_shot(split_always, chunk):
    """A 600-token prompt prefilled in chunks (mask-free attention over the growing context, the DeltaNet state
    carried between chunks) gives the one-shot forward's logits at every position."""
    model = make_model(seed=7, max_position_embeddings=1024).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 600), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        one_shot = model(ids)
    torch.testing.assert_close(_chunked_logits(model, ids, chunk), one_shot, atol=1e-4, rtol=1e-4)


def test_split_attention_equals_the_masked_twin():
    """Ragged batch: sequences with different cached contexts (one with none) and new-token counts; the padded
    query rows are zero, the real ones equal SDPA with the explicit mask."""
    g = torch.Generator().manual_seed(0)
    B, H, HKV, Dh = 3, 4, 2, 16
    seq_lens, context_lens = [5, 1, 7], [11, 0, 30]
    T, L = max(seq_lens), max(n + c for n, c in zip(seq_lens, context_lens))
    q = torch.randn(B, H, T, Dh, generator=g)
    k = torch.randn(B, HKV, L, Dh, generator=g)
    v = torch.randn(B, HKV, L, Dh, generator=g)
    key_pos = torch.arange(L)
    q_pos = torch.arange(T)[None, :] + torch.tensor(context_lens)[:, None]
    mask = (key_pos[None, None, :] <= q_pos[:, :, None])[:, None]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    got = context_split_attention(q, k, v, seq_lens, context_lens)
    for b, n in enumerate(seq_lens):
        torch.testing.assert_close(got[b, :, :n], ref[b, :, :n], atol=1e-5, rtol=1e-5)
        assert not got[b, :, n:].any()


def test_split_path_builds_no_mask_and_matches_the_mask_path(split_always):
    """Two sequences continuing different contexts through the cache: the split path leaves the mask unbuilt and its
    logits equal the masked path's."""
    model = make_model(seed=2).eval()
    g = torch.Generator().manual_seed(5)
    ids = [torch.randint(0, model.config.vocab_size, (n,), generator=g) for n in (90, 70)]

    def run() -> tuple[torch.Tensor, list[BatchInfo]]:
        cache = model.new_cache(2, 128)
        infos = []
        with torch.no_grad():
            first = [60, 40]
            info = cache.batch([0, 1], first)
            model.hidden_states(torch.cat([ids[0][:60], ids[1][:40]]), model.context(info, cache.hybrid))
            cache.advance([0, 1], first)
            rest = [30, 30]
            info = cache.batch([0, 1], rest)
            infos.append(info)
            h = model.hidden_states(torch.cat([ids[0][60:], ids[1][40:]]), model.context(info, cache.hybrid))
        return model.lm_head(h), infos

    split_logits, infos = run()
    assert infos[0].kv._mask is None
    previous = set_threshold("attention_context_split", 1 << 62)
    try:
        mask_logits, infos = run()
    finally:
        set_threshold("attention_context_split", previous)
    assert infos[0].kv._mask is not None
    torch.testing.assert_close(split_logits, mask_logits, atol=1e-5, rtol=1e-5)


def test_kv_rows_past_2_31_stay_exact():
    """Pool rows beyond int32 (block ids of a pool with > 2^31 rows): the read and write indices are int64 and
    exact; built from the block table alone (no pool is allocated)."""
    first = 2 ** 27  # row first * 64 = 2^33
    info = BatchInfo([3], [61], None, [[first + 5, first + 1]]).prepare("cpu", block_size=64, num_blocks=None)
    kv = info.kv
    assert kv.read_index.dtype == kv.write_index.dtype == torch.int64
    assert kv.read_index[0, :64].tolist() == [(first + 5) * 64 + p for p in range(64)]
    assert kv.write_index.tolist() == [(first + 5) * 64 + 61, (first + 5) * 64 + 62, (first + 5) * 64 + 63]
    info = BatchInfo([2], [63], None, [[first + 5, first + 1]]).prepare("cpu", block_size=64, num_blocks=None)
    assert info.kv.write_index.tolist() == [(first + 5) * 64 + 63, (first + 1) * 64]
    assert info.tokens.positions.tolist() == [63, 64]
