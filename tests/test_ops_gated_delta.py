import pytest
import torch
import torch.nn.functional as F

from qwen3next.ops.gated_delta import chunk_gated_delta_rule, naive_gated_delta_rule, recurrent_gated_delta_rule

K_DIM, V_DIM = 16, 24  # K != V so a transposed state shows up as a shape or value error


def make_inputs(b, t, h, hv, dtype=torch.float64, seed=0, with_state=True, strong_decay=False, dk=K_DIM, dv=V_DIM):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q = F.normalize(randn(b, t, h, dk), dim=-1) * dk**-0.5
    k = F.normalize(randn(b, t, h, dk), dim=-1)
    v = randn(b, t, hv, dv)
    g = -F.softplus(randn(b, t, hv)) * 2.0  # decays from ~1 down to ~e^-10 per token
    if strong_decay:
        g = g - 20.0  # in-chunk cumulative decay reaches -1000s: exp overflows unless the upper triangle is masked
    beta = torch.rand(b, t, hv, generator=gen, dtype=torch.float64)
    state = randn(b, hv, dk, dv) if with_state else None
    out = [x.to(dtype) for x in (q, k, v, g, beta)]
    return (*out, None if state is None else state.to(dtype))


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


HEADS = [(2, 4), (3, 3)]  # grouped value heads (repeat_interleave mapping) and a non power of two


@pytest.mark.parametrize("t", [1, 2, 63, 64, 65, 130])
@pytest.mark.parametrize("h,hv", HEADS)
@pytest.mark.parametrize("with_state", [False, True])
def test_fast_forms_match_naive_float64(t, h, hv, with_state):
    inputs = make_inputs(2, t, h, hv, with_state=with_state, seed=t)
    o_ref, s_ref = naive_gated_delta_rule(*inputs)
    for name, (o, s) in {
        "chunk64": chunk_gated_delta_rule(*inputs),
        "chunk16": chunk_gated_delta_rule(*inputs, chunk_size=16),
        "recurrent": recurrent_gated_delta_rule(*inputs),
    }.items():
        assert o.dtype == s.dtype == torch.float64, name
        assert o.shape == (2, t, hv, V_DIM) and s.shape == (2, hv, K_DIM, V_DIM), name
        # Measured: <= 5.2e-15.
        assert max_err(o, o_ref) < 1e-10, name
        assert max_err(s, s_ref) < 1e-10, name


@pytest.mark.parametrize("t", [1, 2, 63, 64, 65, 130])
@pytest.mark.parametrize("h,hv", HEADS)
@pytest.mark.parametrize("with_state", [False, True])
def test_fast_forms_match_naive_float32(t, h, hv, with_state):
    inputs32 = make_inputs(2, t, h, hv, dtype=torch.float32, with_state=with_state, seed=100 + t)
    # Reference: the same float32 values, computed in float64, so only the fast forms' rounding is measured.
    o_ref, s_ref = naive_gated_delta_rule(*[None if x is None else x.double() for x in inputs32])
    for name, (o, s) in {
        "chunk64": chunk_gated_delta_rule(*inputs32),
        "chunk16": chunk_gated_delta_rule(*inputs32, chunk_size=16),
        "recurrent": recurrent_gated_delta_rule(*inputs32),
    }.items():
        assert o.dtype == s.dtype == torch.float32, name
        # Measured: <= 1.1e-6 (o) and 2.9e-6 (state) for chunk64, <= 4e-7 for the others; values are O(1).
        assert max_err(o, o_ref) < 3e-5, name
        assert max_err(s, s_ref) < 3e-5, name


def test_strong_decay_does_not_overflow():
    # float32, one 64-token chunk with cumulative log decay around -1400: masking after exp would give inf/nan.
    inputs = make_inputs(1, 64, 2, 4, dtype=torch.float32, strong_decay=True)
    o_ref, s_ref = naive_gated_delta_rule(*[x.double() for x in inputs])
    o, s = chunk_gated_delta_rule(*inputs)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert max_err(o, o_ref) < 1e-4 and max_err(s, s_ref) < 1e-4
    # Masking after exp can look fine forward (inf replaced by 0) yet give 0 * inf = nan gradients.
    for grad in _grads(chunk_gated_delta_rule, inputs):
        assert torch.isfinite(grad).all()


def test_value_heads_use_repeat_interleave_mapping():
    # With HV = 2H, value heads 0 and 1 must read q/k head 0. Make q/k head 1 differ and check that giving value
    # heads 0, 1 the same v/g/beta yields identical outputs (tiling would pair value head 1 with q/k head 1).
    q, k, v, g, beta, s0 = make_inputs(1, 9, 2, 4, with_state=False)
    v = v.clone()
    g = g.clone()
    beta = beta.clone()
    v[:, :, 1], g[:, :, 1], beta[:, :, 1] = v[:, :, 0], g[:, :, 0], beta[:, :, 0]
    for fn in (chunk_gated_delta_rule, recurrent_gated_delta_rule, naive_gated_delta_rule):
        o, s = fn(q, k, v, g, beta)
        assert max_err(o[:, :, 0], o[:, :, 1]) < 1e-12, fn.__name__
        assert max_err(s[:, 0], s[:, 1]) < 1e-12, fn.__name__
        assert max_err(o[:, :, 0], o[:, :, 2]) > 1e-3, fn.__name__


@pytest.mark.parametrize("n1", [1, 37, 64])
def test_split_sequence_equals_whole(n1):
    q, k, v, g, beta, s0 = make_inputs(2, 100, 2, 4, seed=7)
    o_all, s_all = chunk_gated_delta_rule(q, k, v, g, beta, s0)

    def part(x, sl):
        return x[:, sl]

    first, second = slice(0, n1), slice(n1, None)
    for fn_a, fn_b in [
        (chunk_gated_delta_rule, chunk_gated_delta_rule),
        (recurrent_gated_delta_rule, recurrent_gated_delta_rule),
        (chunk_gated_delta_rule, recurrent_gated_delta_rule),  # prefill then decode, as the model runs
    ]:
        o1, s1 = fn_a(*(part(x, first) for x in (q, k, v, g, beta)), s0)
        o2, s2 = fn_b(*(part(x, second) for x in (q, k, v, g, beta)), s1)
        assert max_err(torch.cat([o1, o2], dim=1), o_all) < 1e-10
        assert max_err(s2, s_all) < 1e-10


def test_empty_sequence_returns_initial_state():
    q, k, v, g, beta, s0 = make_inputs(2, 0, 2, 4)
    for fn in (chunk_gated_delta_rule, recurrent_gated_delta_rule, naive_gated_delta_rule):
        o, s = fn(q, k, v, g, beta, s0)
        assert o.shape == (2, 0, 4, V_DIM)
        assert torch.equal(s, s0)
        o, s = fn(q, k, v, g, beta)
        assert torch.equal(s, torch.zeros_like(s0))


@pytest.mark.parametrize("fn", [chunk_gated_delta_rule, recurrent_gated_delta_rule])
def test_inputs_not_modified(fn):
    inputs = make_inputs(2, 20, 2, 4, dtype=torch.float32)
    copies = [x.clone() for x in inputs]
    with torch.no_grad():  # the recurrent form updates its state in place when autograd is off
        fn(*inputs)
    for x, c in zip(inputs, copies, strict=True):
        assert torch.equal(x, c)


def test_bf16_inputs_give_float32_results():
    inputs = make_inputs(2, 70, 2, 4, dtype=torch.bfloat16, seed=3)
    o_ref, s_ref = naive_gated_delta_rule(*[x.double() for x in inputs])
    for o, s in (chunk_gated_delta_rule(*inputs), recurrent_gated_delta_rule(*inputs)):
        assert o.dtype == torch.float32 and s.dtype == torch.float32
        # The math runs in float32 on the bf16 values, so the result is float32-accurate, not bf16-accurate.
        assert max_err(o, o_ref) < 1e-4 and max_err(s, s_ref) < 1e-4
    # A float32 cached state with bf16 activations (the model's decode case) stays float32.
    _, s = recurrent_gated_delta_rule(*inputs[:5], inputs[5].float())
    assert s.dtype == torch.float32


def _grads(fn, inputs):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    o, s = fn(*leaves)
    gen = torch.Generator().manual_seed(1)
    # Random cotangents so every output element matters.
    loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
    loss = loss + (s * torch.randn(s.shape, generator=gen, dtype=s.dtype)).sum()
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize(
    "name,fn",
    [
        ("chunk16", lambda *x: chunk_gated_delta_rule(*x, chunk_size=16)),
        ("chunk64", chunk_gated_delta_rule),
        ("recurrent", recurrent_gated_delta_rule),
    ],
)
def test_gradients_match_naive(name, fn):
    inputs = make_inputs(1, 37, 2, 4, seed=11)
    ref = _grads(naive_gated_delta_rule, inputs)
    got = _grads(fn, inputs)
    for arg, a, b in zip(["q", "k", "v", "g", "beta", "initial_state"], got, ref, strict=True):
        assert torch.isfinite(a).all(), (name, arg)
        # Measured: <= 1.5e-14.
        assert max_err(a, b) < 1e-9, (name, arg)


def test_chunk_gradcheck_tiny():
    inputs = [x.requires_grad_(True) for x in make_inputs(1, 5, 1, 2, seed=5, dk=3, dv=2)]
    assert torch.autograd.gradcheck(lambda *x: chunk_gated_delta_rule(*x, chunk_size=2), inputs, fast_mode=True)


def test_recurrent_no_grad_path_matches_grad_path():
    inputs = make_inputs(2, 6, 2, 4, dtype=torch.float32, seed=9)
    with torch.no_grad():
        o1, s1 = recurrent_gated_delta_rule(*inputs)
    leaves = [x.clone().requires_grad_(True) for x in inputs]
    o2, s2 = recurrent_gated_delta_rule(*leaves)
    assert o2.requires_grad and s2.requires_grad
    assert max_err(o1, o2) < 1e-6 and max_err(s1, s2) < 1e-6


@pytest.mark.parametrize("fn", [chunk_gated_delta_rule, recurrent_gated_delta_rule])
def test_bad_shapes_raise(fn):
    q, k, v, g, beta, s0 = make_inputs(1, 4, 2, 4)
    with pytest.raises(ValueError, match="multiple"):
        fn(q, k, v[:, :, :3], g[:, :, :3], beta[:, :, :3])
    with pytest.raises(ValueError, match="initial_state"):
        fn(q, k, v, g, beta, s0.transpose(-1, -2))  # a [V, K] state is refused
    with pytest.raises(ValueError, match="beta"):
        fn(q, k, v, g, beta[:, :3])
    with pytest.raises(ValueError, match="k must"):
        fn(q, k[..., :8], v, g, beta)


def test_bad_chunk_size_raises():
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_gated_delta_rule(*make_inputs(1, 4, 2, 4), chunk_size=0)
