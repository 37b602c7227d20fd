"""Routed-expert computation for the sparse MoE block: grouped by expert (fast) and a plain loop (reference)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .. import kernels
from .dispatch import fast_decode, native_kernels, sync_free, threshold


def route_topk(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts in fp32, then top-k (renormalised when `norm_topk_prob`).

    router_logits: [N, E]. Returns (weights [N, k] fp32, expert ids [N, k] int64).
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids


def grouped_swiglu(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, num_experts: int,
                   gate_up: Callable[[torch.Tensor, int], torch.Tensor],
                   down: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """Σ_k w[n,k] · SwiGLU_{ids[n,k]}(x[n]), computing only the experts that received tokens.

    x: [N, D]; weights, ids: [N, k]. `gate_up(x_e, e)` -> [n_e, 2I] (gate, then up) and `down(h_e, e)` -> [n_e, D]
    apply expert e's matrices (plain or quantized). Token-expert pairs are sorted by expert so each hit expert runs
    one GEMM over all of its tokens. Returns [N, D] in x's dtype (accumulated in fp32).
    """
    N, D = x.shape
    k = ids.shape[1]
    flat_ids = ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    token_of_pair = order // k  # pair p = n * k + j  ->  token n
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    xs = x[token_of_pair]  # [N*k, D], grouped by expert
    ws = weights.reshape(-1)[order]
    out_sorted = torch.empty(N * k, D, dtype=torch.float32, device=x.device)
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        g, u = gate_up(xs[start:start + c], e).chunk(2, dim=-1)
        out_sorted[start:start + c] = down(F.silu(g) * u, e).float() * ws[start:start + c, None]
        start += c
    out = torch.zeros(N, D, dtype=torch.float32, device=x.device)
    out.index_add_(0, token_of_pair, out_sorted)
    return out.to(x.dtype)


def experts_grouped(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up_proj: torch.Tensor,
                    down_proj: torch.Tensor) -> torch.Tensor:
    """`grouped_swiglu` over stacked weights: gate_up_proj [E, 2I, D] (gate rows, then up), down_proj [E, D, I].

    At inference (no autograd), a few fp32 tokens on CPU run the native kernel `qwen3next::moe` (one call,
    "native_moe" in `ops.dispatch`; it also takes bf16-stored experts). Otherwise two faster forms of the same sum run:
    a few pairs gather their experts' weights into one bmm (`_experts_gathered`), more go through torch's grouped GEMM
    (`_experts_grouped_mm`). Their entries in `ops.dispatch` ("experts_gathered", "experts_grouped_mm") hold the
    threshold and the measurements."""
    if fast_decode() and x.shape[0] <= threshold("native_moe") and gate_up_proj.dtype in kernels.FLOAT_FORMATS \
            and gate_up_proj.is_contiguous() and down_proj.is_contiguous() and native_kernels(x):
        fmt = kernels.FLOAT_FORMATS[gate_up_proj.dtype]
        return kernels.moe(x, weights, ids, gate_up_proj, None, down_proj, None, fmt)
    if gate_up_proj.dtype != x.dtype:  # bf16-stored experts, fp32 compute: convert only the experts that are hit
        if sync_free(x):  # compiled or captured: each pair's matrices gathered (and converted)
            return _experts_gathered(x, weights, ids, gate_up_proj, down_proj)
        return grouped_swiglu(x, weights, ids, gate_up_proj.shape[0],
                              lambda s, e: F.linear(s, gate_up_proj[e].to(x.dtype)),
                              lambda h, e: F.linear(h, down_proj[e].to(x.dtype)))
    if fast_decode():
        # Compiled or captured in a CUDA graph: the gathered form for any batch (sync-free; `_grouped_mm` has no fp32
        # meta kernel).
        if ids.numel() <= threshold("experts_gathered") or sync_free(x):
            return _experts_gathered(x, weights, ids, gate_up_proj, down_proj)
        if _HAS_GROUPED_MM and x.device.type == "cpu":
            return _experts_grouped_mm(x, weights, ids, gate_up_proj, down_proj)
    return grouped_swiglu(x, weights, ids, gate_up_proj.shape[0], lambda s, e: F.linear(s, gate_up_proj[e]),
                          lambda h, e: F.linear(h, down_proj[e]))


_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def _experts_gathered(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up_proj: torch.Tensor,
                      down_proj: torch.Tensor) -> torch.Tensor:
    """Decode form: copy each pair's expert matrices together (`index_select` streams them at full memory
    bandwidth, where one small GEMV per expert does not) and run ONE batched matmul per projection. ~10 ops, no
    host sync. Experts stored in another dtype (bf16 storage) are converted after the gather. x [N, D] -> [N, D]."""
    flat_ids = ids.reshape(-1)
    return swiglu_per_pair(x, weights, gate_up_proj.index_select(0, flat_ids).to(x.dtype).transpose(1, 2),
                           down_proj.index_select(0, flat_ids).to(x.dtype).transpose(1, 2))


def swiglu_per_pair(x: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Σ_j w[n,j] · SwiGLU(x[n]) with pair p = n * k + j's own matrices, as two bmm: gate_up [N*k, D, 2I] (gate
    columns, then up), down [N*k, I, D], both laid out for `x @ W`. Accumulated in fp32; returns [N, D] in x's dtype."""
    N, D = x.shape
    k = weights.shape[1]
    xs = x.repeat_interleave(k, dim=0).unsqueeze(1)  # [N*k, 1, D]
    g, u = torch.bmm(xs, gate_up).chunk(2, dim=-1)
    y = torch.bmm(F.silu(g) * u, down).float()  # [N*k, 1, D]
    return (y.view(N, k, D) * weights.view(N, k, 1).float()).sum(1).to(x.dtype)


def _experts_grouped_mm(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up_proj: torch.Tensor,
                        down_proj: torch.Tensor) -> torch.Tensor:
    """Pairs sorted by expert, then ONE grouped GEMM per projection (`torch._grouped_mm`, whose CPU form loops over
    the groups in C++): a fixed ~15 ops per layer instead of ~8 per hit expert, and no host sync."""
    N, D = x.shape
    k, E = ids.shape[1], gate_up_proj.shape[0]
    flat_ids = ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    token_of_pair = order // k
    offsets = torch.bincount(flat_ids, minlength=E).cumsum(0).to(torch.int32)  # end row of each expert's group
    g, u = torch._grouped_mm(x[token_of_pair], gate_up_proj.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(g) * u, down_proj.transpose(1, 2), offs=offsets).float()
    y.mul_(weights.reshape(-1)[order, None])
    out = torch.zeros(N, D, dtype=torch.float32, device=x.device)
    out.index_add_(0, token_of_pair, y)
    return out.to(x.dtype)


def experts_reference(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up_proj: torch.Tensor,
                      down_proj: torch.Tensor) -> torch.Tensor:
    """Plain reference twin of `experts_grouped`: every expert, every token, with a mask."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(gate_up_proj.shape[0]):
        w = (weights * (ids == e)).sum(-1)  # [N], zero for tokens not routed to e
        gate, up = F.linear(x, gate_up_proj[e]).chunk(2, dim=-1)
        out += F.linear(F.silu(gate) * up, down_proj[e]).float() * w[:, None]
    return out.to(x.dtype)
