"""Norm modules holding HF-named weights; the math lives in ops/norm.py."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.norm import rms_norm_gated, rms_norm_zero_centered


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: gain = 1 + weight, weight initialised to 0."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_zero_centered(x, self.weight, self.eps)


class GatedRMSNorm(nn.Module):
    """DeltaNet output norm: plain gain (init 1) times silu(z)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return rms_norm_gated(x, z, self.weight, self.eps)
