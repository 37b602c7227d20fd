"""Gated full attention: per-head [query | gate] projection, q/k zero-centred norm, partial RoPE, GQA,
sigmoid output gate before o_proj."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..config import Qwen3NextConfig
from ..ops.dispatch import enabled, fast_decode, native_kernels, uses_context_split
from ..ops.norm import rms_norm_zero_centered
from ..ops.rope import apply_partial_rope
from .batch import ForwardContext
from .layout import KVSpec
from .linear import Linear
from .norm import RMSNorm

KERNEL_KV_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # K/V caches the decode attention kernel reads


def uses_native_decode_attention(q: torch.Tensor, kv, pool: torch.Tensor, is_decode: bool) -> bool:
    """The "native_decode_attention" fast path (ops.dispatch): a decode step reading K/V by index, or a step whose
    K/V rows are given per query (`KVAccess.per_query`), fp32 queries on a CPU, a cache of fp32, bf16 or fp16."""
    return ((is_decode or kv.per_query) and kv.read_index is not None and kv.key_lens is not None
            and pool.dtype in KERNEL_KV_DTYPES and q.dtype == torch.float32 and pool.device.type == "cpu"
            and fast_decode()
            and enabled("native_decode_attention") and native_kernels(q))


def attention_over_rows(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, rows: torch.Tensor,
                        lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per row of `rows`: q [N, H, Dh] attends the keys and values at pool rows rows[n, :lens[n]] ([N, L]
    rows, lens [N]) -> [N, H, Dh]. Torch's SDPA over the gathered rows with a key mask: the device form of
    `kernels.decode_attention` (a GPU's decode step, where the whole step is a fixed-shape CUDA graph; its twin is
    `kernels.decode_attention_reference`)."""
    H, HKV = q.shape[1], k_pool.shape[1]
    k = k_pool[rows].to(q.dtype).transpose(1, 2)  # [N, HKV, L, Dh]
    v = v_pool[rows].to(q.dtype).transpose(1, 2)
    mask = (torch.arange(rows.shape[1], device=rows.device)[None, :] < lens[:, None])[:, None, None, :]  # [N,1,1,L]
    o = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask, scale=scale, enable_gqa=H != HKV)
    return o.squeeze(2)


def context_split_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: list[int],
                            context_lens: list[int]) -> torch.Tensor:
    """Causal attention of new tokens over their sequence's cached context and themselves, without a mask.

    q [B, H, T, Dh] (sequence b's n_b = seq_lens[b] queries first, padding after), k, v [B, HKV, L, Dh] (its
    c_b = context_lens[b] cached keys, then its n_b new ones). Per sequence two flash-attention calls: the queries
    over the context keys (all visible) and over the new keys (SDPA's causal form), each returning its log-sum-exp,
    merged exactly: o = (e^lse1 o1 + e^lse2 o2) / (e^lse1 + e^lse2). Memory O(T x Dh) per head besides K/V: no
    [T, L] mask or score matrix, whatever the context length. Twin: SDPA with the explicit [B, 1, T, L] mask.
    Padded query rows come back zero."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    out = q.new_zeros(q.shape)
    for b, (n, c) in enumerate(zip(seq_lens, context_lens)):
        qb = q[b:b + 1, :, :n]
        o_new, lse_new = flash(qb, k[b:b + 1, :, c:c + n], v[b:b + 1, :, c:c + n], is_causal=True)
        if c == 0:
            out[b, :, :n] = o_new[0]
            continue
        o_ctx, lse_ctx = flash(qb, k[b:b + 1, :, :c], v[b:b + 1, :, :c])
        top = torch.maximum(lse_ctx, lse_new)
        w_ctx, w_new = (lse_ctx - top).exp_().unsqueeze(-1), (lse_new - top).exp_().unsqueeze(-1)  # [1, H, n, 1]
        merged = (o_ctx.float() * w_ctx).addcmul_(o_new.float(), w_new).div_(w_ctx + w_new)
        out[b, :, :n] = merged[0].to(q.dtype)
    return out


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

    def _keys_values(self, x: torch.Tensor, ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [N, D] -> the keys (normed, rotated) and values [N, HKV, Dh] of these positions."""
        N, HKV, Dh = x.shape[0], self.num_kv_heads, self.head_dim
        k = rms_norm_zero_centered(self.k_proj(x).view(N, HKV, Dh), self.k_norm.weight, self.eps)
        return apply_partial_rope(k, ctx.cos, ctx.sin), self.v_proj(x).view(N, HKV, Dh)

    def write_kv(self, x: torch.Tensor, ctx: ForwardContext) -> None:
        """Only the cache side of `forward`: write these positions' keys and values into `ctx`'s cache (what a later
        query reads), without the queries, the attention and the output."""
        k, v = self._keys_values(x, ctx)
        kv = ctx.batch.kv
        kv.write(ctx.cache.k[self.cache_key], k)
        kv.write(ctx.cache.v[self.cache_key], v)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x: [N, D] -> [N, D]."""
        N = x.shape[0]
        H, HKV, Dh = self.num_heads, self.num_kv_heads, self.head_dim
        q, gate = self.q_proj(x).view(N, H, 2 * Dh).chunk(2, dim=-1)
        q = rms_norm_zero_centered(q, self.q_norm.weight, self.eps)
        k, v = self._keys_values(x, ctx)
        q = apply_partial_rope(q, ctx.cos, ctx.sin)

        tokens, cache = ctx.batch.tokens, ctx.cache
        qp = tokens.pad(q).transpose(1, 2)  # [B, H, T, Dh]
        if cache is not None:
            kv = ctx.batch.kv
            k_pool, v_pool = cache.k[self.cache_key], cache.v[self.cache_key]
            kv.write(k_pool, k)
            kv.write(v_pool, v)
            if uses_native_decode_attention(q, kv, k_pool, tokens.is_decode):
                o = kernels.decode_attention(q, k_pool, v_pool, kv.read_index, kv.key_lens, Dh ** -0.5)  # [N, H, Dh]
                return self.o_proj(o.reshape(N, H * Dh) * torch.sigmoid(gate.reshape(N, H * Dh)))
            if kv.per_query:  # rows per query: the kernel's twin on a CPU, SDPA over the gathered rows elsewhere
                attend = kernels.decode_attention_reference if q.device.type == "cpu" else attention_over_rows
                o = attend(q, k_pool, v_pool, kv.read_index, kv.key_lens, Dh ** -0.5)
                return self.o_proj(o.reshape(N, H * Dh) * torch.sigmoid(gate.reshape(N, H * Dh)))
            kp = kv.read(k_pool).transpose(1, 2).to(q.dtype)  # [B, HKV, L, Dh]
            vp = kv.read(v_pool).transpose(1, 2).to(q.dtype)
            sees_all_keys = kv.sees_all_keys
            split = (not sees_all_keys and not tokens.is_uniform and qp.device.type == "cpu"
                     and uses_context_split(kv.batch_size, tokens.padded_len, kv.kv_len))
            mask = None if sees_all_keys or tokens.is_uniform or split else kv.mask
        else:
            kp, vp = tokens.pad(k).transpose(1, 2), tokens.pad(v).transpose(1, 2)
            mask, sees_all_keys, split = tokens.mask, False, False
        if sees_all_keys:
            o = F.scaled_dot_product_attention(qp, kp, vp, enable_gqa=H != HKV)
        elif split:
            o = context_split_attention(qp, kp, vp, kv.seq_lens, kv.context_lens)
        elif mask is None or tokens.is_uniform:  # fresh equal-length prompts: SDPA's causal mask is exact
            o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=H != HKV)
        else:
            o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, enable_gqa=H != HKV)
        o = tokens.unpad(o.transpose(1, 2)).reshape(N, H * Dh)  # [N, H*Dh]
        o = o * torch.sigmoid(gate.reshape(N, H * Dh))
        return self.o_proj(o)
