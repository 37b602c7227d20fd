"""Hybrid cache memory: how many bytes to spend and how to split them. Plain Python; torch only for CUDA budgets.

Full-attention layers keep K/V in a paged pool of `num_blocks` blocks of `block_size` tokens; DeltaNet layers
keep one fixed-size state slot per running sequence. `plan_cache` splits a byte budget between the two;
`BlockManager` (block_manager.py) then hands the blocks and slots to sequences.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..config import Qwen3NextConfig


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def fmt_bytes(n: float) -> str:
    """`n` bytes in binary units: '512 B', '1.5 KiB', ..., '2.0 TiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n}"


@dataclass(frozen=True)
class CacheGeometry:
    """Per-token and per-sequence cache sizes of a model.

    kv_bytes_per_token: K + V bytes of one token summed over all attention layers
        (`Qwen3NextConfig.kv_bytes_per_token()`; 24 KiB for the 80B model in bf16).
    state_bytes_per_slot: conv + recurrent state bytes of one sequence summed over all DeltaNet layers
        (`Qwen3NextConfig.state_bytes_per_sequence()`; ~73.7 MiB with an fp32 recurrent state).
    """

    kv_bytes_per_token: int
    state_bytes_per_slot: int
    block_size: int

    def __post_init__(self) -> None:
        if self.kv_bytes_per_token < 0 or self.state_bytes_per_slot < 0:
            raise ValueError(f"cache byte sizes must be >= 0, got kv_bytes_per_token={self.kv_bytes_per_token}, "
                             f"state_bytes_per_slot={self.state_bytes_per_slot}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")

    @property
    def block_bytes(self) -> int:
        return self.kv_bytes_per_token * self.block_size

    def sequence_bytes(self, num_tokens: int) -> int:
        """One state slot plus the KV blocks of `num_tokens` tokens."""
        return self.state_bytes_per_slot + cdiv(num_tokens, self.block_size) * self.block_bytes


@dataclass(frozen=True)
class CachePlan:
    """How many KV blocks and state slots to allocate, and what that buys. `num_slots` counts every state slot: the
    running sequences' and, with prefix caching, `num_snapshot_slots` more for state snapshots."""

    geometry: CacheGeometry
    num_blocks: int
    num_slots: int
    budget_bytes: int
    max_model_len: int
    num_snapshot_slots: int = 0

    @property
    def num_seq_slots(self) -> int:
        """Slots for running sequences: how many can run at once."""
        return self.num_slots - self.num_snapshot_slots

    @property
    def block_size(self) -> int:
        return self.geometry.block_size

    @property
    def kv_bytes(self) -> int:
        return self.num_blocks * self.geometry.block_bytes

    @property
    def state_bytes(self) -> int:
        return self.num_slots * self.geometry.state_bytes_per_slot

    @property
    def total_bytes(self) -> int:
        return self.kv_bytes + self.state_bytes

    @property
    def num_kv_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_full_length_seqs(self) -> int:
        """How many sequences of max_model_len tokens fit at once."""
        return min(self.num_seq_slots, self.num_blocks // cdiv(self.max_model_len, self.block_size))

    def describe(self) -> str:
        g = self.geometry
        seqs = self.num_seq_slots
        avg = self.num_kv_tokens // seqs
        snaps = (f" ({seqs:,} for sequences, {self.num_snapshot_slots:,} for prefix-cache snapshots)"
                 if self.num_snapshot_slots else "")
        lines = [
            f"cache plan: {fmt_bytes(self.total_bytes)} of a {fmt_bytes(self.budget_bytes)} budget",
            f"  DeltaNet state: {self.num_slots:,} slots x {fmt_bytes(g.state_bytes_per_slot)} "
            f"= {fmt_bytes(self.state_bytes)}{snaps}",
            f"  attention KV: {self.num_blocks:,} blocks x {self.block_size} tokens = {self.num_kv_tokens:,} tokens "
            f"x {fmt_bytes(g.kv_bytes_per_token)} = {fmt_bytes(self.kv_bytes)}",
            f"  fits {seqs:,} concurrent sequences averaging {avg:,} tokens of context, "
            f"or {self.num_full_length_seqs:,} at max_model_len={self.max_model_len:,}",
        ]
        return "\n".join(lines)


def plan_cache(geometry: CacheGeometry, budget_bytes: int, max_num_seqs: int, max_model_len: int,
               snapshot_slots: int = 0) -> CachePlan:
    """Split `budget_bytes` into state slots and KV blocks.

    Sequence slots come first: as many as `max_num_seqs` asks for, as long as one sequence can still reach
    `max_model_len` and every other slot keeps at least one KV block; then as many of `snapshot_slots` (prefix
    caching) as the same condition allows; every remaining byte goes to KV blocks.
    Raises ValueError when not even one sequence of `max_model_len` tokens fits.
    """
    if snapshot_slots < 0:
        raise ValueError(f"snapshot_slots must be >= 0, got {snapshot_slots}")
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    if max_model_len < 1:
        raise ValueError(f"max_model_len must be >= 1, got {max_model_len}")
    blocks_per_seq = cdiv(max_model_len, geometry.block_size)
    slot_b, block_b = geometry.state_bytes_per_slot, geometry.block_bytes
    if slot_b + block_b == 0:
        raise ValueError("cache geometry has neither KV nor state bytes; nothing to plan")
    one_seq = geometry.sequence_bytes(max_model_len)
    if budget_bytes < one_seq:
        fits = max(0, budget_bytes - slot_b) // block_b * geometry.block_size if block_b else 0
        fix = (f"this budget holds at most {fits:,} tokens of one sequence: lower max_model_len (--max-model-len) to "
               f"{fits:,}, or raise" if fits else "it does not hold even the DeltaNet state and one KV block: raise")
        raise ValueError(
            f"max_memory: a cache budget of {budget_bytes:,} B ({fmt_bytes(budget_bytes)}) cannot hold one sequence "
            f"of max_model_len={max_model_len:,}: that needs {slot_b:,} B of DeltaNet state + {blocks_per_seq:,} KV "
            f"blocks x {block_b:,} B = {one_seq:,} B ({fmt_bytes(one_seq)}); {fix} max_memory (--max-memory) to at "
            f"least {one_seq:,} B"
        )
    # n slots need n*slot_b + (blocks_per_seq + n - 1)*block_b <= budget.
    num_slots = min(max_num_seqs, (budget_bytes - (blocks_per_seq - 1) * block_b) // (slot_b + block_b))
    if slot_b:  # snapshots from what the sequences leave
        snapshot_slots = min(snapshot_slots, (budget_bytes - num_slots * slot_b
                                              - (blocks_per_seq + num_slots - 1) * block_b) // slot_b)
    budget = budget_bytes - snapshot_slots * slot_b
    if block_b == 0:  # no attention layers: blocks cost nothing, give every slot a full-length table
        num_blocks = num_slots * blocks_per_seq
    else:
        num_blocks = (budget - num_slots * slot_b) // block_b
    return CachePlan(geometry, num_blocks, num_slots + snapshot_slots, budget_bytes, max_model_len, snapshot_slots)


def default_snapshot_slots(geometry: CacheGeometry, budget_bytes: int, max_num_seqs: int, max_model_len: int) -> int:
    """Prefix-cache snapshot slots when not set: four per sequence slot (a prompt's end, a finished sequence, a chat
    turn, a long prompt's intervals), from what the budget holds beyond `max_num_seqs` sequences of `max_model_len`
    tokens and at most a quarter of it. Snapshots also live in sequence slots while no sequence needs them, so a
    budget with no room to spare still caches prefixes."""
    want = 4 * max_num_seqs
    slot_b = geometry.state_bytes_per_slot
    if slot_b == 0:
        return want
    spare = budget_bytes - max_num_seqs * geometry.sequence_bytes(max_model_len)
    return max(0, min(want, spare // slot_b, budget_bytes // 4 // slot_b))


# ---- one context, planned ahead (`qwen3next info --context`) ------------------------------------------------------
def config_geometry(config: Qwen3NextConfig, dtype_bytes: int, block_size: int = 64,
                    state_dtype_bytes: int = 4) -> CacheGeometry:
    """The cache geometry the engine allocates for a model of `config` (without the MTP layer's K/V, which only
    speculative decoding caches): K/V and conv state in the activation dtype, the recurrent state in
    `state_dtype_bytes` (fp32). The closed forms of the layers' declared layout (`runner.cache_geometry`)."""
    return CacheGeometry(kv_bytes_per_token=config.kv_bytes_per_token(dtype_bytes),
                         state_bytes_per_slot=config.state_bytes_per_sequence(dtype_bytes, state_dtype_bytes),
                         block_size=block_size)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes that `batch` sequences of `context` tokens need.

    kv_bytes / state_bytes: the cache the engine's planner allocates for them (whole KV blocks; one DeltaNet state
    slot each): `cache_bytes` is the `max_memory` with which `Engine(max_num_seqs=batch, max_model_len=context)` runs
    them all at once; one byte less runs fewer at once (batch > 1) or is refused, saying what would fit (batch 1).
    workspace_bytes: the peak activation memory of one prefill
    chunk of `chunk` tokens at the end of the context (`prefill_workspace`) in the forms `paths`, outside the cache
    budget; `parts` says what it is made of. Weights are not counted."""

    context: int
    batch: int
    chunk: int
    block_size: int
    kv_bytes: int
    state_bytes: int
    workspace_bytes: int
    parts: dict[str, int]
    paths: PrefillPaths

    @property
    def cache_bytes(self) -> int:
        return self.kv_bytes + self.state_bytes

    @property
    def total_bytes(self) -> int:
        return self.cache_bytes + self.workspace_bytes


def estimate_memory(config: Qwen3NextConfig, context: int, batch: int = 1, dtype_bytes: int = 2,
                    block_size: int = 64, chunk: int = 512, paths: PrefillPaths | None = None) -> MemoryEstimate:
    """Cache and prefill workspace for `batch` sequences of `context` tokens in an activation dtype of `dtype_bytes`
    (recurrent state fp32), with the planner's own arithmetic (`CacheGeometry.sequence_bytes`). `paths`: the forms
    the prefill runs in (default: `engine_prefill_paths`, what this process's CPU engine would take)."""
    for name, v in (("context", context), ("batch", batch), ("chunk", chunk), ("block_size", block_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    T = min(chunk, context)
    paths = paths if paths is not None else engine_prefill_paths(T, context)
    g = config_geometry(config, dtype_bytes, block_size)
    kv = batch * (g.sequence_bytes(context) - g.state_bytes_per_slot)
    parts = prefill_workspace(config, T, context, dtype_bytes, paths)
    return MemoryEstimate(context, batch, chunk, block_size, kv, batch * g.state_bytes_per_slot, parts["total"], parts,
                          paths)


@dataclass(frozen=True)
class PrefillPaths:
    """The forms of the two path-dependent parts of a prefill chunk (see `ops.dispatch`): the delta rule in C++
    ("native_delta_rule") or the chunked torch form, and attention over a cached context split in two mask-free
    flash calls ("attention_context_split") or one SDPA call with a [T, L] mask."""

    native_delta_rule: bool = False
    context_split: bool = False


def engine_prefill_paths(chunk: int, context: int) -> PrefillPaths:
    """The paths the CPU engine of this process takes for a chunk of `chunk` new tokens ending at `context`, by the
    guards the forward uses (imports torch; never builds the native kernels: switched on counts as available)."""
    from .. import kernels
    from ..ops import dispatch

    split = context > chunk and dispatch.uses_context_split(1, chunk, context)  # context == chunk: a fresh prompt
    return PrefillPaths(native_delta_rule=kernels.enabled(), context_split=split)


def delta_rule_workspace(T: int, H: int, HV: int, K: int, V: int, native: bool = False, chunk_size: int = 32) -> int:
    """Peak bytes the delta rule of a prefill allocates for T tokens of one sequence (fp32 math), beyond its inputs.
    The only place the workspace estimate knows the ops' internals: update it with them.

    native (`kernels.gated_delta_rule`): the output [T, HV, V] and two states [HV, K, V]. Chunked
    (`ops.gated_delta.chunk_gated_delta_rule`), counted from its body: every [T, ...] tensor it keeps until it
    returns (chunked q, k [H, K] and v [HV, V]; g, beta, their cumsum and exp [HV]; the four [HV, C, C] chunk
    matrices (decay, L, Q Kᵀ ⊙ D, T); W, the decayed Q and K [HV, K]; U [HV, V]) and, at its end, the per-chunk
    outputs, their stack and the reordered copy (3 x [HV, V])."""
    if native:
        return 4 * (T * HV * V + 2 * HV * K * V)
    c = min(chunk_size, T)
    Tp = cdiv(T, c) * c  # the last chunk is zero-padded
    return 4 * Tp * (2 * H * K + 5 * HV * V + 3 * HV * K + 4 * HV * c + 4 * HV)


def prefill_workspace(config: Qwen3NextConfig, chunk: int, context: int, dtype_bytes: int,
                      paths: PrefillPaths = PrefillPaths()) -> dict[str, int]:
    """Estimated peak activation bytes of one prefill forward of `chunk` new tokens that ends at token `context`
    (one sequence; the chunk attends over all `context` keys), as the CPU engine runs it: the largest live tensors
    of each layer kind (layers run one after another, so the peak is the largest layer's) on top of what lives
    through the whole forward. Activations in `dtype_bytes`; the DeltaNet math, router softmax and MoE accumulation
    in fp32. Measured against torch's allocator in tests/test_memory_plan.py. Returns the parts and their "total":

    - resident: the embedding output, the hidden states entering a layer and its normed input [T, D] (the callers'
      frames hold them), rope cos/sin [T, rotary], the key rows read from the block table [L] (int64) and, unless
      attention is split, the attention mask [T, L] (bool);
    - deltanet: in_proj output [T, 2 (key + value dim)], conv output [T, conv dim] (and its fp32 copy in lower
      precision), normalised q, k [T, H, K] fp32, g and beta, then the larger of the delta rule
      (`delta_rule_workspace`) and the gated output norm (o [T, HV, V] and three fp32 temporaries of its size);
    - attention: q_proj output [T, 2 H Dh], k, v [T, HKV, Dh], then the largest phase: q's norm, rope, the
      attention call (q [T, H, Dh], K and V of the context gathered from the paged pool [L, HKV, Dh] when the blocks
      are not consecutive, and the mask as SDPA converts it [T, L] in the activation dtype (none for a fresh
      prompt) with the output [T, H, Dh]; or, split, the two flash outputs, the merged fp32 output and the result),
      or what follows it (the output reordered, the gate's sigmoid and their product [T, H Dh]);
    - moe: the mixer's output added to the residual [T, D], router logits [T, E] (+ fp32 softmax), the grouped
      GEMMs' gate/up output [T k, 2 I] with the largest of what comes and goes beside it (gathered inputs [T k, D];
      SwiGLU output [T k, I] with the down output [T k, D]; the down output in fp32 with the fp32 sum [T, D]); a
      dense MLP layer's [T, I] tensors when there are any;
    - sampling: the logits of the one row sampled at the end of the prompt (fp32).
    """
    c = config
    T, L, a = chunk, context, dtype_bytes
    D, rot = c.hidden_size, c.rotary_dim
    masked = L > T and not paths.context_split  # a fresh prompt (L == T) runs SDPA's causal form: no mask either
    mask = T * L if masked else 0
    parts = {"resident": a * T * (3 * D + 2 * rot) + mask + 8 * L}
    if c.linear_layers:
        H, HV, K, V = c.linear_num_key_heads, c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim
        key_dim, value_dim = H * K, HV * V
        upcast = 4 * T * c.conv_dim if a < 4 else 0
        out_norm = 16 * T * value_dim  # o, then x / rms(x), silu(z) (from its fp32 copy) and their product, fp32
        parts["deltanet"] = (a * T * (2 * key_dim + 2 * value_dim + c.conv_dim) + upcast + 4 * T * 2 * key_dim
                             + 2 * 4 * T * HV + max(delta_rule_workspace(T, H, HV, K, V, paths.native_delta_rule),
                                                    out_norm))
    if c.attention_layers:
        H, HKV, Dh = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        U, gather = T * H * Dh, 2 * a * L * HKV * Dh
        if paths.context_split:  # two flash outputs, the merged fp32 output (and an fp32 copy) and the result
            call = 3 * a * U + 4 * U + (4 * U if a < 4 else 0)
        else:  # the mask as SDPA converts it, the output and SDPA's own buffers (measured: ~2 bytes per output value)
            call = a * (mask + U) + 2 * U
        phases = [(14 if a < 4 else 2 * a) * U,  # q's norm (fp32 temporaries in lower precision)
                  2 * a * U,  # q before and after rope
                  gather + a * U + call,  # the attention call, with K/V gathered and q
                  gather + 4 * a * U]  # then q, the output reordered, the gate's sigmoid and their product
        parts["attention"] = a * (T * 2 * H * Dh + 2 * T * HKV * Dh) + max(phases)
    moe_layers = [i for i in range(c.num_hidden_layers) if c.is_moe_layer(i)]
    if moe_layers:
        Tk, inter, E = T * c.num_experts_per_tok, c.moe_intermediate_size, c.num_experts
        # alongside the gate/up output, one of: the gathered inputs; SwiGLU's output while the down GEMM writes; the
        # down output and its fp32 copy (lower precision); the fp32 down output and the fp32 sum
        during = [a * Tk * D, a * Tk * (inter + D), (a * Tk * D if a < 4 else 0) + 4 * Tk * D, 4 * Tk * D + 4 * T * D]
        parts["moe"] = a * T * D + (a + 4) * T * E + a * Tk * 2 * inter + max(during)
    if len(moe_layers) < c.num_hidden_layers:
        parts["dense_mlp"] = a * T * (4 * c.intermediate_size + 2 * D)
    parts["sampling"] = 4 * c.vocab_size
    layers = [v for k, v in parts.items() if k not in ("resident", "sampling")]
    parts["total"] = parts["resident"] + max(layers, default=0) + parts["sampling"]
    return parts


def parse_memory(value: int | str) -> int:
    """Bytes from an int or a string like '512MiB', '2GB', '1.5G'."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"max_memory: expected a positive size, got {value}")
        return value
    s = str(value).strip().lower().replace(" ", "")
    units = {"gib": 1024**3, "mib": 1024**2, "kib": 1024, "gb": 10**9, "mb": 10**6, "kb": 10**3, "g": 1024**3,
             "m": 1024**2, "k": 1024, "b": 1, "": 1}
    for u in sorted(units, key=len, reverse=True):
        if s.endswith(u):
            try:
                n = float(s[: len(s) - len(u)] if u else s)
            except ValueError:
                break
            if n <= 0:
                break
            return int(n * units[u])
    raise ValueError(f"max_memory: expected a size like '512MiB' or '2GiB', got {value!r}")


def default_budget(device, fraction: float = 0.25, cap: int = 8 * 1024**3) -> int:
    """A quarter of the currently available memory on `device` (a torch.device: RAM, or GPU memory for CUDA),
    at most 8 GiB."""
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return int(min(free * fraction, cap))
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        avail = info.get("MemAvailable", 4 * 1024**3)
    except OSError:
        avail = (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")) if hasattr(os, "sysconf") else 4 << 30
    return int(min(avail * fraction, cap))


def engine_cache_plan(geometry: CacheGeometry, max_memory: int | str | None, device, max_num_seqs: int,
                      max_model_len: int, snapshot_slots: int | None = 0) -> CachePlan:
    """The engine's plan: `max_memory` (default: `default_budget(device)`), but never more than `max_num_seqs`
    sequences of `max_model_len` tokens and the snapshots can use, since the pools are zero-filled memory.
    `snapshot_slots`: slots for prefix-cache snapshots beyond the sequences' (None: `default_snapshot_slots`)."""
    budget = parse_memory(max_memory) if max_memory is not None else default_budget(device)
    if snapshot_slots is None:
        snapshot_slots = default_snapshot_slots(geometry, budget, max_num_seqs, max_model_len)
    useful = max_num_seqs * geometry.sequence_bytes(max_model_len) + snapshot_slots * geometry.state_bytes_per_slot
    return plan_cache(geometry, min(budget, useful), max_num_seqs, max_model_len, snapshot_slots)
