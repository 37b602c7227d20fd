"""Partial rotary position embedding (rotate-half inside the first `rotary_dim` dims), with optional YaRN."""

from __future__ import annotations

import math

import torch

from ..config import RopeConfig


def rope_inv_freq(rope: RopeConfig, rotary_dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies `[rotary_dim // 2]` (fp32) and the cos/sin scale (YaRN's attention factor, else 1)."""
    idx = torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim
    inv_freq = 1.0 / (rope.theta ** idx)
    if rope.rope_type != "yarn":
        return inv_freq, 1.0
    factor = rope.factor
    original = rope.original_max_position_embeddings or max_position_embeddings

    def mscale_of(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rope.attention_factor is not None:
        attention_factor = rope.attention_factor
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = mscale_of(factor, rope.mscale) / mscale_of(factor, rope.mscale_all_dim)
    else:
        attention_factor = mscale_of(factor)

    def correction_dim(num_rotations: float) -> float:
        return rotary_dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # ramp = 0: keep the original frequency (extrapolate, high-frequency dims); ramp = 1: divide by the factor.
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    return inv_freq, attention_factor


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables `[N, rotary_dim]` for integer positions `[N]`; angles in fp32, cast to `dtype` at the end."""
    angles = positions.to(torch.float32)[:, None] * inv_freq.to(positions.device)[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype), sin.to(dtype)


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first `cos.shape[-1]` dims of the last axis; the rest pass through.

    x: [N, heads, head_dim]; cos, sin: [N, rotary_dim].
    """
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2:]
    c, s = cos[:, None, :], sin[:, None, :]
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat((x_rot * c + rotated * s, x_pass), dim=-1)
