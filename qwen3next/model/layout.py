"""What the hybrid cache holds per layer, as the layers declare it.

Each DeltaNet layer declares its per-sequence state pools (`StateSpec`: conv and recurrent state, shapes from the
layer's LOCAL head counts), each attention layer (and the MTP layer) its paged K/V (`KVSpec`). `HybridCache`
allocates exactly what a `CacheLayout` lists, so a layer holding a shard of the heads (tensor parallelism) gets a
cache of its own size. (`Qwen3NextConfig.kv_bytes_per_token` / `state_bytes_per_sequence` are closed forms of the
same sizes for `qwen3next info`; a test checks they agree with the declarations.) Plain Python, no torch: the
scheduler uses `paged_row`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StateSpec:
    """One per-slot state pool of a layer: `[num_slots, *shape]`, stored in the activation dtype or the state dtype
    (the recurrent state is kept in fp32 by default: it accumulates over the whole sequence)."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # "activation" | "state"

    def nbytes(self, activation_bytes: int, state_bytes: int) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * (activation_bytes if self.dtype == "activation" else state_bytes)


@dataclass(frozen=True)
class KVSpec:
    """The paged K and V pools of one attention layer: `[num_blocks * block_size, num_kv_heads, head_dim]` each."""

    num_kv_heads: int
    head_dim: int

    def bytes_per_token(self, activation_bytes: int) -> int:
        return 2 * self.num_kv_heads * self.head_dim * activation_bytes


@dataclass(frozen=True)
class CacheLayout:
    """Cache key (the layer index as a string, or `mtp<i>`) -> what that layer keeps."""

    kv: dict[str, KVSpec]
    state: dict[str, tuple[StateSpec, ...]]

    def kv_bytes_per_token(self, activation_bytes: int) -> int:
        return sum(s.bytes_per_token(activation_bytes) for s in self.kv.values())

    def state_bytes_per_slot(self, activation_bytes: int, state_bytes: int = 4) -> int:
        return sum(s.nbytes(activation_bytes, state_bytes) for specs in self.state.values() for s in specs)


def paged_row(block_table: list[int], position: int, block_size: int) -> int:
    """Row of the paged K/V pools that holds token `position` of a sequence with this block table."""
    return block_table[position // block_size] * block_size + position % block_size
