"""Gated full attention: per-head [query | gate] projection, q/k zero-centred norm, partial RoPE, GQA,
sigmoid output gate before o_proj."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Qwen3NextConfig
from ..ops.norm import rms_norm_zero_centered
from ..ops.rope import apply_partial_rope
from .batch import ForwardContext
from .layout import KVSpec
from .linear import Linear
from .norm import RMSNorm


class GatedAttention(nn.Module):
    def __init__(self, config: Qwen3NextConfig, cache_key: str):
        super().__init__()
        self.cache_key = cache_key
        self.num_heads, self.num_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                            config.head_dim)
        D, H, HKV, Dh = config.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        self.eps = config.rms_norm_eps
        # q_proj rows are laid out per head as [query (Dh) | gate (Dh)], exactly as in the checkpoint.
        self.q_proj = Linear(D, H * Dh * 2, bias=False)
        self.k_proj = Linear(D, HKV * Dh, bias=False)
        self.v_proj = Linear(D, HKV * Dh, bias=False)
        self.o_proj = Linear(H * Dh, D, bias=False)
        self.q_norm = RMSNorm(Dh, config.rms_norm_eps)
        self.k_norm = RMSNorm(Dh, config.rms_norm_eps)

    @staticmethod
    def declare_kv(num_kv_heads: int, head_dim: int) -> KVSpec:
        """The paged K/V a layer holding `num_kv_heads` (local) key/value heads keeps per token."""
        return KVSpec(num_kv_heads, head_dim)

    def kv_spec(self) -> KVSpec:
        return self.declare_kv(self.num_kv_heads, self.head_dim)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x: [N, D] -> [N, D]."""
        N = x.shape[0]
        H, HKV, Dh = self.num_heads, self.num_kv_heads, self.head_dim
        q, gate = self.q_proj(x).view(N, H, 2 * Dh).chunk(2, dim=-1)
        q = rms_norm_zero_centered(q, self.q_norm.weight, self.eps)
        k = rms_norm_zero_centered(self.k_proj(x).view(N, HKV, Dh), self.k_norm.weight, self.eps)
        v = self.v_proj(x).view(N, HKV, Dh)
        q = apply_partial_rope(q, ctx.cos, ctx.sin)
        k = apply_partial_rope(k, ctx.cos, ctx.sin)

        tokens, cache = ctx.batch.tokens, ctx.cache
        qp = tokens.pad(q).transpose(1, 2)  # [B, H, T, Dh]
        if cache is not None:
            kv = ctx.batch.kv
            k_pool, v_pool = cache.k[self.cache_key], cache.v[self.cache_key]
            kv.write(k_pool, k)
            kv.write(v_pool, v)
            kp = kv.read(k_pool).transpose(1, 2).to(q.dtype)  # [B, HKV, L, Dh]
            vp = kv.read(v_pool).transpose(1, 2).to(q.dtype)
            mask, sees_all_keys = kv.mask, kv.sees_all_keys
        else:
            kp, vp = tokens.pad(k).transpose(1, 2), tokens.pad(v).transpose(1, 2)
            mask, sees_all_keys = tokens.mask, False
        if sees_all_keys:
            o = F.scaled_dot_product_attention(qp, kp, vp, enable_gqa=H != HKV)
        elif mask is None or tokens.is_uniform:  # fresh equal-length prompts: SDPA's causal mask is exact
            o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=H != HKV)
        else:
            o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, enable_gqa=H != HKV)
        o = tokens.unpad(o.transpose(1, 2)).reshape(N, H * Dh)  # [N, H*Dh]
        o = o * torch.sigmoid(gate.reshape(N, H * Dh))
        return self.o_proj(o)
