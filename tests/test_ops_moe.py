"""Grouped-by-expert MoE vs the plain loop reference, routing numerics, and the module against a hand-written sum."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwen3next.ops.moe import experts_grouped, experts_reference, route_topk


@pytest.mark.parametrize("N,E,k", [(1, 5, 2), (7, 6, 3), (64, 13, 4), (3, 16, 10)])
def test_grouped_equals_reference(N, E, k):
    gen = torch.Generator().manual_seed(N * 100 + E)
    D, inter = 12, 10
    x = torch.randn(N, D, generator=gen)
    gate_up = torch.randn(E, 2 * inter, D, generator=gen)
    down = torch.randn(E, D, inter, generator=gen)
    weights, ids = route_topk(torch.randn(N, E, generator=gen), k, True)
    fast = experts_grouped(x, weights, ids, gate_up, down)
    ref = experts_reference(x, weights, ids, gate_up, down)
    assert (fast - ref).abs().max() < 1e-4
    # and against a per-token, per-choice loop: sum_j w_j * down_e(silu(gate_e x) * up_e x) over the k choices
    manual = torch.zeros(N, D)
    for n in range(N):
        for j in range(k):
            e = ids[n, j]
            h = F.silu(gate_up[e, :inter] @ x[n]) * (gate_up[e, inter:] @ x[n])
            manual[n] += weights[n, j] * (down[e] @ h)
    assert (fast - manual).abs().max() < 1e-4


def test_routing_softmax_topk_renormalised():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [5.0, -1.0, 5.0, 0.0]])
    w, ids = route_topk(logits, 2, True)
    assert ids[0].tolist() == [3, 2]
    assert torch.allclose(w[0], torch.softmax(torch.tensor([3.0, 2.0]), 0))
    assert torch.allclose(w.sum(-1), torch.ones(2))
    w2, _ = route_topk(logits, 2, False)
    assert torch.allclose(w2[0], torch.softmax(logits[0], 0)[[3, 2]])


def test_only_hit_experts_are_touched():
    """Experts that receive no token are never read: poisoning them with NaN must not change the output."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, generator=gen)
    gate_up, down = torch.randn(9, 12, 8, generator=gen), torch.randn(9, 8, 6, generator=gen)
    ids = torch.tensor([[0, 2], [2, 5], [0, 5], [5, 2]])
    w = torch.rand(4, 2, generator=gen)
    ref = experts_grouped(x, w, ids, gate_up, down)
    for e in (1, 3, 4, 6, 7, 8):
        gate_up[e] = float("nan")
        down[e] = float("nan")
    assert torch.equal(experts_grouped(x, w, ids, gate_up, down), ref)


def test_grouped_is_differentiable():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 6, generator=gen, requires_grad=True)
    gate_up = torch.randn(4, 8, 6, generator=gen, requires_grad=True)
    down = torch.randn(4, 6, 4, generator=gen, requires_grad=True)
    w, ids = route_topk(torch.randn(5, 4, generator=gen), 2, True)
    experts_grouped(x, w, ids, gate_up, down).square().sum().backward()
    gx, gg = x.grad.clone(), gate_up.grad.clone()
    x.grad = gate_up.grad = down.grad = None
    experts_reference(x, w, ids, gate_up, down).square().sum().backward()
    assert torch.allclose(gx, x.grad, atol=1e-4) and torch.allclose(gg, gate_up.grad, atol=1e-4)
