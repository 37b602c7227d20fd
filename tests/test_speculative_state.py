"""Exact rollback of the hybrid state for speculative verification: a forward that captures every token's
DeltaNet state, then commits the state after the last kept token, equals a plain run over the kept tokens."""

from __future__ import annotations

import pytest
import torch

from qwen3next.model.batch import BatchInfo
from qwen3next.model.deltanet import GatedDeltaNet, conv_states_per_token
from qwen3next.ops.dispatch import set_fast_decode
from qwen3next.ops.gated_delta import naive_gated_delta_rule, recurrent_gated_delta_rule
from tiny_models import make_model


def test_conv_states_per_token_are_the_rolling_window():
    torch.manual_seed(0)
    state, x = torch.randn(2, 5, 3), torch.randn(2, 4, 5)
    got = conv_states_per_token(state, x)
    frames = torch.cat([state, x.transpose(1, 2)], dim=-1)  # [B, C, W-1+T]
    for t in range(4):
        assert torch.equal(got[:, t], frames[:, :, t + 1:t + 4])


def test_recurrent_states_out_match_the_naive_recurrence_token_by_token():
    torch.manual_seed(1)
    B, T, H, HV, K, V = 2, 4, 2, 4, 8, 6
    q = torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1)
    v, g, beta = torch.randn(B, T, HV, V), -torch.rand(B, T, HV), torch.rand(B, T, HV)
    init = torch.randn(B, HV, K, V)
    states = torch.empty(B, T, HV, K, V)
    recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=init, states_out=states)
    for t in range(T):
        _, want = naive_gated_delta_rule(q[:, :t + 1], k[:, :t + 1], v[:, :t + 1], g[:, :t + 1], beta[:, :t + 1],
                                         initial_state=init)
        torch.testing.assert_close(states[:, t], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="states_out"):
        recurrent_gated_delta_rule(q, k, v, g, beta, states_out=torch.empty(B, T + 1, HV, K, V))


@pytest.mark.parametrize("name,fed_lens,fast", [("base", (4, 2, 3), True), ("mlp_only", (4, 2, 3), True),
                                                 ("base", (3, 3, 3), True), ("base", (3, 3, 3), False)])
def test_commit_after_rejected_drafts_equals_a_plain_run_over_the_kept_tokens(name, fed_lens, fast):
    """Varlen verification (the general DeltaNet path) and equal lengths (the `deltanet_verify_step` fast path, and
    its twin with the fast paths off)."""
    model = make_model(name)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 9, 3)]
    fed = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in fed_lens]  # last token + drafts
    keep = [2, 2, 1]
    calls = []
    fast_step = GatedDeltaNet._verify_step
    previous = set_fast_decode(fast)
    try:
        GatedDeltaNet._verify_step = lambda self, *a: calls.append(1) or fast_step(self, *a)
        _check_commit(model, prompts, fed, keep, g)
    finally:
        set_fast_decode(previous)
        GatedDeltaNet._verify_step = fast_step
    assert bool(calls) == (fast and len(set(fed_lens)) == 1)  # the fast path ran exactly where it should


def _check_commit(model, prompts, fed, keep, g):
    vocab = model.config.vocab_size
    with torch.no_grad():
        spec, plain = model.new_cache(3, 64), model.new_cache(3, 64)
        for cache in (spec, plain):
            for i, p in enumerate(prompts):
                model.hidden_states(torch.tensor(p), model.context(cache.batch([i], [len(p)]), cache.hybrid))
                cache.advance([i], [len(p)])
        # speculative: feed all, keep a prefix
        lens = [len(f) for f in fed]
        batch = spec.batch([0, 1, 2], lens)
        batch.capture_states = True
        ctx = model.context(batch, spec.hybrid)
        h_spec = model.hidden_states(torch.tensor(sum(fed, [])), ctx)
        ctx.commit_captured(keep)
        # plain: feed only the kept tokens, one sequence at a time and one token at a time
        h_plain = []
        for i, (f, n) in enumerate(zip(fed, keep)):
            for t in f[:n]:
                h_plain.append(model.hidden_states(torch.tensor([t]),
                                                   model.context(plain.batch([i], [1]), plain.hybrid)))
                plain.advance([i], [1])
        starts = [sum(len(f) for f in fed[:i]) for i in range(len(fed))]
        kept_rows = [s + j for s, n in zip(starts, keep) for j in range(n)]
        torch.testing.assert_close(h_spec[kept_rows], torch.cat(h_plain), rtol=1e-5, atol=1e-5)
        for key, pools in plain.hybrid.state.items():
            for pname, pool in pools.items():
                torch.testing.assert_close(spec.hybrid.state[key][pname], pool, rtol=1e-5, atol=1e-6,
                                           msg=f"layer {key} {pname}")
        # and the rejected positions' K/V are harmless: continuing both caches gives the same hidden states
        for cache in (spec, plain):
            cache.lengths = [p + n for p, n in zip(map(len, prompts), keep)]
        nxt = torch.randint(0, vocab, (3,), generator=g)
        outs = [model.hidden_states(nxt, model.context(c.batch([0, 1, 2], [1, 1, 1]), c.hybrid)) for c in (spec, plain)]
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_commit_captured_checks_its_input():
    model = make_model("base")
    cache = model.new_cache(1, 16)
    with torch.no_grad():
        batch = BatchInfo([2], [0], [0], [cache.block_tables[0]])
        ctx = model.context(batch, cache.hybrid)
        model.hidden_states(torch.tensor([1, 2]), ctx)
        with pytest.raises(RuntimeError, match="capture_states"):
            ctx.commit_captured([1])
        batch = BatchInfo([2], [0], [0], [cache.block_tables[0]], capture_states=True)
        ctx = model.context(batch, cache.hybrid)
        model.hidden_states(torch.tensor([1, 2]), ctx)
        with pytest.raises(ValueError, match="keep"):
            ctx.commit_captured([3])
