"""Hybrid cache memory: how many bytes to spend and how to split them. Plain Python; torch only for CUDA budgets.

Full-attention layers keep K/V in a paged pool of `num_blocks` blocks of `block_size` tokens; DeltaNet layers
keep one fixed-size state slot per running sequence. `plan_cache` splits a byte budget between the two;
`BlockManager` (block_manager.py) then hands the blocks and slots to sequences.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


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
    """How many KV blocks and state slots to allocate, and what that buys."""

    geometry: CacheGeometry
    num_blocks: int
    num_slots: int
    budget_bytes: int
    max_model_len: int

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
        return min(self.num_slots, self.num_blocks // cdiv(self.max_model_len, self.block_size))

    def describe(self) -> str:
        g = self.geometry
        avg = self.num_kv_tokens // self.num_slots
        lines = [
            f"cache plan: {fmt_bytes(self.total_bytes)} of a {fmt_bytes(self.budget_bytes)} budget",
            f"  DeltaNet state: {self.num_slots:,} slots x {fmt_bytes(g.state_bytes_per_slot)} "
            f"= {fmt_bytes(self.state_bytes)}",
            f"  attention KV: {self.num_blocks:,} blocks x {self.block_size} tokens = {self.num_kv_tokens:,} tokens "
            f"x {fmt_bytes(g.kv_bytes_per_token)} = {fmt_bytes(self.kv_bytes)}",
            f"  fits {self.num_slots:,} concurrent sequences averaging {avg:,} tokens of context, "
            f"or {self.num_full_length_seqs:,} at max_model_len={self.max_model_len:,}",
        ]
        return "\n".join(lines)


def plan_cache(geometry: CacheGeometry, budget_bytes: int, max_num_seqs: int, max_model_len: int) -> CachePlan:
    """Split `budget_bytes` into state slots and KV blocks.

    Slots come first: as many as `max_num_seqs` asks for, as long as one sequence can still reach
    `max_model_len` and every other slot keeps at least one KV block; every remaining byte goes to KV blocks.
    Raises ValueError when not even one sequence of `max_model_len` tokens fits.
    """
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
        raise ValueError(
            f"cache budget {budget_bytes:,} B ({fmt_bytes(budget_bytes)}) cannot hold one sequence of "
            f"max_model_len={max_model_len:,}: that needs {slot_b:,} B of DeltaNet state + {blocks_per_seq:,} KV "
            f"blocks x {block_b:,} B = {one_seq:,} B ({fmt_bytes(one_seq)}); lower max_model_len or raise the budget"
        )
    # n slots need n*slot_b + (blocks_per_seq + n - 1)*block_b <= budget.
    num_slots = min(max_num_seqs, (budget_bytes - (blocks_per_seq - 1) * block_b) // (slot_b + block_b))
    if block_b == 0:  # no attention layers: blocks cost nothing, give every slot a full-length table
        num_blocks = num_slots * blocks_per_seq
    else:
        num_blocks = (budget_bytes - num_slots * slot_b) // block_b
    return CachePlan(geometry, num_blocks, num_slots, budget_bytes, max_model_len)


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
                      max_model_len: int) -> CachePlan:
    """The engine's plan: `max_memory` (default: `default_budget(device)`), but never more than `max_num_seqs`
    sequences of `max_model_len` tokens can use, since the pools are zero-filled memory."""
    budget = parse_memory(max_memory) if max_memory is not None else default_budget(device)
    useful = max_num_seqs * geometry.sequence_bytes(max_model_len)
    return plan_cache(geometry, min(budget, useful), max_num_seqs, max_model_len)
