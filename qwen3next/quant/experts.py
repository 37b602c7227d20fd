"""Quantized stacked routed experts: the swap for `model.moe.Experts`.

Each expert's gate_up [2I, D] and down [D, I] matrix is quantized on its own, exactly like a Linear (int8: a scale
per output row; int4: a (scale, zero) per group of input channels), and stored stacked over experts. The forward
groups token-expert pairs by expert, like `ops.moe.experts_grouped`, so only the hit experts run, each as one
quantized matmul over all of its tokens. A few fp32 tokens on CPU (decode, eager or compiled) run the whole layer in
one call of the native kernel `qwen3next::moe` instead ("native_moe" in `ops.dispatch`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..model.moe import Experts
from ..ops.dispatch import fast_decode, native_kernels, sync_free, threshold
from ..ops.moe import experts_reference, grouped_swiglu, swiglu_per_pair
from .linear import (
    SCALE_DTYPE,
    check_group_size,
    dequantize_int4,
    dequantize_int8,
    from_kernel_layout,
    int4_grid,
    int4_linear,
    int4_saved_tensors,
    int4_scale_zero_of,
    int4_scale_zero_shape,
    int8_kernel_supported,
    int8_linear,
    pick_int4_layout,
    quantize_int4_for,
    quantize_int8,
)

PROJECTIONS = ("gate_up_proj", "down_proj")


class QuantizedExperts(nn.Module):
    """Routed experts with int8 or int4 weights. Buffers per projection p in (gate_up_proj, down_proj), whose float
    weight is [E, N, K] (gate_up: N = 2I, K = D; down: N = D, K = I):

    - int8: `{p}_qweight` int8 [E, N, K], `{p}_scales` bf16 [E, N]
    - int4: `{p}_qweight` uint8 [E, N, K/2] (kernel layout per expert when `is_kernel_layout[p]`), `{p}_scale_zero`
      bf16 [E, K/G, N, 2], or with `coded=True` uint8 [E, K/G + 2, N, 2] (quant/linear.py `coded_scale_zero`)

    int4 group sizes: `group_size`, or per projection `group_sizes[p]` (e.g. smaller groups for down_proj).
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, bits: int, group_size: int = 64,
                 coded: bool = False, group_sizes: dict[str, int] | None = None):
        super().__init__()
        if bits not in (8, 4):
            raise ValueError(f"bits: expected 8 or 4, got {bits!r}")
        self.num_experts, self.bits, self.group_size = num_experts, bits, group_size
        self.coded = bool(coded) and bits == 4
        self.group_sizes = {p: (group_sizes or {}).get(p, group_size) for p in PROJECTIONS}
        E, D, intermediate = num_experts, hidden_size, intermediate_size
        self.shapes = {"gate_up_proj": (2 * intermediate, D), "down_proj": (D, intermediate)}
        self.is_kernel_layout = {p: False for p in PROJECTIONS}
        for p, (N, K) in self.shapes.items():
            if bits == 8:
                self.register_buffer(f"{p}_qweight", torch.zeros(E, N, K, dtype=torch.int8))
                self.register_buffer(f"{p}_scales", torch.ones(E, N, dtype=SCALE_DTYPE))
            else:
                G = self.group_sizes[p]
                check_group_size(G, K)
                self.register_buffer(f"{p}_qweight", torch.zeros(E, N, K // 2, dtype=torch.uint8))
                self.register_buffer(f"{p}_scale_zero", torch.zeros(E, *int4_scale_zero_shape(N, K, G, self.coded),
                                                                    dtype=torch.uint8 if self.coded else SCALE_DTYPE))

    @classmethod
    def from_experts(cls, experts: Experts, bits: int, group_size: int = 64, coded: bool = False,
                     group_sizes: dict[str, int] | None = None) -> QuantizedExperts:
        E, two_i, D = experts.gate_up_proj.shape
        m = cls(E, D, two_i // 2, bits, group_size, coded, group_sizes).to(experts.gate_up_proj.device)
        m.quantize_from(experts)
        return m

    def quantize_from(self, experts: Experts) -> None:
        """Fill every expert from the float `experts` (one expert at a time: the fp32 temporaries stay one matrix
        big)."""
        for p in PROJECTIONS:
            w = getattr(experts, p)
            for e in range(self.num_experts):
                t = (quantize_int8(w[e]) if self.bits == 8 else
                     quantize_int4_for(w[e], self.group_sizes[p], self.coded))
                self.load_expert(p, e, *t)

    # ---- the saved form, one expert at a time -------------------------------------------------------------------
    def load_expert(self, proj: str, e: int, *tensors: torch.Tensor) -> None:
        """Fill expert `e` of `proj` from the saved tensors: int8 (qweight [N, K], scales [N]); int4 (canonical packed
        qweight [N, K/2], scales [N, K/G], zeros [N, K/G], and when coded their factors [N, 2])."""
        q = getattr(self, f"{proj}_qweight")
        with torch.no_grad():
            if self.bits == 8:
                qweight, scales = tensors
                q[e].copy_(qweight)
                getattr(self, f"{proj}_scales")[e].copy_(scales)
                return
            qweight, scales, zeros, *factors = tensors
            if bool(factors) != self.coded:
                raise ValueError(f"{proj}: these experts hold {'coded' if self.coded else 'bf16'} int4 group "
                                 f"parameters, the tensors are {'coded' if factors else 'bf16'}")
            sz = int4_scale_zero_of(scales, zeros, factors[0] if factors else None)
            getattr(self, f"{proj}_scale_zero")[e].copy_(sz)
            held, is_kernel = pick_int4_layout(qweight.to(q.device), self.group_sizes[proj], self.coded)
            if e > 0 and is_kernel != self.is_kernel_layout[proj]:
                raise AssertionError(f"{proj}: experts disagree on the int4 layout")
            self.is_kernel_layout[proj] = is_kernel
            q[e].copy_(held)

    def expert_tensors(self, proj: str, e: int) -> dict[str, torch.Tensor]:
        """The saved form of expert `e` of `proj` (same keys as `Int8Linear` / `Int4Linear.quantized_tensors`)."""
        q = getattr(self, f"{proj}_qweight")[e]
        if self.bits == 8:
            return {"qweight": q, "scales": getattr(self, f"{proj}_scales")[e]}
        return int4_saved_tensors(from_kernel_layout(q) if self.is_kernel_layout[proj] else q,
                                  getattr(self, f"{proj}_scale_zero")[e])

    def dequantize(self, proj: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [E, N, K] of `proj`."""
        mats = []
        for e in range(self.num_experts):
            t = self.expert_tensors(proj, e)
            mats.append(dequantize_int8(t["qweight"], t["scales"], dtype) if self.bits == 8 else
                        dequantize_int4(t["qweight"], *int4_grid(getattr(self, f"{proj}_scale_zero")[e]), dtype))
        return torch.stack(mats)

    # ---- forward -------------------------------------------------------------------------------------------------
    def _matmul(self, x: torch.Tensor, proj: str, e: int) -> torch.Tensor:
        q = getattr(self, f"{proj}_qweight")[e]
        if self.bits == 8:
            return int8_linear(x, q, getattr(self, f"{proj}_scales")[e])
        return int4_linear(x, q, getattr(self, f"{proj}_scale_zero")[e], self.group_sizes[proj],
                           self.is_kernel_layout[proj])

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Σ_k w[n,k] · SwiGLU_{ids[n,k]}(x[n]) over the hit experts. x: [N, D]; weights, ids: [N, k] -> [N, D]."""
        if fast_decode() and x.shape[0] <= threshold("native_moe") and self._native_usable(x):
            aux = "scales" if self.bits == 8 else "scale_zero"
            return kernels.moe(x, weights, ids, self.gate_up_proj_qweight, getattr(self, f"gate_up_proj_{aux}"),
                               self.down_proj_qweight, getattr(self, f"down_proj_{aux}"), self.bits)
        if sync_free(x) and self.bits == 8:  # compiled or captured in a CUDA graph
            return self._forward_gathered(x, weights, ids)
        if fast_decode() and x.shape[0] <= threshold("quant_experts_few_tokens") and self._kernels_usable(x):
            return self._forward_few_tokens(x, weights, ids)
        return grouped_swiglu(x, weights, ids, self.num_experts, lambda s, e: self._matmul(s, "gate_up_proj", e),
                              lambda h, e: self._matmul(h, "down_proj", e))

    def _native_usable(self, x: torch.Tensor) -> bool:
        """The "native_moe" fast path: fp32 x on CPU, int4 weights in the canonical layout."""
        return not any(self.is_kernel_layout.values()) and native_kernels(x)

    def _kernels_usable(self, x: torch.Tensor) -> bool:
        if x.device.type != "cpu":
            return False
        if self.bits == 4:
            return all(self.is_kernel_layout.values())
        # int8: K a multiple of 32 and every expert's matrix 64-byte aligned (see int8_kernel_supported)
        return all(int8_kernel_supported(K) and (N * K) % 64 == 0 and getattr(self, f"{p}_qweight").data_ptr() % 64 == 0
                   for p, (N, K) in self.shapes.items())

    def _kernel(self, xb: torch.Tensor, proj: str, e: int) -> torch.Tensor:
        """bf16 rows [m, K] through expert e's quantized `proj` -> bf16 [m, N]: the CPU kernel, no casts."""
        if xb.data_ptr() % 64:  # the int8 kernel loads activations with aligned vector loads
            xb = xb.clone()
        q = getattr(self, f"{proj}_qweight")[e]
        if self.bits == 8:
            return torch._weight_int8pack_mm(xb, q, getattr(self, f"{proj}_scales")[e])
        return torch._weight_int4pack_mm_for_cpu(xb, q, self.group_sizes[proj], getattr(self, f"{proj}_scale_zero")[e])

    def _forward_few_tokens(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Decode fast path (a few tokens, inference): activations cast to bf16 once, pairs grouped by expert on the
        host, each hit expert's two kernels called directly. Same products as `forward`'s grouped path (which casts
        to bf16 inside every quantized matmul), accumulated in fp32."""
        N, D = x.shape
        xb = x.to(torch.bfloat16).contiguous()
        groups: dict[int, list[tuple[int, float]]] = {}
        for n, (row_ids, row_w) in enumerate(zip(ids.tolist(), weights.tolist())):
            for e, w in zip(row_ids, row_w):
                groups.setdefault(e, []).append((n, w))
        out = torch.zeros(N, D, dtype=torch.float32, device=x.device)
        for e, pairs in groups.items():
            if len(pairs) == 1:
                n, w = pairs[0]
                xe = xb[n:n + 1]
            else:
                rows = torch.tensor([n for n, _ in pairs], device=x.device)
                xe = xb.index_select(0, rows)
            g, u = self._kernel(xe, "gate_up_proj", e).float().chunk(2, dim=-1)
            y = self._kernel((F.silu(g) * u).to(torch.bfloat16), "down_proj", e).float()
            if len(pairs) == 1:
                out[n:n + 1].add_(y, alpha=w)
            else:
                out.index_add_(0, rows, y.mul_(torch.tensor([w for _, w in pairs], device=x.device)[:, None]))
        return out.to(x.dtype)

    def _forward_gathered(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """int8, for the compiled decode step (no host sync, no data-dependent loop): each pair's expert matrices
        gathered and dequantized (inductor fuses both into one kernel), then one bmm per projection."""
        flat_ids = ids.reshape(-1)

        def gathered(proj: str) -> torch.Tensor:  # [P, N, K] in x's dtype, transposed for x @ W
            q = getattr(self, f"{proj}_qweight").index_select(0, flat_ids)
            scales = getattr(self, f"{proj}_scales").index_select(0, flat_ids)
            return (q.to(x.dtype) * scales.to(x.dtype)[..., None]).transpose(1, 2)

        return swiglu_per_pair(x, weights, gathered("gate_up_proj"), gathered("down_proj"))

    def forward_reference(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Reference twin: dequantize every expert, then the plain masked loop of `ops.moe.experts_reference`."""
        return experts_reference(x, weights, ids, self.dequantize("gate_up_proj", x.dtype),
                                 self.dequantize("down_proj", x.dtype))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for p in PROJECTIONS:
            if not self.coded:
                name = f"{p}_scales" if self.bits == 8 else f"{p}_scale_zero"
                setattr(self, name, getattr(self, name).to(SCALE_DTYPE))
            q = getattr(self, f"{p}_qweight")
            if self.is_kernel_layout[p] and q.device.type != "cpu":  # the kernel layout is CPU-only
                setattr(self, f"{p}_qweight", torch.stack([from_kernel_layout(q[e]) for e in range(q.shape[0])]))
                self.is_kernel_layout[p] = False
        return self

    def extra_repr(self) -> str:
        E = self.num_experts
        (two_i, D) = self.shapes["gate_up_proj"]
        g = (f", group_sizes={self.group_sizes}, coded={self.coded}, kernel_layout={self.is_kernel_layout}"
             if self.bits == 4 else "")
        return f"num_experts={E}, hidden_size={D}, intermediate_size={two_i // 2}, bits={self.bits}{g}"
