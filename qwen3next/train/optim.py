"""The learning-rate schedule and the optimizer.

- LR: linear warmup to `--lr`, then cosine to `--lr * --min-lr-ratio`; a pure function of the step.
- Optimizer: AdamW with fp32 master weights. Weight decay applies to every matrix (projections, stacked experts,
  routers, conv kernels, lm_head) and to the zero-centred RMSNorm weights (they store `gain - 1`, so decay pulls
  gains toward 1). It does NOT apply to the embedding (rare tokens would decay to zero between their rare updates),
  to the DeltaNet `A_log` / `dt_bias` (per-head dynamics constants, where 0 has no special meaning), or to the plain
  gain of the gated norm `linear_attn.norm.weight` (decay would pull it toward 0).
"""

from __future__ import annotations

import math

import torch


def lr_at(step: int, max_steps: int, lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay to `lr * min_lr_ratio` at `max_steps`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def is_decayed(name: str) -> bool:
    """Weight-decay policy (see the module docstring)."""
    if name.endswith(("A_log", "dt_bias", "linear_attn.norm.weight", "embed_tokens.weight")):
        return False
    return True  # matrices, stacked experts, conv kernels, zero-centred norm offsets


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                   betas: tuple[float, float]) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if is_decayed(name) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8)

