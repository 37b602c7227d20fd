"""Training losses: next-token CE, MTP CE (token t+2), the Switch-Transformer router load-balancing loss, and one
function that runs the model on a batch of packed windows and returns all of them.

Total loss = lm + mtp_weight · mtp + aux_coef · aux.

The aux loss pools the router logits of every main MoE layer AND of the MTP layer's MoE: the MTP experts need
balancing just as much, and pooling (as transformers does across layers) simply adds the MTP layer's tokens to the
counts. transformers has no MTP, so on a model without one the two definitions agree exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.batch import BatchInfo
from ..model.qwen3_next import Qwen3NextForCausalLM


def shifted_cross_entropy(logits: torch.Tensor, tokens: torch.Tensor, shift: int) -> torch.Tensor:
    """Mean CE where `logits[:, t]` predicts `tokens[:, t + shift]`, over every row t that has a target.

    logits: [B, L, V]; tokens: [B, S] (int64). Computed in fp32 whatever the logits dtype.
    """
    if logits.ndim != 3 or tokens.ndim != 2 or logits.shape[0] != tokens.shape[0]:
        raise ValueError(f"logits [B, L, V] and tokens [B, S] expected, got {tuple(logits.shape)} and "
                         f"{tuple(tokens.shape)}")
    rows = min(logits.shape[1], tokens.shape[1] - shift)
    if rows < 1:
        raise ValueError(f"tokens: {tokens.shape[1]} tokens leave no target at shift {shift}")
    lg = logits[:, :rows].reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(lg, tokens[:, shift:shift + rows].reshape(-1))


def lm_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token CE: logits [B, L, V] at position t predict tokens [B, S] at t + 1."""
    return shifted_cross_entropy(logits, tokens, 1)


def mtp_loss(mtp_logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """MTP CE: MTP logits [B, L, V] at position t (main hidden at t + embedding of t+1) predict tokens [B, S] at t+2."""
    return shifted_cross_entropy(mtp_logits, tokens, 2)


def load_balancing_loss(router_logits: Sequence[torch.Tensor], num_experts: int, top_k: int) -> torch.Tensor:
    """Switch-Transformer balance loss E · Σ_e f_e · P̄_e, pooled over the tokens of all layers.

    router_logits: per MoE layer, [N_layer, E]. f_e = fraction of tokens whose top-k contains e (Σ_e f_e = k),
    P̄_e = mean full-softmax probability of e (fp32). Equals transformers' `load_balancing_loss_func` (no mask).
    Gradients flow through P̄ only. A perfectly uniform router gives k.
    """
    if not router_logits:
        raise ValueError("router_logits: expected at least one [N, E] tensor")
    counts = torch.zeros(num_experts, dtype=torch.float32, device=router_logits[0].device)
    prob_sum = torch.zeros(num_experts, dtype=torch.float32, device=router_logits[0].device)
    rows = 0
    for logits in router_logits:
        if logits.ndim != 2 or logits.shape[1] != num_experts:
            raise ValueError(f"router_logits: expected [N, {num_experts}] tensors, got {tuple(logits.shape)}")
        probs = torch.softmax(logits.float(), dim=-1)
        top = torch.topk(probs, top_k, dim=-1).indices
        counts = counts + torch.bincount(top.reshape(-1), minlength=num_experts).float()
        prob_sum = prob_sum + probs.sum(0)
        rows += logits.shape[0]
    return num_experts * torch.sum((counts / rows) * (prob_sum / rows))


@dataclass
class LossOutput:
    total: torch.Tensor  # the scalar to back-propagate
    lm: torch.Tensor
    mtp: torch.Tensor | None  # None when the model has no MTP head or mtp_weight is 0 (unless forced)
    aux: torch.Tensor | None  # None when the model has no MoE layer
    mtp_correct: int = 0  # top-1 hits of the MTP head (only when `with_accuracy`)
    mtp_count: int = 0
    lm_correct: int = 0
    lm_count: int = 0


def compute_losses(model: Qwen3NextForCausalLM, windows: torch.Tensor, mtp_weight: float, aux_coef: float,
                   with_accuracy: bool = False) -> LossOutput:
    """Run the model (and its MTP head) on packed windows [B, T + 1] and return the losses.

    The main model reads tokens 0..T-1 and predicts 1..T; the MTP head reads the main hidden state at t and token
    t+1 (t = 0..T-2) and predicts t+2, so every one of its rows has a target inside the window.
    """
    B, L = windows.shape
    T = L - 1
    cfg = model.config
    inputs = windows[:, :T]
    ctx = model.context(BatchInfo([T] * B), router_logits=[])
    h = model.hidden_states(inputs.reshape(-1), ctx)  # [B*T, D]
    logits = model.lm_head(h).view(B, T, -1)
    lm = lm_loss(logits, windows)
    router = list(ctx.router_logits)
    out = LossOutput(total=lm, lm=lm, mtp=None, aux=None)
    use_mtp = model.mtp is not None and (mtp_weight > 0 or with_accuracy)
    if use_mtp:
        D = h.shape[-1]
        mctx = model.context(BatchInfo([T - 1] * B), router_logits=[])
        hm = model.mtp_hidden(h.view(B, T, D)[:, :-1].reshape(-1, D), windows[:, 1:T].reshape(-1), mctx)
        mtp_logits = model.lm_head(hm).view(B, T - 1, -1)
        out.mtp = mtp_loss(mtp_logits, windows)
        out.total = out.total + mtp_weight * out.mtp
        router += mctx.router_logits
        if with_accuracy:
            out.mtp_correct = int((mtp_logits.argmax(-1) == windows[:, 2:]).sum())
            out.mtp_count = B * (T - 1)
    if router:
        out.aux = load_balancing_loss(router, cfg.num_experts, cfg.num_experts_per_tok)
        out.total = out.total + aux_coef * out.aux
    if with_accuracy:
        out.lm_correct = int((logits.argmax(-1) == windows[:, 1:]).sum())
        out.lm_count = B * T
    return out
