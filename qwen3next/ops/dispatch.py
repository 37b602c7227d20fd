"""The registry of the inference fast paths: what each one does, when it may run, its threshold, its switch, and the
plain code it replaces (its reference twin, which the tests compare it against).

The code that picks a path asks this module: `fast_decode()` for the decode fast paths, `linear_backend()` for the
oneDNN linear, `threshold(name)` for a size limit. Tests change a limit with `set_threshold(name, value)` (it returns
the previous value) instead of patching module constants. `describe()` prints the table.

Switches, read once from the environment at import:
- `QWEN3NEXT_FAST_DECODE=0` (or `set_fast_decode(False)`): the plain code for every entry switched by it.
- `QWEN3NEXT_LINEAR=torch` (or `set_linear_backend("torch")`): `F.linear` everywhere; the default is "auto".

- `QWEN3NEXT_AOT=0` (or `set_aot_decode(False)`): the compiled decoder runs every step through torch.compile, never
  through the ahead-of-time library (engine/aot_step.py).
- `QWEN3NEXT_HUGEPAGES=0` (or `set_hugepages(False)`): the weights stay where torch allocated them (ops/hugepages.py).
- `QWEN3NEXT_KERNELS=0` (or `kernels.set_enabled(False)`): the torch code instead of the native C++ kernels
  (qwen3next/kernels); `native_kernels(x)` says whether they may run for an input.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import textwrap
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import kernels

FAST_DECODE_ENV = "QWEN3NEXT_FAST_DECODE"
LINEAR_ENV = "QWEN3NEXT_LINEAR"
KERNELS_ENV = kernels.KERNELS_ENV
AOT_ENV = "QWEN3NEXT_AOT"
HUGEPAGES_ENV = "QWEN3NEXT_HUGEPAGES"
_scope = threading.local()  # per thread: inside sync_free_scope()


@dataclass(frozen=True)
class FastPath:
    """One fast path. `fast` and `reference` are "module:qualname" of the code that runs and of its plain twin;
    `threshold` is the default size limit (its meaning is stated in `guard`), None where there is none; `switch` is
    the environment variable that turns it off, None where nothing does."""

    name: str
    does: str
    guard: str
    fast: str
    reference: str
    threshold: int | None = None
    switch: str | None = None


FAST_PATHS: tuple[FastPath, ...] = (
    FastPath(
        "onednn_linear",
        "fp32 `x Wᵀ` through oneDNN's inner product (`torch.ops.mkldnn._linear_pointwise`): measured 1.5-2x faster "
        "than MKL's sgemm/sgemv for big weights at decode sizes, equal at prefill, slower for small weights",
        "no bias; fp32 x and weight on CPU; weight 2-D, contiguous, with >= threshold elements (measured break-even "
        "~128K-256K); no gradient needed; not under torch.compile (inductor picks the matmul there); oneDNN present",
        "qwen3next.ops.linear:linear", "torch.nn.functional:linear", threshold=1 << 18, switch=LINEAR_ENV),
    FastPath(
        "deltanet_decode_step",
        "one new token per sequence through `gated_delta_step`: conv and recurrent states updated in place in the "
        "cache, about a third of the ops of the general DeltaNet forward",
        "fast_decode(); a decode batch with a cache whose recurrent state has x's dtype promoted to fp32",
        "qwen3next.ops.gated_delta:gated_delta_step", "qwen3next.ops.gated_delta:recurrent_gated_delta_rule",
        switch=FAST_DECODE_ENV),
    FastPath(
        "deltanet_verify_step",
        "speculative verification (the same few new tokens per sequence, every token's state kept): the decode "
        "step's math T times on a copy of the state, conv by one unfold; measured on the demo model (1 thread, T = "
        "3): 0.36 ms per layer vs 0.43 for the general path",
        "fast_decode(); a verification batch (`capture_states`) with equal new-token counts and an fp32 state",
        "qwen3next.model.deltanet:GatedDeltaNet._verify_step", "qwen3next.model.deltanet:GatedDeltaNet.forward",
        switch=FAST_DECODE_ENV),
    FastPath(
        "delta_rule_token_loop",
        "the delta rule as a loop over tokens instead of the chunked form: fewer ops for short inputs (measured "
        "crossover ~32 tokens); runs in training too, both forms are exact",
        "at most threshold tokens per sequence (the padded length)",
        "qwen3next.ops.gated_delta:recurrent_gated_delta_rule", "qwen3next.ops.gated_delta:chunk_gated_delta_rule",
        threshold=16),
    FastPath(
        "native_delta_rule",
        "the delta rule of a prefill (or any multi-token input) token by token in C++ (`qwen3next::gated_delta_rule`, "
        "qwen3next/kernels/delta_rule.cpp): work split over (sequence, value head, 32 value columns), each block of "
        "the state in L1 for the whole prompt, one pass over it per token; fewer operations than the chunked form. "
        "Measured, 1 thread, `small`'s heads (16 of 64 x 64), 8K tokens: 0.23-0.43 s vs 0.6-1.3 s for the chunked "
        "form (busy machine, same runs)",
        "kernels built and switched on; CPU; fp32 q/k/v/g/beta and state; no gradient; no per-token state capture",
        "qwen3next.kernels:gated_delta_rule", "qwen3next.ops.gated_delta:chunk_gated_delta_rule",
        switch=KERNELS_ENV),
    FastPath(
        "native_delta_decode",
        "the recurrent update of a DeltaNet decode step in C++ (`qwen3next::gated_delta_decode`, delta_rule.cpp): "
        "each sequence's state updated in place in its row of the slot pool, one read and one write per state, no "
        "gather and no copy back. Measured, 1 thread, `small`'s heads (16 of 64 x 64), batch 1: 14 us vs 164 for "
        "`gated_delta_step` (eager); in the compiled step the torch form's batched matmul plus fused update cost "
        "~0.15 ms per layer",
        "kernels built and switched on; the DeltaNet decode step (\"deltanet_decode_step\"); CPU; fp32 q and state",
        "qwen3next.kernels:gated_delta_decode", "qwen3next.ops.gated_delta:gated_delta_step", switch=KERNELS_ENV),
    FastPath(
        "mtp_prompt_kv_only",
        "with speculative decoding, a step holding prompt positions (a prefill chunk) runs the MTP head's keys and "
        "values there, and its whole forward (attention, experts, norm) only at the positions that draft next: a "
        "later draft reads nothing else of a prompt position",
        "fast_decode(); an engine step with more positions than its verifications' (prompt chunks), or none drafting",
        "qwen3next.engine.runner:ModelRunner._mtp_write_kv", "qwen3next.engine.runner:ModelRunner._mtp_hidden",
        switch=FAST_DECODE_ENV),
    FastPath(
        "native_delta_verify",
        "a speculative verification's delta rule in C++ (`qwen3next::gated_delta_verify`, delta_rule.cpp): the "
        "prefill kernel's walk, keeping the state after every token; functional, so the ahead-of-time verification "
        "program calls it too, in place of inductor's loops over the torch form (measured on the demo model, 1 "
        "thread, batch 1, 3 tokens: the compiled verification 2.33 -> 2.05 ms; eagerly one call instead of one per "
        "token plus state copies)",
        "kernels built and switched on; the DeltaNet verification step (\"deltanet_verify_step\"); CPU; fp32 q "
        "and state",
        "qwen3next.kernels:gated_delta_verify", "qwen3next.ops.gated_delta:recurrent_gated_delta_rule",
        switch=KERNELS_ENV),
    FastPath(
        "experts_gathered",
        "each token-expert pair's two matrices gathered (`index_select` streams them at full bandwidth) and run as "
        "one bmm per projection, no host sync; measured on `small` (2 threads): 1.11x faster steps at 4 pairs "
        "(batch 1), 0.95x at 32 pairs (batch 8, where the grouped GEMM wins)",
        "fast_decode(); at most threshold token-expert pairs, or any number under torch.compile or a CUDA graph "
        "capture (`sync_free()`: no host sync allowed there, and `torch._grouped_mm` has no fp32 meta kernel)",
        "qwen3next.ops.moe:_experts_gathered", "qwen3next.ops.moe:experts_reference",
        threshold=16, switch=FAST_DECODE_ENV),
    FastPath(
        "experts_grouped_mm",
        "pairs sorted by expert, then one grouped GEMM per projection (`torch._grouped_mm`): a fixed ~15 ops per "
        "layer instead of ~8 per hit expert, no host sync",
        "fast_decode(); more pairs than experts_gathered's threshold; CPU; this torch has `torch._grouped_mm`",
        "qwen3next.ops.moe:_experts_grouped_mm", "qwen3next.ops.moe:experts_reference", switch=FAST_DECODE_ENV),
    FastPath(
        "int8_kernel",
        "int8 weight times bf16 activations through torch's CPU kernel `torch._weight_int8pack_mm` (fp32 "
        "activations cast to bf16); otherwise the weight is converted to x's dtype for the dense matmul",
        "CPU; K a multiple of 32; weight 64-byte aligned; bf16 activations, or fp32 ones with at most threshold rows "
        "(measured, 1 thread, 512 -> 1536: the kernel wins at 16 rows, 1.4 vs 1.9 ms, and loses at 64, 4.4 vs 3.1)",
        "qwen3next.quant.linear:int8_linear", "qwen3next.quant.linear:int8_linear_reference", threshold=32),
    FastPath(
        "int4_kernel",
        "int4 weight held in torch's kernel layout times bf16 activations through `_weight_int4pack_mm_for_cpu`",
        "the weight was put in the kernel layout at load: CPU, N % 16 == 0, group size 32, 64, 128 or 256",
        "qwen3next.quant.linear:int4_linear", "qwen3next.quant.linear:int4_linear_reference"),
    FastPath(
        "quant_experts_few_tokens",
        "quantized experts for a few tokens: activations cast to bf16 once, pairs grouped by expert on the host, each "
        "hit expert's two CPU kernels called directly",
        "fast_decode(); at most threshold tokens; CPU; the kernels take every expert (int4: kernel layout; int8: K a "
        "multiple of 32 and 64-byte aligned matrices)",
        "qwen3next.quant.experts:QuantizedExperts._forward_few_tokens",
        "qwen3next.quant.experts:QuantizedExperts.forward_reference", threshold=16, switch=FAST_DECODE_ENV),
    FastPath(
        "quant_experts_gathered",
        "int8 experts in the compiled decode step: each pair's matrices gathered and dequantized (inductor fuses the "
        "two), one bmm per projection; no host sync, no data-dependent loop",
        "int8 experts, under torch.compile",
        "qwen3next.quant.experts:QuantizedExperts._forward_gathered",
        "qwen3next.quant.experts:QuantizedExperts.forward_reference"),
    FastPath(
        "native_linear",
        "`x Wᵀ` for a few rows through the C++ weight-streaming kernel `qwen3next::linear` (qwen3next/kernels): fp32, "
        "bf16-stored, int8 and int4 weights, fp32 activations (int8 / int4: rounded to int8 per block of 32 columns / "
        "per weight group inside the kernel). Measured, 1 thread, one row, 32000 x 512: fp32 2.8 ms vs oneDNN 5.0; "
        "bf16 1.7 vs 4.1 (F.linear in bf16); int8 0.62 vs 1.7 (`_weight_int8pack_mm`); int4 0.46 vs 0.97 "
        "(`_weight_int4pack_mm_for_cpu`). More rows of an int8/int4 weight "
        "(prefill): the weight dequantized by the native `qwen3next::dequantize`, then one fp32 GEMM",
        "kernels built and switched on; CPU; fp32 x; no gradient; at most threshold x NATIVE_ROWS_FACTOR rows "
        "(ops/linear.py, measured per format: fp32 and int8 8, bf16 16, int4 64); fp32 weights of at least "
        "`NATIVE_FP32_MIN_ELEMENTS` (32K) elements (smaller: torch's call is as fast); int4 in the canonical layout",
        "qwen3next.kernels:linear", "qwen3next.kernels:linear_reference", threshold=8, switch=KERNELS_ENV),
    FastPath(
        "native_moe",
        "the routed experts of a MoE layer in ONE C++ call (`qwen3next::moe`): pairs grouped by expert, each hit "
        "expert's rows streamed once, SwiGLU and the weighted sum inside; fp32, bf16, int8 and int4 stacked experts; "
        "opaque to torch.compile, so the compiled step uses it too",
        "kernels built and switched on; fast_decode(); CPU; fp32 x with at most threshold tokens",
        "qwen3next.kernels:moe", "qwen3next.kernels:moe_reference", threshold=16, switch=KERNELS_ENV),
    FastPath(
        "native_decode_attention",
        "the attention of a decode step (one query per sequence) in ONE C++ call (`qwen3next::decode_attention`): "
        "keys and values read where they lie in the paged pools through the step's row index, each row once for the "
        "query heads sharing it, online softmax over blocks of 64 keys; no [B, L] gather copy of the context and no "
        "mask (the compiled and ahead-of-time steps read the cache by index: at a 4K context the gather was most of "
        "the step's attention time)",
        "kernels built and switched on; fast_decode(); CPU; fp32 q and pools; a decode step whose K/V are read by "
        "index (`KVAccess.read_index`, i.e. not the view path)",
        "qwen3next.kernels:decode_attention", "qwen3next.kernels:decode_attention_reference", switch=KERNELS_ENV),
    FastPath(
        "cache_views",
        "the state rows of consecutive slots read and updated as VIEWS of the pools (no gather / scatter of the "
        "state per layer), and K/V of sequences whose blocks are consecutive read as a strided view of the pool "
        "instead of a gather of the whole context (twins: `index_select` / `index_copy_` of the state rows in "
        "`StateRows`, `KVAccess.gather`)",
        "`BatchInfo.prepare(views=True)` (everywhere but the compiled decoder, which reads by index); slots "
        "consecutive in batch order; block tables consecutive, equally spaced and inside the pool",
        "qwen3next.model.batch:KVAccess.read_view", "qwen3next.model.batch:KVAccess.gather"),
    FastPath(
        "attention_without_mask",
        "decode attention without a mask when every query sees all L keys (SDPA's plain form), and SDPA's causal "
        "form for fresh equal-length prompts, instead of an explicit [B, 1, T, L] mask",
        "`prepare(views=True)`, one token per sequence and every sequence holding L keys; or a uniform fresh batch",
        "qwen3next.model.attention:GatedAttention.forward", "torch.nn.functional:scaled_dot_product_attention"),
    FastPath(
        "attention_context_split",
        "prefill chunks that continue a cached context: per sequence, flash attention over the context keys (no mask) "
        "and over the new keys (causal), merged exactly by their log-sum-exps; no [B, 1, T, L] mask, so memory stays "
        "O(chunk) whatever the context (a 512-token chunk at 256K context: a 128 MiB boolean mask, which SDPA turns "
        "into 512 MiB of floats, avoided)",
        "CPU; a cache; several new tokens per sequence (not decode) and not a fresh batch of equal-length prompts "
        "(those take SDPA's causal form); B x T x L of at least threshold (smaller masks cost less than the extra "
        "calls); `uses_context_split()` is the guard's size part, shared with the memory estimate",
        "qwen3next.model.attention:context_split_attention", "torch.nn.functional:scaled_dot_product_attention",
        threshold=1 << 20, switch=FAST_DECODE_ENV),
    FastPath(
        "compiled_decode",
        "the decoder stack of a decode step through torch.compile, reading the cache through index tensors only "
        "(opt-in: `--compile`, `LLM(..., compile_decode=True)`; needs a C++ compiler)",
        "a compiled decoder was built and warmed up; fast_decode(); one new token per sequence, with a cache",
        "qwen3next.engine.compiled:CompiledDecoder.decode",
        "qwen3next.model.qwen3_next:Qwen3NextForCausalLM.hidden_states", switch=FAST_DECODE_ENV),
    FastPath(
        "cuda_graph_decode",
        "on a CUDA GPU, the decode step (embedding, stack, final norm, LM head) captured once per (batch size, key "
        "bucket) in a CUDA graph and replayed: one launch instead of ~870 kernel launches from Python "
        "(engine/cuda_graph.py); over the torch.compile'd step with `compile_decode`",
        "a CUDA device, not `enforce_eager`, no tensor parallelism, no int4 experts; fast_decode(); one new token "
        "per sequence, at most max_num_seqs (<= 64) sequences of at most 8,192 keys",
        "qwen3next.engine.cuda_graph:CUDAGraphDecoder.decode",
        "qwen3next.model.qwen3_next:Qwen3NextForCausalLM.hidden_states", switch=FAST_DECODE_ENV),
    FastPath(
        "aot_decode_step",
        "within the compiled decoder, decode steps of 1..8 sequences through an AOTInductor library built from the "
        "same graph (embedding, stack, final norm, LM head): no dynamo guards and no Python between kernels, ~20% "
        "faster per step on `small` at 1 thread; cached on disk per model shape (engine/aot_step.py)",
        "the compiled decoder's guard, at most 8 sequences (the native kernels' row limits stay on one side), the "
        "library built (first use: ~40 s of compiling, then loaded from the cache)",
        "qwen3next.engine.aot_step:AOTDecodeStep.run",
        "qwen3next.model.qwen3_next:Qwen3NextForCausalLM.hidden_states", switch=AOT_ENV),
    FastPath(
        "hugepage_weights",
        "the model's parameters and buffers copied, once, into one anonymous mapping advised for transparent huge "
        "pages (2 MiB: one TLB entry and no prefetcher stop per 2 MiB of weights streamed instead of per 4 KiB); "
        "measured, 1 thread, weights streaming from memory: a 32000 x 512 int8 product 741 -> 580 us, 3072 x 512 "
        "int4 74 -> 66 us",
        "Linux with transparent huge pages not \"never\"; CPU tensors of at least 4 KiB, contiguous, not sharing "
        "storage; done by the engine's model runner and the bench before any step",
        "qwen3next.ops.hugepages:place_weights", "qwen3next.ops.hugepages:leave_weights", switch=HUGEPAGES_ENV),
)
_BY_NAME = {p.name: p for p in FAST_PATHS}
_thresholds = {p.name: p.threshold for p in FAST_PATHS if p.threshold is not None}


# ---- switches --------------------------------------------------------------------------------------------------------
_fast_decode = os.environ.get(FAST_DECODE_ENV, "1") != "0"
_LINEAR_BACKENDS = ("auto", "torch")
_linear_backend = os.environ.get(LINEAR_ENV, "auto")
if _linear_backend not in _LINEAR_BACKENDS:
    raise ValueError(f"{LINEAR_ENV}: expected one of {_LINEAR_BACKENDS}, got {_linear_backend!r}")


_aot_decode = os.environ.get(AOT_ENV, "1") != "0"
_hugepages = os.environ.get(HUGEPAGES_ENV, "1") != "0"


def set_hugepages(enabled: bool) -> bool:
    """Turn the placement of weights on huge pages on or off (for models placed from now on); returns the previous
    setting."""
    global _hugepages
    previous, _hugepages = _hugepages, bool(enabled)
    return previous


def switch_state() -> tuple:
    """The switches and thresholds now, as one comparable value (a traced graph depends on them)."""
    return (_fast_decode, _linear_backend, kernels.enabled(), tuple(sorted(_thresholds.items())))


def set_aot_decode(enabled: bool) -> bool:
    """Turn the ahead-of-time decode step on or off; returns the previous setting."""
    global _aot_decode
    previous, _aot_decode = _aot_decode, bool(enabled)
    return previous


def fast_decode() -> bool:
    """True where a decode fast path may run: enabled, and no autograd graph is being recorded."""
    return _fast_decode and not torch.is_grad_enabled()


def set_fast_decode(enabled: bool) -> bool:
    """Turn the decode fast paths on or off; returns the previous setting."""
    global _fast_decode
    previous, _fast_decode = _fast_decode, bool(enabled)
    return previous


def sync_free(x: torch.Tensor) -> bool:
    """Whether the code running on `x` must not wait for the device or size tensors by their values: inside
    torch.compile's trace, while a CUDA graph is being captured (engine/cuda_graph.py), where a host sync is an
    error and every shape is fixed, or inside `sync_free_scope()` (the eager run before a capture, so that it runs
    the kernels the graph will hold)."""
    return (torch.compiler.is_compiling() or getattr(_scope, "sync_free", False)
            or (x.is_cuda and torch.cuda.is_current_stream_capturing()))


@contextlib.contextmanager
def sync_free_scope():
    """Within this block (this thread), `sync_free()` is True: the code takes its sync-free forms."""
    previous = getattr(_scope, "sync_free", False)
    _scope.sync_free = True
    try:
        yield
    finally:
        _scope.sync_free = previous


def native_kernels(x: torch.Tensor) -> bool:
    """Whether the native CPU kernels may run for activations `x`: built and switched on, fp32 CPU input, no autograd
    graph being recorded (the ops have no backward)."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled()
            and kernels.available())


def uses_context_split(batch_size: int, new_tokens: int, kv_len: int) -> bool:
    """Whether attention over a step of `batch_size` sequences with (padded) `new_tokens` new tokens each and up to
    `kv_len` keys takes the mask-free `attention_context_split` path, by its switch and threshold; the caller checks
    the rest of its guard (CPU, not a fresh equal-length batch, a cache)."""
    return (enabled("attention_context_split") and new_tokens > 1
            and batch_size * new_tokens * kv_len >= threshold("attention_context_split"))


def linear_backend() -> str:
    """The linear backend now: "auto" (oneDNN where it is faster) or "torch" (always F.linear)."""
    return _linear_backend


def set_linear_backend(name: str) -> str:
    """Select "auto" (oneDNN where it is faster) or "torch" (always F.linear); returns the previous setting."""
    global _linear_backend
    if name not in _LINEAR_BACKENDS:
        raise ValueError(f"linear backend: expected one of {_LINEAR_BACKENDS}, got {name!r}")
    previous, _linear_backend = _linear_backend, name
    return previous


# environment variable -> (the value that turns its entries off, whether they are on now)
_SWITCHES: dict[str, tuple[str, Callable[[], bool]]] = {
    FAST_DECODE_ENV: ("0", lambda: _fast_decode),
    LINEAR_ENV: ("torch", lambda: _linear_backend == "auto"),
    KERNELS_ENV: ("0", kernels.enabled),
    AOT_ENV: ("0", lambda: _aot_decode),
    HUGEPAGES_ENV: ("0", lambda: _hugepages),
}


# ---- lookups ---------------------------------------------------------------------------------------------------------
def fast_path(name: str) -> FastPath:
    """The registry entry `name`; ValueError naming the known ones for any other name."""
    entry = _BY_NAME.get(name)
    if entry is None:
        raise ValueError(f"unknown fast path {name!r}: expected one of {', '.join(_BY_NAME)}")
    return entry


def enabled(name: str) -> bool:
    """Whether the switch of fast path `name` is on (its guard, autograd included, still decides per call)."""
    switch = fast_path(name).switch
    return switch is None or _SWITCHES[switch][1]()


def threshold(name: str) -> int:
    """The current size limit of fast path `name` (see its guard for what it bounds)."""
    if name not in _thresholds:
        fast_path(name)  # unknown names: the error lists them all
        raise ValueError(f"fast path {name!r} has no threshold; these do: {', '.join(_thresholds)}")
    return _thresholds[name]


def set_threshold(name: str, value: int) -> int:
    """Set the size limit of fast path `name`; returns the previous value."""
    previous = threshold(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"threshold {name!r}: expected an integer >= 0, got {value!r}")
    _thresholds[name] = value
    return previous


def resolve(target: str) -> Callable:
    """The object named by a "module:qualname" string (an entry's `fast` or `reference`)."""
    module, _, qualname = target.partition(":")
    obj = importlib.import_module(module)
    for attr in qualname.split("."):
        obj = getattr(obj, attr)
    return obj


def describe() -> str:
    """The registry as text: per entry its current threshold, its switch, what it does, its guard and its twins."""
    blocks = []
    for p in FAST_PATHS:
        tags = []
        if p.threshold is not None:
            tags.append(f"threshold {_thresholds[p.name]}")
        if p.switch is not None:
            tags.append(f"off with {p.switch}={_SWITCHES[p.switch][0]}")
        tags.append("on" if enabled(p.name) else "switched off")
        rows = [("does", p.does), ("runs when", p.guard), ("fast", p.fast), ("reference", p.reference)]
        blocks.append("\n".join([f"{p.name} [{', '.join(tags)}]"] + [
            textwrap.fill(text, 116, initial_indent=f"  {label + ':':<11}", subsequent_indent=" " * 13,
                          break_on_hyphens=False)
            for label, text in rows]))
    return "\n\n".join(blocks)
