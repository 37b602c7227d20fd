"""Weight-only int8 / int4 quantization: the math, the matmuls (fast path + reference twin) and the Linear swaps.

Int8: symmetric, one scale per output channel: w[n, k] ≈ q[n, k] · scale[n], q in [-127, 127].
Int4: asymmetric, one (scale, zero) pair per group of `group_size` consecutive input channels of a row:
w[n, k] ≈ (q[n, k] - 8) · scale[n, g] + zero[n, g], q in [0, 15], g = k // group_size. `zero` is the value of
the middle code 8; this is the convention of torch's int4 CPU kernel, so its tensors need no arithmetic.

Scales and zeros are bfloat16, the dtype of torch's CPU int8/int4 kernels (the only dtype they vectorise in this
build; fp32/fp16 activations run 10-30x slower through them, so fp32 models cast activations to bf16 for the
kernel). Int8 scales are rounded so that the grid still covers every weight, which keeps the elementwise error within
scale / 2. Int4 grids are searched per group for the least importance-weighted error (`quantize_int4`), which may clip
an outlier; the min-max grid (error within scale / 2) is one of the candidates.

Int4 weights are packed two per byte. The *canonical* layout (the saved format) is row-major [N, K/2] with the
even column in the low nibble. On CPU, eligible shapes (N % 16 == 0, K % group_size == 0, group_size in
{32, 64, 128, 256}) are held in torch's kernel layout instead (same [N, K/2] uint8 shape, nibbles permuted in
blocks of rows; the permutation depends on the CPU's SIMD width), and converted back to canonical for saving --
unless the native kernels (qwen3next/kernels) are available and the group size is a multiple of 64 (or 32, with K a
multiple of 64): they read the canonical layout, and run few-row products (decode) faster than torch's kernel; more
rows (prefill) dequantize the weight natively (`qwen3next::dequantize`), then F.linear.

With the native kernels, a few fp32 rows run through `qwen3next::linear` for int8 and int4 alike ("native_linear" in
`ops.dispatch`): no bf16 cast of the activations; inside the kernel they are quantized to int8 (int4: per weight
group; int8: per block of 32 columns, as llama.cpp's Q8_0 does), so the products are integer multiply-adds.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..ops.dispatch import native_kernels, threshold
from ..ops.linear import native_rows

SCALE_DTYPE = torch.bfloat16
# The dequantize paths convert big weights a block of rows at a time, so the float copy stays <= 64 MB in fp32.
_DEQUANT_BLOCK_ELEMENTS = 1 << 24
INT4_KERNEL_GROUP_SIZES = (32, 64, 128, 256)

_HAS_INT8_KERNEL = hasattr(torch, "_weight_int8pack_mm")
_HAS_INT4_KERNEL = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
    torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def _round_up_bf16(t: torch.Tensor) -> torch.Tensor:
    """Smallest bf16 >= t (t fp32, positive): a scale rounded up keeps the grid covering the weights."""
    b = t.to(torch.bfloat16)
    low = b.float() < t
    return torch.where(low, (b.view(torch.int16) + 1).view(torch.bfloat16), b)  # next bf16 up (positive values)


# ---- int8 -----------------------------------------------------------------------------------------------------------
def quantize_int8(w: torch.Tensor, absmax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (q int8 [..., N, K], scale bf16 [..., N]) with |w - q·scale| <= scale / 2. `absmax` [..., N]:
    the rows' largest |w| when `w` is only part of each row (a tensor-parallel rank's share of a row-parallel
    layer), so that every part gets the whole row's scale."""
    w = w.detach().float()
    amax = w.abs().amax(-1) if absmax is None else absmax.float()
    scale = _round_up_bf16((amax / 127).clamp_min(1e-30))
    q = torch.round(w / scale.float()[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q [..., N, K], scale [..., N]) -> w [..., N, K] in `dtype` (computed in fp32)."""
    return (q.float() * scale.float()[..., None]).to(dtype)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ dequantize_int8(q [N, K], scale [N]).T -> [..., N] in x's dtype.

    CPU bf16 activations (and fp32 ones with few rows, cast to bf16) use `torch._weight_int8pack_mm`; otherwise the
    int8 weight is converted to x's dtype and the per-channel scale is applied to the output (same product). The row
    limit for fp32 (prefill is faster through the dense matmul) is the "int8_kernel" entry of `ops.dispatch`.
    """
    K, N = x.shape[-1], q.shape[0]
    if native_rows(x, K, kernels.FMT_INT8):
        return kernels.linear(x, q, scale, kernels.FMT_INT8)
    if x.numel() > threshold("int8_kernel") * K and native_kernels(x):  # prefill: dequantized natively, then GEMMs
        return _blockwise_linear(x, N, K, lambda a, b: kernels.dequantize(q[a:b], scale[a:b], kernels.FMT_INT8),
                                 lambda y, a, b: y)
    x2 = x.reshape(-1, K)
    # Under torch.compile the pointers are not known at trace time; module buffers and fresh tensors are 64-byte
    # aligned by torch's CPU allocator (expert slices: QuantizedExperts checks their offsets).
    compiling = torch.compiler.is_compiling()
    use_kernel = int8_kernel_supported(K) and x.device.type == "cpu" and (compiling or q.data_ptr() % 64 == 0) and (
        x.dtype == torch.bfloat16 or (x.dtype == torch.float32 and x2.shape[0] <= threshold("int8_kernel")))
    if not use_kernel:
        return _blockwise_linear(x, N, K, lambda a, b: q[a:b].to(x.dtype), lambda y, a, b: y * scale[a:b].to(x.dtype))
    xb = x2.to(torch.bfloat16).contiguous()
    if not compiling and xb.data_ptr() % 64:  # the kernel uses aligned vector loads on the activations
        xb = xb.clone()
    y = torch._weight_int8pack_mm(xb, q, scale.to(torch.bfloat16))
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


def _blockwise_linear(x: torch.Tensor, N: int, K: int, weight_rows, finish) -> torch.Tensor:
    """x [..., K] @ W.T -> [..., N] where `weight_rows(a, b)` gives rows a:b of W in x's dtype and `finish(y, a, b)`
    post-processes that block of outputs; blocks keep the temporary float weight small."""
    step = max(1, _DEQUANT_BLOCK_ELEMENTS // max(K, 1))
    outs = [finish(F.linear(x, weight_rows(a, min(a + step, N))), a, min(a + step, N)) for a in range(0, N, step)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def int8_kernel_supported(K: int) -> bool:
    """Whether `torch._weight_int8pack_mm` is safe for input size K. Its bf16 CPU kernels step through K in vectors
    of 8 (AVX2) or 16 (AVX-512) with aligned loads and no tail: other sizes give wrong results or crash (measured
    here with K = 20, 33, 100), so we require a multiple of 32."""
    return _HAS_INT8_KERNEL and K % 32 == 0


def int8_linear_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Reference twin of `int8_linear`: dequantize, then F.linear in x's dtype."""
    return F.linear(x, dequantize_int8(q, scale, x.dtype))


# ---- int4 -----------------------------------------------------------------------------------------------------------
def check_group_size(group_size: int, K: int) -> None:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2 or group_size % 2:
        raise ValueError(f"group_size: expected a positive even integer (e.g. 32, 64, 128), got {group_size!r}")
    if K % group_size:
        raise ValueError(f"group_size: {group_size} does not divide the input size {K}")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes [..., N, K] in 0..15 -> canonical packed uint8 [..., N, K/2] (even column in the low nibble)."""
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Canonical packed uint8 [..., N, K/2] -> codes uint8 [..., N, K]."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


# The (scale, zero) search of `quantize_int4`: candidate grids of 15 + t steps over each group's range, t in
# [-1, 1] in INT4_SEARCH_STEPS equal steps.
INT4_SEARCH_STEPS = 20
_SEARCH_BLOCK_ELEMENTS = 1 << 16  # rows are searched this many elements at a time: the fp32 temporaries stay in cache


def quantize_int4(w: torch.Tensor, group_size: int,
                  search: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (canonical packed uint8 [..., N, K/2], scale bf16 [..., N, K/G], zero bf16 [..., N, K/G]).

    `search=False`: the min-max grid, |w - dequantize_int4(...)| <= scale / 2 elementwise (up to fp32 rounding).
    `search=True` (default): each group's (scale, zero) is the best of the min-max grid and 21 candidates found by
    least squares, by the group's error Σ wᵢ·(ŵᵢ - xᵢ)² with importance wᵢ = rms(group) + |xᵢ| (larger weights count
    more; an outlier may be clipped when that lowers the group's error). Each candidate takes the codes of a grid of
    15 + t steps spanning [min, max] (t in [-1, 1]), refits scale and offset to them by weighted least squares, rounds
    both to bf16 and is scored with the codes re-rounded to it. The same format and kernels; only the numbers change.
    Demo model, logits drift vs fp32 (llama.cpp's KLD protocol, scripts/drift_vs_llamacpp.py, decode paths): mean
    KLD 0.00268 -> 0.00234 at G = 64, 0.00170 at G = 32; on Gaussian weights the MSE falls ~15%.

    The search runs natively when the kernels are available (`qwen3next::quantize_int4`, ~30 ns per weight on one
    core, 10-40x the torch code; the same choices up to the order of fp32 sums, which can flip a near-tie between two
    candidates); `quantize_int4_search` is its torch twin (GPU tensors, no compiler).
    """
    *lead, N, K = w.shape
    check_group_size(group_size, K)
    if search:
        w2 = w.detach().reshape(-1, K)
        if w2.device.type == "cpu" and kernels.available():
            packed, scale, zero = kernels.quantize_int4(w2.float().contiguous(), group_size)
        else:
            packed, scale, zero = quantize_int4_search(w2, group_size)
        return (packed.reshape(*lead, N, K // 2), scale.reshape(*lead, N, K // group_size),
                zero.reshape(*lead, N, K // group_size))
    g = w.detach().float().reshape(*lead, N, K // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    zero, scale = _minmax_grid(lo, hi)
    q = torch.round((g - zero.float()[..., None]) / scale.float()[..., None]).add_(8).clamp_(0, 15)
    return pack_int4(q.reshape(*lead, N, K)), scale, zero


def _minmax_grid(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(zero, scale) bf16 of the min-max grid: the zero (value of code 8) rounded first, then the smallest bf16 step
    whose grid still spans [lo, hi]."""
    zero = (lo + (hi - lo) * (8 / 15)).to(SCALE_DTYPE)
    zf = zero.float()
    return zero, _round_up_bf16(torch.maximum((zf - lo) / 8, (hi - zf) / 7).clamp_min(1e-30))


def quantize_int4_search(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch twin of `qwen3next::quantize_int4` (see `quantize_int4`): w [N, K] -> (packed, scale, zero)."""
    N, K = w.shape
    step = max(1, _SEARCH_BLOCK_ELEMENTS // K)
    parts = [_search_rows(w[a:a + step].float(), group_size) for a in range(0, N, step)]
    if not parts:
        return (w.new_zeros(0, K // 2, dtype=torch.uint8), w.new_zeros(0, K // group_size, dtype=SCALE_DTYPE),
                w.new_zeros(0, K // group_size, dtype=SCALE_DTYPE))
    return tuple(torch.cat(t) for t in zip(*parts))


def _search_rows(w: torch.Tensor, G: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    N, K = w.shape
    g = w.reshape(N, K // G, G)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    rng = hi - lo
    wt = g.square().mean(-1, keepdim=True).sqrt() + g.abs()  # importance of each weight
    sw, swx = wt.sum(-1, keepdim=True), (wt * g).sum(-1, keepdim=True)

    def error(s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        q = torch.round((g - z) / s).clamp_(-8, 7)
        return (wt * (q * s + z - g).square()).sum(-1, keepdim=True)

    zero, scale = _minmax_grid(lo, hi)
    best_s, best_z = scale.float(), zero.float()
    best = error(best_s, best_z)
    span = torch.where(rng > 0, rng, 1.0)
    for i in range(INT4_SEARCH_STEPS + 1):
        inv = (15.0 + (2.0 * i / INT4_SEARCH_STEPS - 1.0)) / span
        q = torch.round((g - lo) * inv).clamp_(0, 15)
        swq, swqq, swqx = (wt * q).sum(-1, keepdim=True), (wt * q * q).sum(-1, keepdim=True), (
            wt * q * g).sum(-1, keepdim=True)
        det = sw * swqq - swq * swq
        ok = (rng > 0) & (det > 1e-12 * sw * swqq)
        a = (sw * swqx - swq * swx) / torch.where(ok, det, 1.0)
        ok &= a > 0
        b = (swx - a * swq) / sw
        s, z = a.to(SCALE_DTYPE).float(), (b + 8 * a).to(SCALE_DTYPE).float()
        ok &= s > 0
        e = error(torch.where(ok, s, 1.0), z)
        better = ok & (e < best)
        best = torch.where(better, e, best)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    q = torch.round((g - best_z) / best_s).clamp_(-8, 7).add_(8)
    return pack_int4(q.reshape(N, K)), best_s.squeeze(-1).to(SCALE_DTYPE), best_z.squeeze(-1).to(SCALE_DTYPE)


# ---- int4 with coded group parameters --------------------------------------------------------------------------------
# Each group's (scale, zero) as two 8-bit codes under bf16 factors per row (the idea of llama.cpp's k-quants, whose
# Q4_K codes 6-bit scales and minimums under fp16 factors per 256 weights): scale = sc · fs[n] with sc in 1..255,
# zero = zc · fz[n] with zc in -127..127. 2 bytes per group instead of 4, so groups of 32 cost the bytes of groups of
# 64 with bf16 pairs (4.5 bits per weight), and groups of 16 cost 5.0. Held as one uint8 tensor per matrix, the
# kernels' `scale_zero` [K/G + 2, N, 2]: rows 0 .. K/G - 1 the (sc, zc) byte pairs, the last two rows the bytes of the
# bf16 factors (fs, fz) of each row (low bytes, then high bytes: a slice [:, a:b] of rows is still valid).
SCALE_CODE_MAX, ZERO_CODE_MAX = 255, 127


def _code_rows(v: torch.Tensor, code_min: int, code_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """v [..., N, K/G] -> (codes [..., N, K/G] as fp32 in code_min..code_max, factor bf16 [..., N]): each row's
    largest |v| over `code_max`, rounded up to bf16 so that every code fits."""
    f = _round_up_bf16((v.abs().amax(-1) / code_max).clamp_min(1e-30))
    return torch.round(v / f.float()[..., None]).clamp_(code_min, code_max), f


def decode_int4_grid(scale_codes: torch.Tensor, zero_codes: torch.Tensor,
                     factors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coded group parameters -> (scale, zero) fp32 [..., N, K/G], the products the kernels form (fp32)."""
    f = factors.float()
    return scale_codes.float() * f[..., 0:1], zero_codes.float() * f[..., 1:2]


def coded_scale_zero(scale_codes: torch.Tensor, zero_codes: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Coded parameters ([..., N, K/G] codes, [..., N, 2] factors) -> the kernels' uint8 [..., K/G + 2, N, 2]."""
    pairs = torch.stack((scale_codes, zero_codes.view(torch.uint8)), -1).transpose(-3, -2)  # [..., K/G, N, 2]
    fbytes = factors.to(torch.bfloat16).contiguous().view(torch.uint8)  # [..., N, 4]: fs lo, fs hi, fz lo, fz hi
    planes = fbytes.unflatten(-1, (2, 2)).permute(*range(fbytes.ndim - 2), -1, -3, -2)  # [..., 2 (lo/hi), N, 2]
    return torch.cat((pairs, planes), dim=-3).contiguous()


def split_coded_scale_zero(aux: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `coded_scale_zero`: uint8 [..., K/G + 2, N, 2] -> (scale codes, zero codes, factors bf16)."""
    pairs, planes = aux[..., :-2, :, :], aux[..., -2:, :, :]
    fbytes = planes.permute(*range(planes.ndim - 3), -2, -1, -3).contiguous()  # [..., N, 2 (fs/fz), 2 (lo/hi)]
    factors = fbytes.flatten(-2).view(torch.bfloat16)  # [..., N, 2]
    codes = pairs.transpose(-3, -2)  # [..., N, K/G, 2]
    return codes[..., 0].contiguous(), codes[..., 1].contiguous().view(torch.int8), factors


def is_coded(scale_zero: torch.Tensor) -> bool:
    """Whether an int4 `scale_zero` holds coded group parameters (uint8) rather than bf16 pairs."""
    return scale_zero.dtype == torch.uint8


def int4_grid(scale_zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) [..., N, K/G] of either form of `scale_zero` (bf16 pairs: as stored; coded: fp32 products)."""
    if is_coded(scale_zero):
        return decode_int4_grid(*split_coded_scale_zero(scale_zero))
    return scale_zero[..., 0].transpose(-1, -2), scale_zero[..., 1].transpose(-1, -2)


def quantize_int4_coded(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, ...]:
    """w [..., N, K] -> (canonical packed uint8 [..., N, K/2], scale codes uint8, zero codes int8 [..., N, K/G],
    factors bf16 [..., N, 2]): the searched grids of `quantize_int4`, their scales coded, each zero refitted by
    weighted least squares to the codes under the coded scale (same importance as the search), then coded, and the
    codes re-rounded to the coded grid. Demo model, fake-quantized, prefill paths: the same drift as bf16 pairs at the
    same group size (mean KLD 0.00164 for both at G = 32) for half the parameter bytes."""
    packed, scale, _ = quantize_int4(w, group_size)
    *lead, N, K = w.shape
    g = w.detach().float().reshape(*lead, N, K // group_size, group_size)
    sc, fs = _code_rows(scale.float(), 1, SCALE_CODE_MAX)
    s = (sc * fs.float()[..., None])[..., None]
    q = unpack_int4(packed).reshape(g.shape).float() - 8
    wt = g.square().mean(-1, keepdim=True).sqrt() + g.abs()
    zero = (wt * (g - q * s)).sum(-1) / wt.sum(-1).clamp_min(1e-30)
    zc, fz = _code_rows(zero, -ZERO_CODE_MAX, ZERO_CODE_MAX)
    q = torch.round((g - (zc * fz.float()[..., None])[..., None]) / s).clamp_(-8, 7).add_(8)
    return (pack_int4(q.reshape(*lead, N, K)), sc.to(torch.uint8), zc.to(torch.int8),
            torch.stack((fs, fz), -1))


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(canonical packed [..., N, K/2], scale, zero [..., N, K/G]) -> w [..., N, K] in `dtype` (fp32 math)."""
    q = unpack_int4(packed)
    *lead, N, K = q.shape
    G = K // scale.shape[-1]
    g = (q.reshape(*lead, N, K // G, G).float() - 8) * scale.float()[..., None] + zero.float()[..., None]
    return g.reshape(*lead, N, K).to(dtype)


def int4_kernel_supported(N: int, K: int, group_size: int) -> bool:
    """Whether torch's int4 CPU kernel takes a [N, K] weight with this group size."""
    return _HAS_INT4_KERNEL and N % 16 == 0 and group_size in INT4_KERNEL_GROUP_SIZES and K % group_size == 0


# The kernel packs rows in independent blocks of 16, 32 or 64 (by SIMD width); a 64-row chunk is always a whole
# number of blocks, so the nibble permutation of a chunk, probed once per (rows, K), undoes the packing.
_KERNEL_CHUNK_ROWS = 64


@functools.lru_cache(maxsize=64)
def _kernel_nibble_source(rows: int, K: int) -> torch.Tensor:
    """For a [rows, K] weight, the flat index (n * K + k) that lands in each nibble of the kernel's packed bytes
    (bytes in order, low nibble first): found by packing the index itself, four bits per probe."""
    idx = torch.arange(rows * K, dtype=torch.int64).reshape(rows, K)
    source = torch.zeros(rows * K, dtype=torch.int64)
    for shift in range(0, max(1, (rows * K - 1).bit_length()), 4):
        probe = torch.ops.aten._convert_weight_to_int4pack_for_cpu(((idx >> shift) & 15).to(torch.int32), 1)
        source |= unpack_int4(probe).reshape(-1).long() << shift
    return source


def to_kernel_layout(packed: torch.Tensor) -> torch.Tensor:
    """Canonical packed [N, K/2] (CPU) -> torch's int4 CPU kernel layout [N, K/2]."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(packed).to(torch.int32).contiguous(), 1)


def from_kernel_layout(kpacked: torch.Tensor) -> torch.Tensor:
    """Inverse of `to_kernel_layout` (any device): kernel layout [N, K/2] -> canonical packed [N, K/2]."""
    N, K = kpacked.shape[0], kpacked.shape[1] * 2
    q = torch.empty(N, K, dtype=torch.uint8, device=kpacked.device)
    full = N - N % _KERNEL_CHUNK_ROWS
    for start, stop in ((0, full), (full, N)):
        rows = min(stop - start, _KERNEL_CHUNK_ROWS)
        if rows == 0:
            continue
        source = _kernel_nibble_source(rows, K).to(kpacked.device)
        nibbles = unpack_int4(kpacked[start:stop]).reshape(-1, rows * K)  # [chunks, rows*K], kernel order
        chunk = torch.empty_like(nibbles)
        chunk[:, source] = nibbles
        q[start:stop] = chunk.reshape(stop - start, K)
    return pack_int4(q)


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scale_zero: torch.Tensor, group_size: int,
                is_kernel_layout: bool) -> torch.Tensor:
    """x [..., K] @ W.T -> [..., N] in x's dtype, W the int4 weight.

    qweight: [N, K/2] uint8 (kernel layout when `is_kernel_layout`, else canonical); scale_zero: [K/G, N, 2] bf16
    (scale, zero), the kernel's own argument, or coded parameters uint8 [K/G + 2, N, 2] (`coded_scale_zero`; always
    with the canonical layout). Kernel layout -> `_weight_int4pack_mm_for_cpu` on bf16 activations; canonical ->
    the native kernels, or dequantize to x's dtype and F.linear.
    """
    N, K = qweight.shape[0], qweight.shape[1] * 2
    group_size = K // (scale_zero.shape[0] - (2 if is_coded(scale_zero) else 0))
    if not is_kernel_layout and native_rows(x, K, kernels.FMT_INT4):
        return kernels.linear(x, qweight, scale_zero, kernels.FMT_INT4, group_size)
    if not is_kernel_layout and native_kernels(x):  # prefill: dequantized natively, block by block, then GEMMs
        return _blockwise_linear(x, N, K, lambda a, b: kernels.dequantize(
            qweight[a:b], scale_zero[:, a:b].contiguous(), kernels.FMT_INT4, group_size), lambda y, a, b: y)
    if not is_kernel_layout:
        scale, zero = int4_grid(scale_zero)  # [N, K/G]
        return _blockwise_linear(x, N, K, lambda a, b: dequantize_int4(qweight[a:b], scale[a:b], zero[a:b], x.dtype),
                                 lambda y, a, b: y)
    x2 = x.reshape(-1, K)
    if x2.shape[0] == 0:
        return x.new_zeros(*x.shape[:-1], N)
    y = torch._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), qweight, group_size,
                                          scale_zero.to(torch.bfloat16))
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


def int4_linear_reference(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                          zero: torch.Tensor) -> torch.Tensor:
    """Reference twin of `int4_linear` on the canonical tensors: dequantize, then F.linear in x's dtype."""
    return F.linear(x, dequantize_int4(packed, scale, zero, x.dtype))


def scale_zero_of(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(scale, zero) [..., N, K/G] -> the kernel's interleaved [..., K/G, N, 2]."""
    return torch.stack((scale, zero), dim=-1).transpose(-3, -2).contiguous()


# ---- modules --------------------------------------------------------------------------------------------------------
class Int8Linear(nn.Module):
    """Bias-free Linear with int8 weight `qweight` [N, K] and bf16 per-output-channel `scales` [N]."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, dtype=SCALE_DTYPE))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        if linear.bias is not None:
            raise ValueError("linear: quantization supports bias-free nn.Linear only (Qwen3-Next has no biases)")
        m = cls(linear.in_features, linear.out_features).to(linear.weight.device)
        m.load_quantized(*quantize_int8(linear.weight))
        return m

    def load_quantized(self, qweight: torch.Tensor, scales: torch.Tensor) -> None:
        """Fill from the saved tensors: qweight int8 [N, K], scales [N]."""
        with torch.no_grad():
            self.qweight.copy_(qweight)
            self.scales.copy_(scales)

    def quantized_tensors(self) -> dict[str, torch.Tensor]:
        """The saved form: {"qweight": int8 [N, K], "scales": bf16 [N]}."""
        return {"qweight": self.qweight, "scales": self.scales}

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scales, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.qweight, self.scales)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear_reference(x, self.qweight, self.scales)

    def _apply(self, fn, recurse=True):
        # .to(dtype) must not touch the scales: they stay in the kernel's dtype (bf16 -> fp32 -> bf16 is exact).
        super()._apply(fn, recurse)
        self.scales = self.scales.to(SCALE_DTYPE)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=8"


def int4_scale_zero_shape(N: int, K: int, group_size: int, coded: bool) -> tuple[int, int, int]:
    """Shape of the kernels' `scale_zero` of an [N, K] int4 weight: bf16 pairs [K/G, N, 2], coded [K/G + 2, N, 2]."""
    return (K // group_size + (2 if coded else 0), N, 2)


def int4_saved_tensors(qweight: torch.Tensor, scale_zero: torch.Tensor) -> dict[str, torch.Tensor]:
    """The saved form of one int4 matrix (canonical `qweight`): {"qweight", "scales", "zeros"} ([N, K/G]: bf16, or
    uint8 / int8 codes) and, when coded, "factors" bf16 [N, 2]."""
    if is_coded(scale_zero):
        sc, zc, factors = split_coded_scale_zero(scale_zero)
        return {"qweight": qweight, "scales": sc, "zeros": zc, "factors": factors}
    return {"qweight": qweight, "scales": scale_zero[..., 0].T, "zeros": scale_zero[..., 1].T}


def int4_scale_zero_of(scales: torch.Tensor, zeros: torch.Tensor, factors: torch.Tensor | None) -> torch.Tensor:
    """The saved tensors' group parameters -> the kernels' `scale_zero` (coded when `factors` is given)."""
    return scale_zero_of(scales, zeros) if factors is None else coded_scale_zero(scales, zeros, factors)


def quantize_int4_for(w: torch.Tensor, group_size: int, coded: bool) -> tuple[torch.Tensor, ...]:
    """`quantize_int4_coded` or `quantize_int4`: the saved tensors of either form, in `load_quantized`'s order."""
    return quantize_int4_coded(w, group_size) if coded else quantize_int4(w, group_size)


class Int4Linear(nn.Module):
    """Bias-free Linear with group-wise int4 weight: `qweight` uint8 [N, K/2] (kernel layout on CPU when the shape
    allows, else canonical) and `scale_zero` bf16 [K/G, N, 2], or with `coded=True` the coded group parameters uint8
    [K/G + 2, N, 2] (see `coded_scale_zero`; canonical layout)."""

    def __init__(self, in_features: int, out_features: int, group_size: int, coded: bool = False):
        super().__init__()
        check_group_size(group_size, in_features)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.coded = bool(coded)
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scale_zero", torch.zeros(int4_scale_zero_shape(out_features, in_features, group_size,
                                                                             self.coded),
                                                       dtype=torch.uint8 if self.coded else SCALE_DTYPE))
        self.is_kernel_layout = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, coded: bool = False) -> Int4Linear:
        if linear.bias is not None:
            raise ValueError("linear: quantization supports bias-free nn.Linear only (Qwen3-Next has no biases)")
        m = cls(linear.in_features, linear.out_features, group_size, coded).to(linear.weight.device)
        m.load_quantized(*quantize_int4_for(linear.weight, group_size, coded))
        return m

    def load_quantized(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                       factors: torch.Tensor | None = None) -> None:
        """Fill from the saved tensors: canonical packed [N, K/2], scales and zeros [N, K/G] (bf16; coded: uint8 and
        int8 codes, with their `factors` bf16 [N, 2])."""
        if (factors is not None) != self.coded:
            raise ValueError(f"int4: this module holds {'coded' if self.coded else 'bf16'} group parameters, the "
                             f"tensors are {'coded' if factors is not None else 'bf16'}")
        with torch.no_grad():
            self.scale_zero.copy_(int4_scale_zero_of(scales, zeros, factors))
            self.qweight, self.is_kernel_layout = pick_int4_layout(qweight.to(self.qweight.device), self.group_size,
                                                                   self.coded)

    def quantized_tensors(self) -> dict[str, torch.Tensor]:
        """The saved form (`int4_saved_tensors`): {"qweight": canonical packed uint8 [N, K/2], "scales", "zeros"
        [N, K/G] (+ "factors" [N, 2] when coded)}."""
        return int4_saved_tensors(self._canonical_qweight(), self.scale_zero)

    def _canonical_qweight(self) -> torch.Tensor:
        return from_kernel_layout(self.qweight) if self.is_kernel_layout else self.qweight

    def _canonical(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self._canonical_qweight(), *int4_grid(self.scale_zero))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int4(*self._canonical(), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int4_linear(x, self.qweight, self.scale_zero, self.group_size, self.is_kernel_layout)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        return int4_linear_reference(x, *self._canonical())

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if not self.coded:
            self.scale_zero = self.scale_zero.to(SCALE_DTYPE)
        if self.is_kernel_layout and self.qweight.device.type != "cpu":  # the kernel layout is CPU-only
            self.qweight, self.is_kernel_layout = from_kernel_layout(self.qweight), False
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits=4, "
                f"group_size={self.group_size}, coded={self.coded}, kernel_layout={self.is_kernel_layout}")


def native_int4_preferred(group_size: int, K: int) -> bool:
    """Hold int4 weights in the canonical layout for the native kernel: its vector code takes groups of 64k columns,
    and groups of 32 or 16 when K is a multiple of 64 (two or four groups per 64-column chunk)."""
    return (group_size % 64 == 0 or (group_size in (32, 16) and K % 64 == 0)) and kernels.available()


def pick_int4_layout(packed: torch.Tensor, group_size: int, coded: bool = False) -> tuple[torch.Tensor, bool]:
    """Canonical packed [N, K/2] -> (the tensor to hold, whether it is in the kernel layout). The kernel layout is
    used only where the kernel takes the shape and converting back gives the same bytes (checked once, at load), and
    never for coded group parameters (torch's kernel takes bf16 pairs only)."""
    N, K = packed.shape[0], packed.shape[1] * 2
    if coded or (packed.device.type == "cpu" and native_int4_preferred(group_size, K)):  # the native kernel's layout
        return packed.contiguous(), False
    if packed.device.type != "cpu" or not int4_kernel_supported(N, K, group_size):
        return packed.contiguous(), False
    kpacked = to_kernel_layout(packed)
    if not torch.equal(from_kernel_layout(kpacked), packed):
        return packed.contiguous(), False
    return kpacked, True
