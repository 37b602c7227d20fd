"""Gated delta rule (the Gated DeltaNet recurrence) in three forms.

Per value head j, with state S in R^{K x V} (key rows, value columns) and q/k head j // (HV // H):

    S̄_t = exp(g_t) S_{t-1};  u_t = beta_t (v_t - S̄_tᵀ k_t);  S_t = S̄_t + k_t u_tᵀ;  o_t = S_tᵀ q_t

- `chunk_gated_delta_rule`: WY / UT-transform chunked form for prefill and training (parallel inside a chunk).
- `recurrent_gated_delta_rule`: token loop vectorised over batch and heads, for short inputs (T of a few).
- `gated_delta_step`: ONE token, state updated in place; the decode fast path (its twin is the recurrent form).
- `naive_gated_delta_rule`: the recurrence written out literally; the reference the tests compare against.

q and k must already be L2-normalised, and q scaled by 1/sqrt(K); these ops do no normalisation. All math runs in
float32 (float64 when any input is float64), and outputs and final states come back in that dtype.
"""

import torch
from torch import Tensor

__all__ = ["chunk_gated_delta_rule", "recurrent_gated_delta_rule", "gated_delta_step", "naive_gated_delta_rule"]


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, initial_state: Tensor | None) -> None:
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, K], got shape {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    b, t, h, dk = q.shape
    if v.dim() != 4 or v.shape[:2] != (b, t):
        raise ValueError(f"v must be [B={b}, T={t}, HV, V], got shape {tuple(v.shape)}")
    hv, dv = v.shape[2], v.shape[3]
    if hv % h != 0:
        raise ValueError(f"v's head count HV={hv} must be a multiple of q/k's head count H={h}")
    if g.shape != (b, t, hv):
        raise ValueError(f"g must be [B, T, HV] = {(b, t, hv)}, got {tuple(g.shape)}")
    if beta.shape != (b, t, hv):
        raise ValueError(f"beta must be [B, T, HV] = {(b, t, hv)}, got {tuple(beta.shape)}")
    if initial_state is not None and initial_state.shape != (b, hv, dk, dv):
        raise ValueError(f"initial_state must be [B, HV, K, V] = {(b, hv, dk, dv)}, got {tuple(initial_state.shape)}")


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    # float32 at least (bf16/fp16 inputs are upcast); float64 stays float64 so tests can check tightly.
    dtype = torch.float32
    for x in tensors:
        if x is not None:
            dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def _initial_state(
    initial_state: Tensor | None, b: int, hv: int, dk: int, dv: int, q: Tensor, dtype: torch.dtype
) -> Tensor:
    if initial_state is None:
        return q.new_zeros(b, hv, dk, dv, dtype=dtype)
    return initial_state.to(dtype)


def chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    initial_state: Tensor | None = None,
    chunk_size: int = 32,
) -> tuple[Tensor, Tensor]:
    """Chunked gated delta rule (WY representation: a chunk's updates folded into one low-rank product);
    differentiable w.r.t. every tensor input.

    Args:
        q, k: [B, T, H, K], L2-normalised (q also scaled by 1/sqrt(K)).
        v: [B, T, HV, V]; HV is a multiple of H and value head j reads q/k head j // (HV // H).
        g: [B, T, HV] log decay (<= 0).  beta: [B, T, HV] write strength in (0, 1).
        initial_state: [B, HV, K, V] or None for zeros.
        chunk_size: tokens per chunk; the sequence is padded with g = 0, beta = 0 tokens, which leave the state alone.
            32 measured fastest on CPU (2 threads, T = 4096 / 2048): 1.26x faster than 64 at the `small` preset's
            head sizes (8/16 heads of 64), 1.15x at the 80B model's (16/32 heads of 128); 16 and 128 are slower.

    Returns:
        o: [B, T, HV, V] and final_state: [B, HV, K, V], both float32 (float64 for float64 inputs).
    """
    _check_inputs(q, k, v, g, beta, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype = _compute_dtype(q, k, v, g, beta, initial_state)
    b, t, h, dk = q.shape
    hv, dv = v.shape[2], v.shape[3]
    grp = hv // h
    state = _initial_state(initial_state, b, hv, dk, dv, q, dtype)
    if t == 0:
        return v.new_zeros(b, 0, hv, dv, dtype=dtype), state.clone() if initial_state is not None else state

    c = min(chunk_size, t)  # any chunk size gives the same result; do not pad a short prompt up to 64
    n = -(-t // c)
    pad = n * c - t

    def chunked(x: Tensor, n_head_dims: int) -> Tensor:
        # [B, T, *heads, *rest] -> contiguous [N, B, *heads, C, *rest] in the compute dtype, zero-padded at the end.
        # Chunk index first keeps the per-chunk slices of the loop contiguous.
        x = x.to(dtype)
        if pad:
            x = torch.cat([x, x.new_zeros(b, pad, *x.shape[2:])], dim=1)
        x = x.reshape(b, n, c, *x.shape[2:])
        heads_end = 3 + n_head_dims
        return x.permute(1, 0, *range(3, heads_end), 2, *range(heads_end, x.dim())).contiguous()

    # q/k keep their H heads with a broadcast group axis of 1 (measured faster than repeat_interleave to HV heads);
    # v, g and beta split HV into (H, G).
    qc = chunked(q, 1).unsqueeze(3)  # [N, B, H, 1, C, K]
    kc = chunked(k, 1).unsqueeze(3)  # [N, B, H, 1, C, K]
    vc = chunked(v.reshape(b, t, h, grp, dv), 2)  # [N, B, H, G, C, V]
    gc = chunked(g.reshape(b, t, h, grp), 2)  # [N, B, H, G, C]
    bc = chunked(beta.reshape(b, t, h, grp), 2)  # [N, B, H, G, C]

    gam = gc.cumsum(-1)  # in-chunk cumulative log decay (decreasing)
    lower = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    # Mask the upper triangle BEFORE exp: gam_r - gam_s > 0 there and can overflow.
    decay = (gam.unsqueeze(-1) - gam.unsqueeze(-2)).masked_fill(~lower, float("-inf")).exp()  # D: [N, B, H, G, C, C]
    kt = kc.transpose(-1, -2)
    big_l = ((kc @ kt) * decay * bc.unsqueeze(-1)).tril(-1)  # strict_lower(diag(beta) (K Kᵀ ⊙ D))
    attn = (qc @ kt) * decay  # (Q Kᵀ) ⊙ D, lower triangle including the diagonal
    # UT transform T = (I + L)^-1. Inverting against the identity and multiplying was measured faster on CPU than
    # solving directly for the K+V right-hand sides, and than a blocked 16x16 forward substitution.
    eye = torch.eye(c, dtype=dtype, device=q.device)
    t_mat = torch.linalg.solve_triangular(big_l, eye, upper=False, unitriangular=True)
    eg = gam.exp()
    w = t_mat @ (kc * (bc * eg).unsqueeze(-1))  # W = T diag(beta e^gam) K: [N, B, H, G, C, K]
    u = t_mat @ (vc * bc.unsqueeze(-1))  # U = T diag(beta) V: [N, B, H, G, C, V]
    q_dec = qc * eg.unsqueeze(-1)  # diag(e^gam) Q
    k_dec = (kc * (gam[..., -1:] - gam).exp().unsqueeze(-1)).transpose(-1, -2)  # Kᵀ diag(e^(gam_C - gam))
    chunk_decay = gam[..., -1].exp()[..., None, None]  # e^gam_C: [N, B, H, G, 1, 1]

    s = state.reshape(b, h, grp, dk, dv)
    outs = []
    for i in range(n):
        v_new = u[i] - w[i] @ s  # pseudo-values corrected for the incoming state
        outs.append(q_dec[i] @ s + attn[i] @ v_new)
        s = s * chunk_decay[i] + k_dec[i] @ v_new
    o = torch.stack(outs).permute(1, 0, 4, 2, 3, 5).reshape(b, n * c, hv, dv)  # [B, N*C, HV, V]
    return o[:, :t], s.reshape(b, hv, dk, dv)


def recurrent_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    initial_state: Tensor | None = None,
    states_out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Token-by-token gated delta rule, vectorised over batch and heads; for decode steps.

    Shapes and dtypes as in `chunk_gated_delta_rule`: q, k [B, T, H, K]; v [B, T, HV, V]; g, beta [B, T, HV];
    initial_state [B, HV, K, V] or None. Returns o [B, T, HV, V] and final_state [B, HV, K, V].

    `states_out` [B, T, HV, K, V] (no autograd): also store the state after EVERY token there (speculative
    verification keeps the one after the last accepted token).
    """
    _check_inputs(q, k, v, g, beta, initial_state)
    dtype = _compute_dtype(q, k, v, g, beta, initial_state)
    b, t, h, dk = q.shape
    hv, dv = v.shape[2], v.shape[3]
    grp = hv // h
    s = _initial_state(initial_state, b, hv, dk, dv, q, dtype).reshape(b, h, grp, dk, dv)
    if t == 0:
        return v.new_zeros(b, 0, hv, dv, dtype=dtype), s.reshape(b, hv, dk, dv).clone()
    # Without autograd the state is updated in place after the first (copying) step: fresh multi-MiB state tensors
    # per token were measured several times slower at decode batch sizes.
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, g, beta, s))
    if states_out is not None and (needs_grad or states_out.shape != (b, t, hv, dk, dv)):
        raise ValueError(f"states_out: expected a [B, T, HV, K, V] = {(b, t, hv, dk, dv)} tensor and no autograd, got "
                         f"{tuple(states_out.shape)}")
    q, k = q.to(dtype), k.to(dtype)
    kq = torch.stack([k, q], dim=3).unsqueeze(3)  # [B, T, H, 1, 2, K]: read S with k and q in one matmul
    qk_dot = (q * k).sum(-1)[..., None, None]  # [B, T, H, 1, 1]
    vs = v.to(dtype).reshape(b, t, h, grp, dv)
    alphas = g.to(dtype).exp().reshape(b, t, h, grp, 1)
    betas = beta.to(dtype).reshape(b, t, h, grp, 1)
    outs = []
    for i in range(t):
        # With S_new = a S + k uᵀ: S̄ᵀk = a (Sᵀk) and S_newᵀq = a (Sᵀq) + (q·k) u,
        # so S is read once (by k and q together) before it is written.
        a = alphas[:, i]  # [B, H, G, 1]
        r = kq[:, i] @ s  # [B, H, G, 2, V]
        u = betas[:, i] * (vs[:, i] - a * r[..., 0, :])  # [B, H, G, V]
        outs.append(a * r[..., 1, :] + qk_dot[:, i] * u)
        k_col = k[:, i, :, None, :, None]  # [B, H, 1, K, 1]
        if needs_grad:
            s = torch.addcmul(s * a.unsqueeze(-1), k_col, u.unsqueeze(-2))
        elif i == 0:
            s = (s * a.unsqueeze(-1)).addcmul_(k_col, u.unsqueeze(-2))  # the first step copies: inputs stay untouched
        else:
            s.mul_(a.unsqueeze(-1)).addcmul_(k_col, u.unsqueeze(-2))
        if states_out is not None:
            states_out[:, i].copy_(s.reshape(b, hv, dk, dv))
    return torch.stack(outs, dim=1).reshape(b, t, hv, dv), s.reshape(b, hv, dk, dv)


def gated_delta_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor) -> Tensor:
    """One decode token for B sequences, updating `state` IN PLACE; no autograd, no copies of the state.

    q, k: [B, H, K] (normalised as for the other forms); v: [B, HV, V]; g, beta: [B, HV]; state: [B, HV, K, V],
    contiguous, in the compute dtype (fp32 or fp64) — typically a view of the cache's slot pool. Returns o [B, HV, V]
    in the state's dtype. Same math as `recurrent_gated_delta_rule` with T = 1 (its reference twin), in ~12 ops.
    """
    b, h, dk = q.shape
    hv, dv = v.shape[1], v.shape[2]
    if k.shape != q.shape or v.shape[0] != b or hv % h or g.shape != (b, hv) or beta.shape != (b, hv):
        raise ValueError(f"gated_delta_step: expected q, k [B, H, K], v [B, HV, V], g, beta [B, HV]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {tuple(g.shape)}, {tuple(beta.shape)}")
    if state.shape != (b, hv, dk, dv) or not state.is_contiguous():
        raise ValueError(f"state must be a contiguous [B, HV, K, V] = {(b, hv, dk, dv)}, got {tuple(state.shape)}")
    dtype, grp = state.dtype, hv // h
    s = state.view(b, h, grp, dk, dv)
    a = g.to(dtype).exp().view(b, h, grp, 1)
    k = k.to(dtype)
    kq = torch.stack((k, q.to(dtype)), dim=2).unsqueeze(2)  # [B, H, 1, 2, K]
    r = kq @ s  # [B, H, G, 2, V]: Sᵀk and Sᵀq with one read of S
    u = (v.to(dtype).view(b, h, grp, dv) - a * r[..., 0, :]).mul_(beta.to(dtype).view(b, h, grp, 1))
    qk = (kq[..., 0, :] * kq[..., 1, :]).sum(-1, keepdim=True)  # [B, H, 1, 1]
    o = torch.addcmul(a * r[..., 1, :], qk, u)  # S_newᵀq = a Sᵀq + (q·k) u
    s.mul_(a.unsqueeze(-1)).addcmul_(k.view(b, h, 1, dk, 1), u.unsqueeze(-2))
    return o.view(b, hv, dv)


def naive_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Reference: the recurrence above written per batch row, value head and token. Slow; tests only.

    Shapes and dtypes as in `chunk_gated_delta_rule`.
    """
    _check_inputs(q, k, v, g, beta, initial_state)
    dtype = _compute_dtype(q, k, v, g, beta, initial_state)
    b, t, h, dk = q.shape
    hv, dv = v.shape[2], v.shape[3]
    q, k, v, g, beta = (x.to(dtype) for x in (q, k, v, g, beta))
    o = q.new_zeros(b, t, hv, dv, dtype=dtype)
    final = q.new_zeros(b, hv, dk, dv, dtype=dtype)
    for bi in range(b):
        for j in range(hv):
            qk_head = j // (hv // h)
            s = q.new_zeros(dk, dv, dtype=dtype) if initial_state is None else initial_state[bi, j].to(dtype)
            for ti in range(t):
                kt, qt, vt = k[bi, ti, qk_head], q[bi, ti, qk_head], v[bi, ti, j]
                s = torch.exp(g[bi, ti, j]) * s
                u = beta[bi, ti, j] * (vt - s.T @ kt)
                s = s + torch.outer(kt, u)
                o[bi, ti, j] = s.T @ qt
            final[bi, j] = s
    return o, final
