"""Dense projection `y = x Wᵀ` with a faster CPU backend for large fp32 weights at inference.

torch's CPU `F.linear` goes to MKL's sgemm/sgemv. On the AMD EPYC (AVX2) machines this project runs on, MKL streams
big weights at ~6 GB/s for one token (lm_head 32000x512: 10 ms) and repacks the whole weight for every call with 2-64
rows (8 rows of lm_head: 20 ms). oneDNN's inner product (`torch.ops.mkldnn._linear_pointwise`, the op torch's own
inductor emits for CPU linears) measured 1.5-2x faster there on the decode shapes, and equal at prefill sizes; it
is slower than MKL for small weights (primitive overhead). So: oneDNN for fp32 weights of at least
`threshold("onednn_linear")` elements (256K fp32 = 1 MiB) when no gradient is needed, `F.linear` otherwise (training,
bf16, GPU, small weights).

A few fp32 rows against a big fp32 weight, or against a bf16-STORED weight (half the bytes; fp32 activations and
accumulation), go to the native C++ kernel (qwen3next/kernels, "native_linear" in `ops.dispatch`), which streams
the weight at memory bandwidth; a bf16-stored weight with more rows is converted to fp32 for the call.

`QWEN3NEXT_LINEAR=torch` in the environment (or `set_linear_backend("torch")`) turns the oneDNN path off; `F.linear`
is the reference twin the tests compare against. The switch and the threshold live in `ops.dispatch`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels
from .dispatch import linear_backend, native_kernels, set_linear_backend, threshold

__all__ = ["linear", "native_rows", "set_linear_backend", "uses_native", "uses_onednn"]

# Below this many fp32 weight elements the call overheads decide; measured (1 thread, one row): 256x256 native 6.0 us
# vs torch.mm 6.7, 128x256 4.4 vs 4.6, 8x256 2.8 vs 2.5; 2048x512 57 vs 90.
NATIVE_FP32_MIN_ELEMENTS = 1 << 15
_ONEDNN_OP = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None


def uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # Under torch.compile, inductor lowers this op only for constant (frozen) weights: leave the matmul to it.
    return (linear_backend() == "auto" and not torch.compiler.is_compiling() and _ONEDNN_OP is not None
            and weight.dtype == torch.float32 and x.dtype == torch.float32
            and x.device.type == "cpu" and weight.device.type == "cpu"
            and weight.dim() == 2 and weight.numel() >= threshold("onednn_linear") and weight.is_contiguous()
            and x.shape[-1] == weight.shape[1] and x.numel() > 0
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


# The native kernel's row limit per weight format, as a multiple of the "native_linear" threshold (8): where it stops
# beating the alternative. Measured, 1 thread, 3072 x 512 and 32000 x 512, ms native vs alternative: fp32 at 8 rows
# 0.64 vs 0.58 and 7.0 vs 8.8 (oneDNN), at 16 1.3 vs 1.0; bf16 at 16 1.1 vs 1.1 and 10.7 vs 47 (convert + GEMM), at 64
# 5.2 vs 3.6; int8 at 8 0.45 vs 0.45 and 5.3 vs 6.3 (torch's int8 kernel), at 16 1.04 vs 0.84; int4 at 64 4.2 vs 8.3
# (dequantize + GEMM), at 512 24.8 vs 25.1 -- and 17 with the weight dequantized natively first.
NATIVE_ROWS_FACTOR = {kernels.FMT_F32: 1, kernels.FMT_BF16: 2, kernels.FMT_INT8: 1, kernels.FMT_INT4: 8}


def native_rows(x: torch.Tensor, K: int, fmt: int) -> bool:
    """Whether fp32 activations `x` [..., K] may take the native kernel for a weight stored in format `fmt`: few
    enough rows for that format (see NATIVE_ROWS_FACTOR), CPU, no autograd, kernels available."""
    return 0 < x.numel() <= threshold("native_linear") * NATIVE_ROWS_FACTOR[fmt] * K and native_kernels(x)


def uses_native(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The "native_linear" fast path: a few fp32 rows against a big fp32 or a bf16-stored weight (ops.dispatch)."""
    fmt = kernels.FLOAT_FORMATS.get(weight.dtype)
    if fmt is None or (fmt == kernels.FMT_F32 and weight.numel() < NATIVE_FP32_MIN_ELEMENTS):
        return False
    return (weight.dim() == 2 and weight.is_contiguous() and weight.device.type == "cpu"
            and x.shape[-1] == weight.shape[1] and native_rows(x, x.shape[-1], fmt))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, through the native kernel or oneDNN where that is measured faster (see module
    docstring). A bf16-stored weight with fp32 activations computes in fp32."""
    if bias is None and uses_native(x, weight):
        return kernels.linear(x, weight, None, kernels.FLOAT_FORMATS[weight.dtype])
    if weight.dtype != x.dtype and weight.dtype == torch.bfloat16 and x.dtype == torch.float32:
        weight = weight.float()  # bf16 storage, fp32 compute (prefill sizes, or no native kernels)
    if bias is None and uses_onednn(x, weight):
        x2 = x.reshape(-1, x.shape[-1])
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        return _ONEDNN_OP(x2, weight, None, "none", [], "").view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)
