"""Sparse MoE block: softmax router -> top-k -> SwiGLU experts, plus a sigmoid-gated shared expert.
Also the dense SwiGLU MLP used by `mlp_only_layers`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Qwen3NextConfig
from ..ops.moe import experts_grouped, route_topk
from .batch import ForwardContext
from .linear import Linear


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, ctx: ForwardContext | None = None) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """All routed experts of a layer, stacked: gate_up_proj [E, 2I, D] (gate rows, then up rows), down_proj [E, D, I].

    The checkpoint stores experts one by one; the loader stacks them (checkpoint.py).
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return experts_grouped(x, weights, ids, self.gate_up_proj, self.down_proj)


class SparseMoE(nn.Module):
    def __init__(self, config: Qwen3NextConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        D = config.hidden_size
        self.gate = Linear(D, config.num_experts, bias=False)
        self.experts = Experts(config.num_experts, D, config.moe_intermediate_size)
        # Expert parallelism (parallel/): this module then holds only experts [start, stop) of the layer, and the
        # pairs routed elsewhere contribute nothing here. None: all experts.
        self.local_experts: tuple[int, int] | None = None
        self.has_shared = config.shared_expert_intermediate_size > 0
        if self.has_shared:
            self.shared_expert = MLP(D, config.shared_expert_intermediate_size)
            self.shared_expert_gate = Linear(D, 1, bias=False)

    def forward(self, x: torch.Tensor, ctx: ForwardContext | None = None) -> torch.Tensor:
        """x: [N, D] -> [N, D]."""
        logits = self.gate(x)  # [N, E] in the model dtype; softmax in fp32
        if ctx is not None and ctx.router_logits is not None:
            ctx.router_logits.append(logits)
        weights, ids = route_topk(logits, self.top_k, self.norm_topk_prob)
        if self.local_experts is None:
            out = self.experts(x, weights.to(x.dtype), ids)
        else:
            out = self._local_pairs(x, weights, ids)
        if self.has_shared:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out

    def _local_pairs(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The (token, expert) pairs whose expert lives here, each as a one-expert row, summed back per token."""
        start, stop = self.local_experts
        tok, k = ((ids >= start) & (ids < stop)).nonzero(as_tuple=True)
        out = x.new_zeros(x.shape)
        if tok.numel():
            y = self.experts(x.index_select(0, tok), weights[tok, k, None].to(x.dtype), (ids[tok, k] - start)[:, None])
            out.index_add_(0, tok, y)
        return out
