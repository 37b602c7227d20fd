"""Gated DeltaNet: linear attention with a delta-rule recurrent state.

Per token t and value head: q, k come from a causal depthwise conv (kernel W) + SiLU, are L2-normalised (q also
scaled by 1/sqrt(K)); the state S [K, V] decays by exp(g_t) with g_t = -exp(A_log) * softplus(a_t + dt_bias), then
takes the delta-rule update S += k_t (beta_t (v_t - S^T k_t))^T with beta_t = sigmoid(b_t); the output S^T q_t goes
through an RMSNorm gated by SiLU(z_t). The state is fixed-size per sequence: conv state [C, W-1], recurrent [HV, K, V].

Weight layout note: the checkpoint interleaves `in_proj_qkvz` per key-head group ([q|k|v v|z z]) and `in_proj_ba`
per group ([b b|a a]). The loader (checkpoint.py) de-interleaves them ONCE into the logical order used here:
`in_proj_qkvz` rows = [all q heads | all k heads | all v heads | all z heads], `in_proj_ba` rows = [all b | all a].
Then the conv input [q|k|v] is one contiguous slice, matching `conv1d.weight`'s channel order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..config import Qwen3NextConfig
from ..ops.conv import causal_conv1d, causal_conv1d_update
from ..ops.dispatch import fast_decode, native_kernels, threshold
from ..ops.gated_delta import chunk_gated_delta_rule, gated_delta_step, recurrent_gated_delta_rule
from ..ops.norm import l2_normalize
from .batch import ForwardContext, StateRows
from .layout import StateSpec
from .linear import Linear
from .norm import GatedRMSNorm


def conv_states_per_token(state: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The conv state after each of T new input frames: state [B, C, W-1] (oldest first), x [B, T, C] ->
    [B, T, C, W-1], entry t holding the last W-1 frames of [state, x[:, :t + 1]] in the state's dtype."""
    return _conv_windows(_conv_frames(state, x), state.shape[-1], x.shape[1])


def _conv_frames(state: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[state, x] along time: [B, C, W-1+T] in the state's dtype."""
    return torch.cat([state, x.to(state.dtype).transpose(1, 2)], dim=-1)


def _conv_windows(frames: torch.Tensor, length: int, T: int) -> torch.Tensor:
    """The `length` frames ending at each of the last T frames: frames [B, C, F] -> [B, T, C, length] (a view)."""
    return frames.unfold(-1, length, 1)[:, :, -T:].transpose(1, 2)


def _delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                init: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The delta rule over padded [B, T, ...] inputs in its fastest available form: (outputs, final state)."""
    if native_kernels(q) and (init is None or init.dtype == torch.float32):
        return kernels.gated_delta_rule(q, k, v, g, beta, init)
    if q.shape[1] <= threshold("delta_rule_token_loop"):  # the token loop beats the chunked form for short inputs
        return recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=init)
    return chunk_gated_delta_rule(q, k, v, g, beta, initial_state=init)


def _delta_rule_with_snapshots(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                               beta: torch.Tensor, init: torch.Tensor, seq_lens: list[int],
                               snapshots: list[tuple[int, int, int]],
                               pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`_delta_rule`, also storing sequence b's state after its first m tokens in `pool[slot]` for every
    `(b, m, slot)` of `snapshots` (prefix caching).

    The rule runs in segments cut at the snapshot offsets: first every sequence up to its first cut (the tokens after
    it get beta = 0 and g = 0, which leaves the state exactly as it is, as padding does), then, for the sequences with
    cuts, each further segment gathered into a small padded batch starting from the state the previous one ended
    at. Every token is fed once per segment it belongs to, so the outputs and final states are those of one pass."""
    B, T = q.shape[:2]
    cuts: dict[int, list[int]] = {}
    for b, m, _ in snapshots:
        cuts.setdefault(b, []).append(m)
    bounds = {b: sorted(set(ms) | {seq_lens[b]}) for b, ms in cuts.items()}  # segment ends per cut sequence
    ends = [bounds[b][0] if b in bounds else seq_lens[b] for b in range(B)]
    T0 = max(ends)  # the first pass stops where the longest first segment does
    live = (torch.arange(T0, device=q.device)[None, :] < torch.tensor(ends, device=q.device)[:, None]).unsqueeze(-1)
    o0, final = _delta_rule(q[:, :T0], k[:, :T0], v[:, :T0], g[:, :T0].where(live, 0), beta[:, :T0].where(live, 0),
                            init)
    o = o0 if T0 == T else torch.cat([o0, o0.new_zeros(B, T - T0, *o0.shape[2:])], dim=1)
    state = {b: final[b].clone() for b in bounds}  # the state at each cut sequence's latest segment end
    stored = {}  # (b, m) -> its state, for snapshots at equal offsets
    for step in range(1, max(len(e) for e in bounds.values()) + 1):
        for b in bounds:
            if step - 1 < len(bounds[b]):
                stored[(b, bounds[b][step - 1])] = state[b]
        seg = [(b, bounds[b][step - 1], bounds[b][step]) for b in bounds if step < len(bounds[b])]
        if not seg:
            break
        o_seg, f_seg = _delta_rule(*(_gather_segments(x, seg) for x in (q, k, v, g, beta)),
                                   torch.stack([state[b] for b, _, _ in seg]))
        for i, (b, s, e) in enumerate(seg):
            o[b, s:e] = o_seg[i, :e - s]
            state[b] = f_seg[i]
            final[b] = f_seg[i]
    for b, m, slot in snapshots:
        pool[slot].copy_(stored[(b, m)])
    return o, final


def _gather_segments(x: torch.Tensor, seg: list[tuple[int, int, int]]) -> torch.Tensor:
    """Tokens [s, e) of sequence b for each (b, s, e) of `seg`, right-padded with zeros: [len(seg), max e - s, ...]
    (zero beta and g past a segment's end leave the state untouched)."""
    out = x.new_zeros(len(seg), max(e - s for _, s, e in seg), *x.shape[2:])
    for i, (b, s, e) in enumerate(seg):
        out[i, :e - s] = x[b, s:e]
    return out


class GatedDeltaNet(nn.Module):
    def __init__(self, config: Qwen3NextConfig, cache_key: str):
        super().__init__()
        self.cache_key = cache_key
        self.num_k_heads, self.num_v_heads = config.linear_num_key_heads, config.linear_num_value_heads
        self.head_k_dim, self.head_v_dim = config.linear_key_head_dim, config.linear_value_head_dim
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.kernel_size = config.linear_conv_kernel_dim
        D = config.hidden_size
        self.in_proj_qkvz = Linear(D, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = Linear(D, 2 * self.num_v_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel_size, groups=self.conv_dim, bias=False,
                                padding=self.kernel_size - 1)
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_v_heads).uniform_(0.01, 16).log())
        self.norm = GatedRMSNorm(self.head_v_dim, config.rms_norm_eps)
        self.out_proj = Linear(self.value_dim, D, bias=False)

    @staticmethod
    def declare_state(num_k_heads: int, num_v_heads: int, head_k_dim: int, head_v_dim: int,
                      kernel_size: int) -> tuple[StateSpec, ...]:
        """The per-sequence state of a layer holding these (local) heads: the last W-1 conv inputs of the q|k|v
        channels, and the recurrent state of every value head."""
        conv_dim = 2 * num_k_heads * head_k_dim + num_v_heads * head_v_dim
        return (StateSpec("conv", (conv_dim, kernel_size - 1), "activation"),
                StateSpec("recurrent", (num_v_heads, head_k_dim, head_v_dim), "state"))

    def state_specs(self) -> tuple[StateSpec, ...]:
        return self.declare_state(self.num_k_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim,
                                  self.kernel_size)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x: [N, D] -> [N, D]."""
        tokens = ctx.batch.tokens
        conv_rows, rec_rows = ctx.state(self.cache_key, "conv"), ctx.state(self.cache_key, "recurrent")
        # The decode step updates the recurrent state in place, so it needs the state stored in the dtype it computes
        # in (fp32, or wider activations); any other combination takes the general path below.
        capture = ctx.captures_states
        fast_state = rec_rows is not None and rec_rows.pool.dtype == torch.promote_types(x.dtype, torch.float32)
        snapshots = ctx.batch.snapshots if conv_rows is not None else None
        if fast_state and tokens.is_decode and fast_decode() and not capture and not snapshots:
            return self._decode_step(x, conv_rows, rec_rows)
        if fast_state and capture and tokens.pad_index is None and fast_decode():
            return self._verify_step(x, conv_rows, rec_rows, ctx)
        N = x.shape[0]
        H, HV, K, V = self.num_k_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim
        qkvz = self.in_proj_qkvz(x)
        qkv, z = qkvz[:, : self.conv_dim], qkvz[:, self.conv_dim:]
        b, a = self.in_proj_ba(x).chunk(2, dim=-1)  # [N, HV] each
        weight = self.conv1d.weight.squeeze(1)  # [C, W]

        if conv_rows is not None and tokens.is_decode and not capture and not snapshots:
            qkv = causal_conv1d_update(qkv, weight, conv_rows.read()).unsqueeze(1)  # [B, 1, C]
            conv_rows.commit()
        else:
            init = conv_rows.read() if conv_rows is not None else None
            qkv_in = tokens.pad(qkv)
            for i, m, slot in snapshots or ():  # the last W-1 conv inputs after m new tokens
                w = init.shape[-1]
                conv_rows.pool[slot].copy_(_conv_frames(init[i:i + 1], qkv_in[i:i + 1, max(0, m - w):m])[0, :, -w:])
            qkv, new_state = causal_conv1d(qkv_in, weight, init, lengths=tokens.seq_lens)  # [B, T, C]
            if capture:
                ctx.captured[(self.cache_key, "conv")] = conv_states_per_token(init, qkv_in)
            elif conv_rows is not None:
                conv_rows.commit(new_state)

        Bsz, T = qkv.shape[:2]
        q, k, v = qkv.float().split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = l2_normalize(q.reshape(Bsz, T, H, K)) * K ** -0.5
        k = l2_normalize(k.reshape(Bsz, T, H, K))
        v = v.reshape(Bsz, T, HV, V)
        beta = tokens.pad(torch.sigmoid(b.float()))  # padded steps get beta = 0 and g = 0: the state is untouched
        g = tokens.pad(-torch.exp(self.A_log.float()) * F.softplus(a.float() + self.dt_bias.float()))

        init = rec_rows.read() if rec_rows is not None else None
        if capture:  # the state after every token, for speculative verification (short inputs only)
            states = torch.empty(Bsz, T, HV, K, V, dtype=rec_rows.pool.dtype, device=x.device)
            o, _ = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=init, states_out=states)
            ctx.captured[(self.cache_key, "recurrent")] = states
        elif snapshots:
            o, final = _delta_rule_with_snapshots(q, k, v, g, beta, init, ctx.batch.seq_lens, snapshots, rec_rows.pool)
        else:
            o, final = _delta_rule(q, k, v, g, beta, init)
        if rec_rows is not None and not capture:
            rec_rows.commit(final)

        o = tokens.unpad(o)  # [N, HV, V] fp32
        o = self.norm(o, z.reshape(N, HV, V)).reshape(N, HV * V)
        return self.out_proj(o)

    def _decode_step(self, x: torch.Tensor, conv_rows: StateRows, rec_rows: StateRows) -> torch.Tensor:
        """Fast path for one new token per sequence (inference): the same math as `forward` in about a third of the
        ops, with the conv and recurrent states updated in place in the cache when the slots are consecutive."""
        B = x.shape[0]
        H, HV, K, V = self.num_k_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim
        qkvz = self.in_proj_qkvz(x)
        b, a = self.in_proj_ba(x).chunk(2, dim=-1)  # [B, HV] each
        weight = self.conv1d.weight.view(self.conv_dim, -1)
        qkv = causal_conv1d_update(qkvz[:, : self.conv_dim], weight, conv_rows.read())
        conv_rows.commit()
        dtype = rec_rows.pool.dtype
        qk = l2_normalize(qkv[:, : 2 * self.key_dim].to(dtype).view(B, 2 * H, K))  # q and k heads normalised at once
        q, k = qk[:, :H] * K ** -0.5, qk[:, H:]
        v = qkv[:, 2 * self.key_dim:].view(B, HV, V)
        beta = torch.sigmoid(b.to(dtype))
        g = F.softplus(a.to(dtype) + self.dt_bias.to(dtype)).mul_(torch.exp(self.A_log.to(dtype)).neg_())
        if native_kernels(q) and dtype == torch.float32:  # in C++, in place in the pool rows (no gather, no copy back)
            o = kernels.gated_delta_decode(q, k, v.to(dtype), g, beta, rec_rows.pool, rec_rows.slots.index)
        else:
            o = gated_delta_step(q, k, v, g, beta, rec_rows.read())
            rec_rows.commit()
        z = qkvz[:, self.conv_dim:].reshape(B, HV, V)
        return self.out_proj(self.norm(o, z).reshape(B, HV * V))

    def _verify_step(self, x: torch.Tensor, conv_rows: StateRows, rec_rows: StateRows,
                     ctx: ForwardContext) -> torch.Tensor:
        """Fast path for a speculative verification: T (a few) new tokens per sequence, the same T for all, every
        token's conv and recurrent state kept in `ctx.captured` and nothing committed (the caller commits the
        accepted one). The decode step's math, T times, on a copy of the state; its twin is `forward`'s general
        path with `capture_states`."""
        B, T = ctx.batch.tokens.batch_size, ctx.batch.tokens.padded_len
        H, HV, K, V, C = self.num_k_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim, self.conv_dim
        qkvz = self.in_proj_qkvz(x)
        b, a = self.in_proj_ba(x).chunk(2, dim=-1)  # [N, HV] each
        conv_state = conv_rows.read()  # [B, C, W-1]
        width = conv_state.shape[-1] + 1
        dtype = rec_rows.pool.dtype
        frames = _conv_frames(conv_state, qkvz[:, :C].view(B, T, C))
        weight = self.conv1d.weight.view(C, width).to(dtype)
        qkv = F.silu((_conv_windows(frames.to(dtype), width, T) * weight).sum(-1))  # [B, T, C]
        ctx.captured[(self.cache_key, "conv")] = _conv_windows(frames, width - 1, T)
        qk = l2_normalize(qkv[..., : 2 * self.key_dim].reshape(B, T, 2 * H, K))
        q, k = qk[:, :, :H] * K ** -0.5, qk[:, :, H:]
        v = qkv[..., 2 * self.key_dim:].reshape(B, T, HV, V)
        beta = torch.sigmoid(b.to(dtype)).view(B, T, HV)
        g = F.softplus(a.to(dtype) + self.dt_bias.to(dtype)).mul_(torch.exp(self.A_log.to(dtype)).neg_()).view(B, T, HV)
        if native_kernels(q) and dtype == torch.float32:  # one native call: every token's state, eager or traced
            o, states = kernels.gated_delta_verify(q, k, v, g, beta, rec_rows.read())
            ctx.captured[(self.cache_key, "recurrent")] = states
            o = o.view(B * T, HV, V)
        else:
            states = torch.empty(T, B, HV, K, V, dtype=dtype, device=x.device)  # token-major: each step's contiguous
            states[0].copy_(rec_rows.read())
            outs = []
            for t in range(T):
                if t:
                    states[t].copy_(states[t - 1])
                outs.append(gated_delta_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], states[t]))
            ctx.captured[(self.cache_key, "recurrent")] = states.transpose(0, 1)
            o = torch.stack(outs, dim=1).view(B * T, HV, V)
        z = qkvz[:, C:].reshape(B * T, HV, V)
        return self.out_proj(self.norm(o, z).reshape(B * T, HV * V))
