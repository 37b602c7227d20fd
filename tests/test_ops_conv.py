import pytest
import torch

from qwen3next.ops.conv import causal_conv1d, causal_conv1d_update, naive_causal_conv1d

C = 6


def make(b, t, width, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, C, generator=gen, dtype=torch.float64).to(dtype)
    w = torch.randn(C, width, generator=gen, dtype=torch.float64).to(dtype)
    state = torch.randn(b, C, width - 1, generator=gen, dtype=torch.float64).to(dtype)
    return x, w, state


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


@pytest.mark.parametrize("width", [4, 2])
@pytest.mark.parametrize("t", [1, 2, 3, 5, 17])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("activation", [True, False])
def test_matches_naive(width, t, with_state, activation):
    x, w, state = make(2, t, width, seed=t)
    state = state if with_state else None
    y, new_state = causal_conv1d(x, w, state, activation=activation)
    y_ref, state_ref = naive_causal_conv1d(x, w, state, activation=activation)
    assert y.shape == (2, t, C) and new_state.shape == (2, C, width - 1)
    assert max_err(y, y_ref) < 1e-12
    assert torch.equal(new_state, state_ref)  # the state is a copy of input frames, so exact


def test_naive_follows_the_formula():
    # y_t[c] = sum_j w[c, j] x_{t-W+1+j}[c], tap W-1 on the current token; checked by hand on one channel.
    x = torch.tensor([[[1.0], [2.0], [3.0]]], dtype=torch.float64)  # [1, 3, 1]
    w = torch.tensor([[10.0, 100.0, 1000.0]], dtype=torch.float64)  # [1, 3]
    state = torch.tensor([[[5.0, 7.0]]], dtype=torch.float64)  # [1, 1, 2], oldest first
    expected = torch.tensor([10 * 5 + 100 * 7 + 1000 * 1, 10 * 7 + 100 * 1 + 1000 * 2, 10 * 1 + 100 * 2 + 1000 * 3])
    for fn in (naive_causal_conv1d, causal_conv1d):
        y, new_state = fn(x, w, state, activation=False)
        assert torch.equal(y[0, :, 0], expected.double()), fn.__name__
        assert torch.equal(new_state, torch.tensor([[[2.0, 3.0]]], dtype=torch.float64)), fn.__name__


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_dtypes(dtype):
    x, w, state = make(2, 9, 4, dtype=dtype)
    y, new_state = causal_conv1d(x, w, state)
    assert y.dtype == dtype and new_state.dtype == dtype
    y_ref, state_ref = naive_causal_conv1d(x.double(), w.double(), state.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # float32 accumulation, then one rounding to the output dtype
    assert max_err(y, y_ref) < tol
    assert torch.equal(new_state.double(), state_ref)


@pytest.mark.parametrize("width", [4, 2])
@pytest.mark.parametrize("with_state", [False, True])
def test_lengths_match_rows_run_alone(width, with_state):
    t = 7
    x, w, state = make(5, t, width, seed=3)
    state = state if with_state else None
    lengths = torch.tensor([7, 0, 1, 2, 5])
    y, new_state = causal_conv1d(x, w, state, lengths=lengths)
    for row, n in enumerate(lengths.tolist()):
        row_state = None if state is None else state[row : row + 1]
        y_row, s_row = causal_conv1d(x[row : row + 1, :n], w, row_state)
        assert max_err(y[row : row + 1, :n], y_row) < 1e-12, row
        assert torch.equal(new_state[row : row + 1], s_row), row
    if state is not None:
        assert torch.equal(new_state[1], state[1])  # length 0 keeps its state
        assert torch.equal(new_state[2, :, :-1], state[2, :, 1:])  # length 1 shifts by one frame
        assert torch.equal(new_state[2, :, -1], x[2, 0])


@pytest.mark.parametrize("width", [4, 2])
def test_update_chain_equals_full_conv(width):
    x, w, state0 = make(2, 9, width, seed=4)
    y_full, state_full = causal_conv1d(x, w, state0)
    state = state0.clone()
    ys = [causal_conv1d_update(x[:, i], w, state) for i in range(x.shape[1])]
    assert max_err(torch.stack(ys, dim=1), y_full) < 1e-12
    assert torch.equal(state, state_full)  # updated in place


def test_prefill_then_update_equals_full_conv():
    x, w, _ = make(2, 10, 4, seed=5)
    y_full, state_full = causal_conv1d(x, w)
    y1, state = causal_conv1d(x[:, :6], w)
    ys = [causal_conv1d_update(x[:, i], w, state) for i in range(6, 10)]
    assert max_err(torch.cat([y1, torch.stack(ys, dim=1)], dim=1), y_full) < 1e-12
    assert torch.equal(state, state_full)


def test_inputs_not_modified_by_full_conv():
    x, w, state = make(2, 5, 4)
    copies = [t.clone() for t in (x, w, state)]
    causal_conv1d(x, w, state)
    for a, b in zip((x, w, state), copies, strict=True):
        assert torch.equal(a, b)


def test_gradients_match_naive():
    x, w, state = make(2, 6, 4, seed=6)
    cot = torch.randn(2, 6, C, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def grads(fn):
        leaves = [t.clone().requires_grad_(True) for t in (x, w, state)]
        y, _ = fn(*leaves)
        return torch.autograd.grad((y * cot).sum(), leaves)

    for a, b in zip(grads(causal_conv1d), grads(naive_causal_conv1d), strict=True):
        assert max_err(a, b) < 1e-12


def test_gradcheck():
    x, w, state = (t.requires_grad_(True) for t in make(1, 4, 3, seed=8))
    assert torch.autograd.gradcheck(lambda *a: causal_conv1d(*a)[0], (x, w, state))


def test_bad_inputs_raise():
    x, w, state = make(2, 5, 4)
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d(x, w[:3], state)
    with pytest.raises(ValueError, match="state"):
        causal_conv1d(x, w, state[..., :2])
    with pytest.raises(ValueError, match="lengths"):
        causal_conv1d(x, w, state, lengths=torch.tensor([1, 6]))
    with pytest.raises(ValueError, match="lengths"):
        causal_conv1d(x, w, state, lengths=torch.tensor([1]))
    with pytest.raises(ValueError, match="x must"):
        causal_conv1d_update(x, w, state)
