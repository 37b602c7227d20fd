"""Gated full attention (SPEC §4): per-head [query | gate] projection, q/k zero-centred norm, partial RoPE, GQA,
sigmoid output gate before o_proj."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Qwen3NextConfig
from ..ops.norm import rms_norm_zero_centered
from ..ops.rope import apply_partial_rope
from .cache import ForwardContext
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

        batch, cache = ctx.batch, ctx.cache
        qp = batch.pad(q).transpose(1, 2)  # [B, H, T, Dh]
        if cache is not None:
            k_pool, v_pool = cache.k[self.cache_key], cache.v[self.cache_key]
            k_pool.index_copy_(0, batch.kv_write_index, k.to(k_pool.dtype))
            v_pool.index_copy_(0, batch.kv_write_index, v.to(v_pool.dtype))
            kp = batch.kv_rows(k_pool).transpose(1, 2).to(q.dtype)  # [B, HKV, L, Dh]
            vp = batch.kv_rows(v_pool).transpose(1, 2).to(q.dtype)
        else:
            kp, vp = batch.pad(k).transpose(1, 2), batch.pad(v).transpose(1, 2)
        if batch.sees_all_keys:
            o = F.scaled_dot_product_attention(qp, kp, vp, enable_gqa=H != HKV)
        elif batch.attn_mask is None or batch.is_uniform:  # fresh equal-length prompts: SDPA's causal mask is exact
            o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=H != HKV)
        else:
            o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=batch.attn_mask, enable_gqa=H != HKV)
        o = batch.unpad(o.transpose(1, 2)).reshape(N, H * Dh)  # [N, H*Dh]
        o = o * torch.sigmoid(gate.reshape(N, H * Dh))
        return self.o_proj(o)
