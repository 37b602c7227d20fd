"""Native CPU decode kernels (C++, built on first use) and their pure-torch twins.

Decode with a few tokens is a stream of weight reads: every step reads each active weight once. torch has no CPU
kernel that streams bf16-stored, int8 or int4 weights at memory bandwidth on machines without bf16 units (its int8
and int4 kernels want bf16 activations, a cast per call, and cost more per call than the bytes they save), so this
package adds these ops, registered with torch as `torch.ops.qwen3next.*` (opaque to torch.compile):

- `linear(x, w, aux, fmt, group_size)`: y = x · Wᵀ for x fp32 [M, K] (few rows) and W stored as fp32 (`fmt` 32),
  bf16 (16), int8 with a bf16 scale per output row (8; `aux` = scales [N]) or int4 (4; `aux` = scale_zero
  [K/G, N, 2] bf16, or coded group parameters uint8 [K/G + 2, N, 2] (quant/linear.py `coded_scale_zero`), the
  weight packed [N, K/2] with column 2j in the low nibble of byte j). int4's group size G comes from aux's shape
  (`group_size`, when not 0, must match it); the vector code takes G = 64k, and G = 32 or 16 when K % 64 == 0.
- `moe(x, weights, ids, gate_up, gate_up_aux, down, down_aux, fmt, group_size)`: the routed experts of a MoE layer
  over stacked weights [E, 2I, D] / [E, D, I] in one call (pairs grouped by expert; SwiGLU; weighted sum).
- `dequantize(w, aux, fmt, group_size)`: an int8 / int4 weight as fp32, in one pass (prefill: then one GEMM).
- `quantize_int4(w, group_size)`: fp32 weight -> int4 with the searched (scale, zero) grids (quant/linear.py).
- `gated_delta_rule(q, k, v, g, beta, state)`: a prompt's delta rule token by token (delta_rule.cpp);
  `gated_delta_verify(...)`: the same keeping every token's state (a speculative verification);
  `gated_delta_decode(q, k, v, g, beta, pool, slots)`: one decode token, the state updated in place in its pool row.
- `decode_attention(q, k_pool, v_pool, rows, lens, scale)`: a decode step's attention over paged K/V rows.

Numerics: fp32 activations and accumulation for fp32 and bf16 weights. For int4 weights the activations are
quantized per weight group to int8 (scale amax / 127, round half to even) and the constant part of each group uses
the exact fp32 sum of x:
    y[m, n] = Σ_g s[n,g] · d[m,g] · Σ_{k∈g} q[n,k] · c[m,k] + (z[n,g] - 8 s[n,g]) · Σ_{k∈g} x[m,k]
(c the activation codes, d their scale). For int8 weights (when K is a multiple of 32) the activations are quantized
the same way per block of 32 columns (`INT8_ACT_BLOCK`, llama.cpp's Q8_0 block), y[m, n] = s[n] · Σ_b d[m,b] ·
Σ_{k∈b} q[n,k] · c[m,k]; other K keep fp32 activations. That is what lets the dot products run as integer
multiply-adds (AVX2 maddubs: 32 products per instruction, against 8 fp32 FMAs), the trade llama.cpp makes for its
quantized formats. Every row is quantized on its own: its codes do not depend on the other rows.
`linear_reference` / `moe_reference` state this math in torch (fp64 accumulation) and are what the parity tests
compare against; the model-level reference is still the dequantized fp32 weight (quant/linear.py).

Build: `torch.utils.cpp_extension.load` with the system C++ compiler (and ninja), once per source and torch version,
cached under torch's extension directory (TORCH_EXTENSIONS_DIR): 15-20 s of compiler time the first time, a line on
stderr says so; a fraction of a second after. AVX2 + FMA is chosen at run time, with a scalar fallback
(`set_isa("scalar")` forces it for tests). `QWEN3NEXT_KERNELS=0` turns the ops off; without a compiler (or if the
build fails) `available()` is False after one warning and the torch paths run.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

KERNELS_ENV = "QWEN3NEXT_KERNELS"
FMT_F32, FMT_BF16, FMT_INT8, FMT_INT4 = 32, 16, 8, 4
FORMATS = (FMT_F32, FMT_BF16, FMT_INT8, FMT_INT4)
FLOAT_FORMATS = {torch.float32: FMT_F32, torch.bfloat16: FMT_BF16}  # the unquantized weight dtypes the ops take
INT8_ACT_BLOCK = 32  # int8 weights: activation codes per block of this many columns (when K is a multiple of it)
_SOURCES = (Path(__file__).with_name("decode_kernels.cpp"), Path(__file__).with_name("delta_rule.cpp"),
            Path(__file__).with_name("decode_attention.cpp"))
_HEADERS = (Path(__file__).with_name("isa.h"),)  # part of the build's identity, not compiled on their own

_enabled = os.environ.get(KERNELS_ENV, "1") != "0"
_loaded: bool | None = None  # None: not tried yet
_error: str | None = None
_lock = threading.Lock()


def enabled() -> bool:
    """Whether the kernels' switch is on (`QWEN3NEXT_KERNELS`, `set_enabled`); `available()` also builds them."""
    return _enabled


def set_enabled(on: bool) -> bool:
    """Turn the native kernels on or off for this process; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(on)
    return previous


def available() -> bool:
    """True when the switch is on and the extension is built and loaded (building it on the first call; under
    torch.compile only whether it was loaded before, so that tracing never enters the build)."""
    if torch.compiler.is_compiling():
        return _enabled and bool(_loaded)
    return _enabled and _load()


def load_error() -> str | None:
    """Why the extension could not be built or loaded (None if it was, or was never tried)."""
    return _error


def _load() -> bool:
    global _loaded, _error
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        try:
            from torch.utils import cpp_extension

            sources = b"".join(p.read_bytes() for p in (*_SOURCES, *_HEADERS))
            digest = hashlib.sha1(sources + torch.__version__.encode()).hexdigest()[:12]
            name = f"qwen3next_kernels_{digest}"
            build_dir = getattr(cpp_extension, "_get_build_directory", None)  # torch's own cache location
            built = Path(build_dir(name, verbose=False)) / f"{name}.so" if build_dir else None
            if built is not None and built.exists():  # built before: load it now (load() runs ninja to check, ~1-5 s)
                torch.ops.load_library(str(built))
            else:
                print("qwen3next: building the native CPU kernels (once per version, ~20-40 s; QWEN3NEXT_KERNELS=0 "
                      "skips them)", file=sys.stderr, flush=True)
                cpp_extension.load(name=name, sources=[str(p) for p in _SOURCES],
                                   extra_cflags=["-O3", "-fopenmp", "-std=c++17"], extra_ldflags=["-fopenmp"],
                                   is_python_module=False, verbose=False)
            _register_fakes()
            _loaded = True
        except Exception as exc:  # no compiler, no ninja, a failed build: fall back to torch, say why once
            _error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
            warnings.warn(f"qwen3next: native CPU kernels unavailable, using the torch paths ({_error})",
                          RuntimeWarning, stacklevel=3)
            _loaded = False
    return _loaded


def _register_fakes() -> None:
    """Shapes for torch.compile's tracing (the ops are opaque to it)."""

    @torch.library.register_fake("qwen3next::linear")
    def _linear_fake(x, w, aux, fmt, group_size):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("qwen3next::dequantize")
    def _dequantize_fake(w, aux, fmt, group_size):
        return w.new_empty(w.shape[0], w.shape[1] * (2 if fmt == FMT_INT4 else 1), dtype=torch.float32)

    @torch.library.register_fake("qwen3next::moe")
    def _moe_fake(x, weights, ids, gate_up, gate_up_aux, down, down_aux, fmt, group_size):
        return x.new_empty(x.shape)

    @torch.library.register_fake("qwen3next::decode_attention")
    def _attention_fake(q, k_pool, v_pool, rows, lens, scale):
        return q.new_empty(q.shape)

    @torch.library.register_fake("qwen3next::gated_delta_decode")
    def _delta_decode_fake(q, k, v, g, beta, pool, slots):
        return v.new_empty(v.shape[0], v.shape[1], v.shape[2])

    @torch.library.register_fake("qwen3next::gated_delta_rule")
    def _delta_fake(q, k, v, g, beta, state):
        return v.new_empty(v.shape), state.new_empty(state.shape)

    @torch.library.register_fake("qwen3next::gated_delta_verify")
    def _delta_verify_fake(q, k, v, g, beta, state):
        B, T, HV, V = v.shape
        return v.new_empty(B, T, HV, V), state.new_empty(B, T, HV, q.shape[3], V)


def set_isa(name: str) -> str:
    """Select "avx2" (the default where the CPU has it) or "scalar" code; returns the previous one."""
    if name not in ("avx2", "scalar"):
        raise ValueError(f"isa: expected 'avx2' or 'scalar', got {name!r}")
    if not _load():
        raise RuntimeError(f"native kernels unavailable: {_error}")
    return "avx2" if torch.ops.qwen3next.kernel_isa(1 if name == "avx2" else 0) == 1 else "scalar"


def _require() -> None:
    if not (_loaded or _load()):
        raise RuntimeError(f"native kernels unavailable: {_error}")


# ---- the ops -------------------------------------------------------------------------------------------------------
def linear(x: torch.Tensor, w: torch.Tensor, aux: torch.Tensor | None, fmt: int, group_size: int = 0) -> torch.Tensor:
    """x [..., K] fp32 @ W.T -> [..., N] fp32 through the native kernel (see the module docstring for the formats)."""
    _require()
    y = torch.ops.qwen3next.linear(x.reshape(-1, x.shape[-1]), w, aux, fmt, group_size)
    return y.view(*x.shape[:-1], y.shape[-1])


def moe(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up: torch.Tensor,
        gate_up_aux: torch.Tensor | None, down: torch.Tensor, down_aux: torch.Tensor | None, fmt: int,
        group_size: int = 0) -> torch.Tensor:
    """Σ_j weights[t,j] · SwiGLU_{ids[t,j]}(x[t]) over stacked experts, x [T, D] fp32 -> [T, D] fp32."""
    _require()
    return torch.ops.qwen3next.moe(x, weights.float(), ids.long(), gate_up, gate_up_aux, down, down_aux, fmt,
                                   group_size)


def dequantize(w: torch.Tensor, aux: torch.Tensor, fmt: int, group_size: int = 0) -> torch.Tensor:
    """The fp32 weight [N, K] of an int8 (`aux` = scales) or int4 (`aux` = scale_zero) weight, in one pass: for
    prefill-sized products, which then run as one fp32 GEMM (twin: `quant.linear.dequantize_int8 / _int4`)."""
    _require()
    return torch.ops.qwen3next.dequantize(w, aux, fmt, group_size)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w fp32 [N, K] (contiguous, CPU) -> int4 (canonical packed [N, K/2], scale, zero bf16 [N, K/G]) with each
    group's grid chosen by the search of `quant.linear.quantize_int4` (its torch twin: `quantize_int4_search`)."""
    _require()
    return torch.ops.qwen3next.quantize_int4(w, group_size)


def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule over T tokens, token by token, in C++ (delta_rule.cpp): fp32 q, k [B, T, H, K] (q/k
    normalised, q scaled, as for ops.gated_delta), v [B, T, HV, V], g, beta [B, T, HV], state [B, HV, K, V] or None
    (zeros; not modified). Returns o [B, T, HV, V] and the final state, fp32. Same math as `recurrent_gated_delta_rule`
    (the parity tests compare with the float64 recurrence); in the model it replaces `chunk_gated_delta_rule`."""
    _require()
    if state is None:
        state = q.new_zeros(q.shape[0], v.shape[2], q.shape[3], v.shape[3])
    return torch.ops.qwen3next.gated_delta_rule(q, k, v, g, beta, state)


def gated_delta_verify(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                       state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A speculative verification's T tokens per sequence through the gated delta rule, in C++ (delta_rule.cpp, the
    walk of `gated_delta_rule`): same inputs, state [B, HV, K, V] not modified. Returns o [B, T, HV, V] and the state
    after EVERY token, [B, T, HV, K, V], new fp32 tensors (functional: a traced verification can call it). Twin:
    `recurrent_gated_delta_rule(..., states_out=...)`."""
    _require()
    return torch.ops.qwen3next.gated_delta_verify(q, k, v, g, beta, state)


def gated_delta_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                       pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """One decode token per sequence through the gated delta rule, in C++ (delta_rule.cpp), the recurrent state
    updated IN PLACE in the pool: fp32 q, k [B, H, K] (normalised, q scaled), v [B, HV, V], g, beta [B, HV], pool
    [S, HV, K, V] contiguous, slots [B] int64 (distinct) -> o [B, HV, V]. Each state is read once and written once,
    where it lies (no gather, no copy back). Twin: `ops.gated_delta.gated_delta_step` on the gathered rows."""
    _require()
    return torch.ops.qwen3next.gated_delta_decode(q, k, v, g, beta, pool, slots)


def decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, rows: torch.Tensor,
                     lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per sequence over its paged K/V rows, in C++ (decode_attention.cpp): q [B, H, D] fp32, pools [R, HKV,
    D] fp32, bf16 or fp16 (both the same; widened to fp32 as read; H a multiple of HKV), rows [B, L] int64 pool rows
    of each key, lens [B] int64 keys per sequence (1..L; rows past it are not read) -> [B, H, D]. Nothing is
    gathered; each K/V row is read once per key/value head.
    Twin: `decode_attention_reference`."""
    _require()
    return torch.ops.qwen3next.decode_attention(q, k_pool, v_pool, rows, lens, scale)


# ---- pure-torch twins ----------------------------------------------------------------------------------------------
def quantize_activations(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] fp32 -> (codes [M, K] in -127..127 as fp32, scale d [M, K/G], exact group sums [M, K/G]): the int4
    kernel's activation quantization."""
    M, K = x.shape
    g = x.reshape(M, K // group_size, group_size)
    d = g.abs().amax(-1) / 127
    codes = torch.where(d[..., None] > 0, torch.round(g / d[..., None]), torch.zeros_like(g))
    return codes.reshape(M, K), d, g.sum(-1)


def linear_reference(x: torch.Tensor, w: torch.Tensor, aux: torch.Tensor | None, fmt: int,
                     group_size: int = 0) -> torch.Tensor:
    """The math of `linear` in torch (fp64), for the parity tests."""
    from ..quant.linear import dequantize_int8, int4_grid, unpack_int4  # (quant.linear imports this module)

    x2 = x.reshape(-1, x.shape[-1]).float()
    if fmt in (FMT_F32, FMT_BF16):
        y = x2.double() @ w.double().T
    elif fmt == FMT_INT8 and x2.shape[-1] % INT8_ACT_BLOCK == 0:  # activation codes per block of 32
        N, K = w.shape
        nb = K // INT8_ACT_BLOCK
        c, d, _ = quantize_activations(x2, INT8_ACT_BLOCK)
        dots = torch.einsum("mbk,nbk->mnb", c.double().reshape(-1, nb, INT8_ACT_BLOCK),
                            w.double().reshape(N, nb, INT8_ACT_BLOCK))
        y = (dots * d.double()[:, None, :]).sum(-1) * aux.double()[None, :]
    elif fmt == FMT_INT8:  # q · scale is exact in fp32 (8-bit by 8-bit significands)
        y = x2.double() @ dequantize_int8(w, aux, torch.float64).T
    else:
        N, K = w.shape[0], w.shape[1] * 2
        codes = unpack_int4(w).double()  # [N, K] in 0..15
        s, z = (t.double() for t in int4_grid(aux))  # [N, K/G]
        ng = s.shape[-1]
        group_size = K // ng  # from the parameters' shape, as the kernel takes it
        c, d, xsum = quantize_activations(x2, group_size)
        dots = torch.einsum("mgk,ngk->mng", c.double().reshape(-1, ng, group_size),
                            codes.reshape(N, ng, group_size))
        y = (dots * s[None] * d.double()[:, None, :]).sum(-1) + xsum.double() @ (z - 8 * s).T
    return y.float().view(*x.shape[:-1], -1)


def moe_reference(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up: torch.Tensor,
                  gate_up_aux: torch.Tensor | None, down: torch.Tensor, down_aux: torch.Tensor | None, fmt: int,
                  group_size: int = 0) -> torch.Tensor:
    """The math of `moe` in torch: each token-expert pair through `linear_reference`, SwiGLU in fp32."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            ga = None if gate_up_aux is None else gate_up_aux[e]
            da = None if down_aux is None else down_aux[e]
            g, u = linear_reference(x[t:t + 1].float(), gate_up[e], ga, fmt, group_size).chunk(2, dim=-1)
            h = F.silu(g) * u
            out[t] += float(weights[t, j]) * linear_reference(h, down[e], da, fmt, group_size)[0].double()
    return out.float()


def decode_attention_reference(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, rows: torch.Tensor,
                               lens: torch.Tensor, scale: float) -> torch.Tensor:
    """`decode_attention`'s math in torch (fp64): gather the rows, mask keys past lens, softmax, weighted sum."""
    B, H, D = q.shape
    G = H // k_pool.shape[1]
    k = k_pool.double()[rows].repeat_interleave(G, dim=2)  # [B, L, H, D]
    v = v_pool.double()[rows].repeat_interleave(G, dim=2)
    scores = torch.einsum("bhd,blhd->bhl", q.double(), k) * scale
    valid = torch.arange(rows.shape[1], device=rows.device)[None, :] < lens[:, None]  # [B, L]
    p = torch.softmax(scores.masked_fill(~valid[:, None, :], float("-inf")), dim=-1)
    return torch.einsum("bhl,blhd->bhd", p, v).to(q.dtype)
