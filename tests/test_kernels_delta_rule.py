"""The native prefill delta rule (`qwen3next::gated_delta_rule`, kernels/delta_rule.cpp): parity with the literal
recurrence in float64 (AVX2 and scalar code, odd head sizes, grouped heads, an initial state, strided inputs, padded
steps), its use in the DeltaNet layer, and the switch."""

from __future__ import annotations

import pytest
import torch

from qwen3next import kernels
from qwen3next.ops.gated_delta import chunk_gated_delta_rule, naive_gated_delta_rule
from tiny_models import make_model

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"native kernels unavailable: {kernels.load_error()}")


@pytest.fixture(params=["avx2", "scalar"])
def isa(request):
    old = kernels.set_isa(request.param)
    if kernels.set_isa(request.param) != request.param:
        pytest.skip("this CPU has no AVX2 + FMA")
    yield request.param
    kernels.set_isa(old)


def _inputs(B, T, H, HV, K, V, seed=0, state=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g, dtype=torch.float64), dim=-1) * K ** -0.5
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, HV, V, generator=g, dtype=torch.float64)
    gate = -torch.rand(B, T, HV, generator=g, dtype=torch.float64) * 2  # decays from e^-2 to 1
    beta = torch.rand(B, T, HV, generator=g, dtype=torch.float64)
    s0 = torch.randn(B, HV, K, V, generator=g, dtype=torch.float64) if state else None
    return q, k, v, gate, beta, s0


@pytest.mark.parametrize("shape", [
    (1, 37, 1, 1, 16, 32),   # one full 32-column block
    (2, 45, 2, 4, 8, 64),    # grouped heads (two value heads per q/k head), two blocks
    (1, 20, 1, 2, 12, 48),   # a 32-column block and a 16-column one
    (2, 9, 1, 3, 5, 24),     # a 24-column tail: the scalar code under AVX2
    (1, 33, 2, 2, 64, 8),    # an 8-column block
])
def test_matches_the_literal_recurrence(isa, shape):
    q, k, v, g, beta, s0 = _inputs(*shape)
    o_ref, s_ref = naive_gated_delta_rule(q, k, v, g, beta, s0)
    o, s = kernels.gated_delta_rule(q.float(), k.float(), v.float(), g.float(), beta.float(), s0.float())
    assert o.dtype == s.dtype == torch.float32
    torch.testing.assert_close(o.double(), o_ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(s.double(), s_ref, atol=2e-5, rtol=1e-5)


def test_zero_state_default_and_state_left_untouched(isa):
    q, k, v, g, beta, s0 = (x.float() for x in _inputs(1, 11, 1, 2, 16, 16))
    o, s = kernels.gated_delta_rule(q, k, v, g, beta)
    o_ref, s_ref = naive_gated_delta_rule(q.double(), k.double(), v.double(), g.double(), beta.double())
    torch.testing.assert_close(o.double(), o_ref, atol=2e-5, rtol=1e-5)
    before = s0.clone()
    kernels.gated_delta_rule(q, k, v, g, beta, s0)
    assert torch.equal(s0, before)


def test_strided_inputs_and_padded_steps(isa):
    """v as a slice of a wider tensor (what the layer passes: a split of the conv output), q/k views; steps with
    g = 0 and beta = 0 (right padding) leave the state as it was."""
    q, k, v, g, beta, s0 = (x.float() for x in _inputs(2, 19, 2, 4, 16, 32, seed=3))
    wide = torch.randn(2, 19, 4, 48)
    wide[..., 8:40] = v
    v_view = wide[..., 8:40]
    assert not v_view.is_contiguous()
    g[1, 12:] = 0
    beta[1, 12:] = 0
    o, s = kernels.gated_delta_rule(q, k, v_view, g, beta, s0)
    o_ref, s_ref = naive_gated_delta_rule(q.double(), k.double(), v.double(), g.double(), beta.double(), s0.double())
    torch.testing.assert_close(o.double(), o_ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(s.double(), s_ref, atol=2e-5, rtol=1e-5)
    _, s_short = naive_gated_delta_rule(*(x[1:, :12].double() for x in (q, k, v, g, beta)), s0[1:].double())
    torch.testing.assert_close(s[1:].double(), s_short, atol=2e-5, rtol=1e-5)


def test_long_input_agrees_with_the_chunked_form():
    """A few thousand tokens at the `small` preset's head sizes: both fp32 forms stay within fp32 rounding of the
    float64 chunked result."""
    q, k, v, g, beta, s0 = _inputs(1, 3000, 2, 4, 64, 64, seed=5)
    g = g / 20  # slow decay: a long memory, where rounding would accumulate
    o_ref, s_ref = chunk_gated_delta_rule(q, k, v, g, beta, s0)
    o, s = kernels.gated_delta_rule(q.float(), k.float(), v.float(), g.float(), beta.float(), s0.float())
    torch.testing.assert_close(o.double(), o_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s.double(), s_ref, atol=1e-4, rtol=1e-4)


def test_bad_arguments_are_clear_errors():
    q, k, v, g, beta, s0 = (x.float() for x in _inputs(1, 4, 1, 2, 8, 8))
    with pytest.raises(RuntimeError, match="float32"):
        kernels.gated_delta_rule(q.double(), k, v, g, beta, s0)
    with pytest.raises(RuntimeError, match="state must be"):
        kernels.gated_delta_rule(q, k, v, g, beta, s0[:, :1])
    with pytest.raises(RuntimeError, match="g and beta"):
        kernels.gated_delta_rule(q, k, v, g[:, :2], beta, s0)


@pytest.mark.parametrize("shape", [
    (1, 3, 1, 2, 16, 32),   # one 32-column block, grouped heads
    (2, 4, 2, 2, 12, 48),   # a 32-column block and a 16-column one
    (2, 2, 1, 3, 5, 24),    # a 24-column tail: the scalar code under AVX2
    (3, 1, 2, 2, 64, 8),    # one token, an 8-column block
])
def test_verify_keeps_the_state_after_every_token(isa, shape):
    """`gated_delta_verify` (a speculative verification's few tokens): o equals the literal recurrence's, and its
    state after token t equals the recurrence run over the first t + 1 tokens alone (float64), strided v; the
    initial state is not modified."""
    B, T, H, HV, K, V = shape
    q, k, v, g, beta, s0 = _inputs(*shape, seed=sum(shape))
    wide = torch.zeros(B, T, HV, V + 5, dtype=torch.float64)
    wide[..., 5:] = v
    v_view = wide.float()[..., 5:]
    assert not v_view.is_contiguous()
    state = s0.float()
    before = state.clone()
    o, states = kernels.gated_delta_verify(q.float(), k.float(), v_view, g.float(), beta.float(), state)
    assert states.shape == (B, T, HV, K, V) and states.dtype == torch.float32
    o_ref, _ = naive_gated_delta_rule(q, k, v, g, beta, s0)
    torch.testing.assert_close(o.double(), o_ref, atol=2e-5, rtol=1e-5)
    for t in range(T):
        _, s_t = naive_gated_delta_rule(*(x[:, :t + 1] for x in (q, k, v, g, beta)), s0)
        torch.testing.assert_close(states[:, t].double(), s_t, atol=2e-5, rtol=1e-5)
    assert torch.equal(state, before)
    with pytest.raises(RuntimeError, match="gated_delta_verify: state must be"):
        kernels.gated_delta_verify(q.float(), k.float(), v_view, g.float(), beta.float(), state[:, :1])


@pytest.mark.parametrize("use_cache", [False, True])
def test_the_layer_takes_the_native_path_and_matches_the_torch_path(use_cache, monkeypatch):
    """A whole model's prefill (a prompt in two chunks through the cache, or one forward without one) with the
    kernels on equals the torch path (chunked delta rule) to fp32 rounding, and the kernel really ran."""
    model = make_model(seed=4).float().eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 70), generator=torch.Generator().manual_seed(1))

    def run(native: bool) -> torch.Tensor:
        previous = kernels.set_enabled(native)
        try:
            with torch.no_grad():
                if not use_cache:
                    return model(ids)
                cache = model.new_cache(2, 70)
                return torch.cat([model(ids[:, a:b], cache) for a, b in ((0, 40), (40, 70))], dim=1)
        finally:
            kernels.set_enabled(previous)

    torch_out = run(False)
    calls = []
    real = kernels.gated_delta_rule
    monkeypatch.setattr(kernels, "gated_delta_rule", lambda *a: (calls.append(a[0].shape), real(*a))[1])
    native_out = run(True)
    assert len(calls) == (2 if use_cache else 1) * len(model.config.linear_layers)
    torch.testing.assert_close(native_out, torch_out, atol=2e-4, rtol=1e-4)


# ---- one decode token, in place in the pool (qwen3next::gated_delta_decode) -----------------------------------------
@pytest.mark.parametrize("shape", [
    (1, 2, 4, 16, 32, 5),   # one 32-column block, grouped heads
    (3, 1, 3, 5, 48, 7),    # a 32-column block and a 16-column one, odd K
    (2, 2, 2, 12, 24, 4),   # a 24-column tail: the scalar code under AVX2
    (4, 2, 2, 64, 8, 9),    # an 8-column block
])
def test_decode_step_matches_the_recurrence_in_place(isa, shape):
    """One token for B sequences in scattered slots: o and the new state equal the literal recurrence (float64);
    the state lands in its own pool row and no other row changes."""
    B, H, HV, K, V, S = shape
    q, k, v, g, beta, _ = _inputs(B, 1, H, HV, K, V, seed=sum(shape))
    pool = torch.randn(S, HV, K, V, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    slots = torch.randperm(S, generator=torch.Generator().manual_seed(5))[:B]
    o_ref, s_ref = naive_gated_delta_rule(q, k, v, g, beta, pool[slots])
    # strided inputs, as the layer passes them: k a slice of a wider tensor, v a view with a row stride
    qk = torch.cat([q[:, 0], k[:, 0]], dim=1).float()
    v_wide = torch.cat([torch.zeros(B, HV, 3, dtype=torch.float64), v[:, 0]], dim=-1).float()[:, :, 3:]
    assert v_wide.stride(1) == V + 3 and qk[:, H:].stride(0) == 2 * H * K
    got = pool.float()
    before = got.clone()
    o = kernels.gated_delta_decode(qk[:, :H].contiguous(), qk[:, H:], v_wide, g[:, 0].float(), beta[:, 0].float(),
                                   got, slots)
    torch.testing.assert_close(o.double(), o_ref[:, 0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got[slots].double(), s_ref, atol=2e-5, rtol=1e-5)
    others = torch.ones(S, dtype=torch.bool)
    others[slots] = False
    assert torch.equal(got[others], before[others])


def test_decode_step_bad_arguments_are_clear_errors():
    q, k, v, g, beta, _ = (None if x is None else x.float()[:, 0] for x in _inputs(2, 1, 1, 2, 8, 8, state=False))
    pool = torch.zeros(3, 2, 8, 8)
    with pytest.raises(RuntimeError, match="slot 3 outside the pool's 3 slots"):
        kernels.gated_delta_decode(q, k, v, g, beta, pool, torch.tensor([0, 3]))
    with pytest.raises(RuntimeError, match="slot 1 appears twice"):
        kernels.gated_delta_decode(q, k, v, g, beta, pool, torch.tensor([1, 1]))
    with pytest.raises(RuntimeError, match="pool must be a contiguous"):
        kernels.gated_delta_decode(q, k, v, g, beta, pool[:, :1], torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="gated_delta_decode: v must be a float32 CPU tensor"):
        kernels.gated_delta_decode(q, k, v.bfloat16(), g, beta, pool, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="slots must be int64"):
        kernels.gated_delta_decode(q, k, v, g, beta, pool, torch.tensor([0, 1], dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_steps_take_the_native_path_and_match_the_torch_path(dtype, monkeypatch):
    """Greedy decoding through the cache (the torch path updates the pool rows through a view) with the
    kernels on equals the torch path's logits to fp32 rounding (bf16 activations, fp32 state: to bf16 rounding), and
    the in-place kernel really ran."""
    model = make_model(seed=6).to(dtype).eval()
    prompt = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))

    def run(native: bool) -> torch.Tensor:
        previous = kernels.set_enabled(native)
        try:
            with torch.no_grad():
                cache = model.new_cache(2, 20)
                logits = [model(prompt, cache)[:, -1]]
                for _ in range(5):
                    logits.append(model(logits[-1].argmax(-1, keepdim=True), cache)[:, -1])
                return torch.stack(logits, 1)
        finally:
            kernels.set_enabled(previous)

    torch_out = run(False)
    calls = []
    real = kernels.gated_delta_decode
    monkeypatch.setattr(kernels, "gated_delta_decode", lambda *a: (calls.append(a[0].shape), real(*a))[1])
    native_out = run(True)
    assert len(calls) == 5 * len(model.config.linear_layers)
    tol = 2e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(native_out.float(), torch_out.float(), atol=tol, rtol=tol)
