"""Which part of every layer a tensor-parallel rank holds. Plain Python, no torch.

Splits follow the model's structure, so that a rank computes whole heads and whole experts and each sublayer needs
one all-reduce (parallel/shard.py):
- gated attention: by key/value head, each with its query heads (GQA groups stay together). With more ranks than
  key/value heads, every key/value head is replicated on `world / num_key_value_heads` ranks, which split its query
  heads;
- Gated DeltaNet: by key-head group (a key head with its value heads: q/k/v/z rows, b/a rows, conv channels,
  dt_bias/A_log and the recurrent state follow it);
- routed experts: expert-parallel, each rank owns a contiguous range of experts;
- shared expert and dense MLPs: by intermediate channel;
- embedding and LM head: by vocabulary row.
Where a count does not divide by the world size the first ranks take one more (a rank may own no expert at all);
where a split is impossible (fewer heads than ranks), `TPPlan` says so, naming the config field.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Qwen3NextConfig


def split_range(n: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of part `rank` when n items are split into `world` contiguous parts, the first n % world parts
    one larger."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@dataclass(frozen=True)
class AttentionShard:
    q_heads: tuple[int, int]  # [start, stop) of the query heads
    kv_heads: tuple[int, int]  # [start, stop) of the key/value heads (one head when replicated)


@dataclass(frozen=True)
class TPPlan:
    config: Qwen3NextConfig
    world: int
    rank: int

    def __post_init__(self) -> None:
        c, n = self.config, self.world
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"tensor_parallel_size must be a positive int, got {n!r}")
        if not 0 <= self.rank < n:
            raise ValueError(f"rank {self.rank} outside [0, {n})")
        H, HKV = c.num_attention_heads, c.num_key_value_heads
        if n > HKV:
            if n % HKV:
                raise ValueError(f"tensor_parallel_size {n} must divide num_key_value_heads ({HKV}) or be a multiple "
                                 f"of it (each key/value head is then replicated on {n}/{HKV} ranks)")
            if H // HKV < n // HKV:
                raise ValueError(f"tensor_parallel_size {n}: each key/value head's {H // HKV} query heads "
                                 f"(num_attention_heads / num_key_value_heads) cannot be split over the {n // HKV} "
                                 f"ranks that share it")
        if c.linear_num_key_heads < n:
            raise ValueError(f"tensor_parallel_size {n} exceeds linear_num_key_heads ({c.linear_num_key_heads}): "
                             f"DeltaNet is split by key-head group, at least one per rank")
        for name in ("intermediate_size", "shared_expert_intermediate_size", "vocab_size"):
            value = getattr(c, name)
            if 0 < value < n:
                raise ValueError(f"tensor_parallel_size {n} exceeds {name} ({value})")

    # ---- per kind of layer --------------------------------------------------------------------------------------
    def attention(self) -> AttentionShard:
        c, n, r = self.config, self.world, self.rank
        H, HKV = c.num_attention_heads, c.num_key_value_heads
        group = H // HKV  # query heads per key/value head
        if n <= HKV:
            k0, k1 = split_range(HKV, n, r)
            return AttentionShard((k0 * group, k1 * group), (k0, k1))
        share = n // HKV  # ranks per key/value head
        kv = r // share
        q0, q1 = split_range(group, share, r % share)
        return AttentionShard((kv * group + q0, kv * group + q1), (kv, kv + 1))

    def deltanet_key_heads(self) -> tuple[int, int]:
        return split_range(self.config.linear_num_key_heads, self.world, self.rank)

    def experts(self) -> tuple[int, int]:
        return split_range(self.config.num_experts, self.world, self.rank)

    def channels(self, size: int) -> tuple[int, int]:
        """An MLP's intermediate channels."""
        return split_range(size, self.world, self.rank)

    def vocab(self) -> tuple[int, int]:
        return split_range(self.config.vocab_size, self.world, self.rank)
