"""The hybrid cache: everything a sequence carries between forwards, allocated from the layers' declarations.

- full-attention layers (and the MTP layer): a PAGED K/V pool `[num_blocks * block_size, HKV, head_dim]` per layer,
  in the activation dtype or the one `kv_cache_dtype` asks for (bf16 / fp16: half the bytes of an fp32 cache, the
  keys and values rounded once as they are written, widened as they are read); a sequence owns a block table (list of
  block ids) and its token p lives at row `block_table[p // block_size] * block_size + p % block_size`;
- DeltaNet layers: one fixed STATE SLOT per sequence in each of the pools the layer declares (conv state
  `[num_slots, C, W-1]` in the activation dtype, recurrent state `[num_slots, HV, K, V]`, fp32 by default).

Slot operations (`zero_slots`, `copy_slot`; `copy_kv_rows` for blocks) are the only whole-slot changes; a forward
reads and commits its slots' rows through `ForwardContext.state()` (see batch.py). The engine's block manager decides
block tables and slots; `SequenceCache` is the simple owner used by `model(input_ids, cache=...)`.
"""

from __future__ import annotations

import math

import torch

from ..config import Qwen3NextConfig
from .attention import GatedAttention
from .batch import BatchInfo
from .deltanet import GatedDeltaNet
from .layout import CacheLayout

KV_CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_kv_cache_dtype(value: str | torch.dtype | None, activation_dtype: torch.dtype) -> torch.dtype:
    """`kv_cache_dtype` (vLLM's name): "auto" or None -> the activation dtype (exact); "float32", "bfloat16",
    "float16" (or that torch dtype) -> K/V pools of that dtype. ValueError naming the argument otherwise."""
    if value is None or value == "auto":
        return activation_dtype
    if isinstance(value, torch.dtype) and value in KV_CACHE_DTYPES.values():
        return value
    if isinstance(value, str) and value in KV_CACHE_DTYPES:
        return KV_CACHE_DTYPES[value]
    raise ValueError(f"kv_cache_dtype: expected 'auto' or one of {', '.join(repr(k) for k in KV_CACHE_DTYPES)}, "
                     f"got {value!r}")


def cache_layout(config: Qwen3NextConfig, tp_size: int = 1, include_mtp: bool = True) -> CacheLayout:
    """The layout of a model's cache when each of `tp_size` ranks holds 1/tp_size of the heads: DeltaNet key/value
    heads are split, attention K/V heads too (replicated, one per rank, when tp_size exceeds their number)."""
    c = config
    if tp_size < 1 or c.linear_num_key_heads % tp_size or c.linear_num_value_heads % tp_size:
        raise ValueError(f"tp_size: {tp_size} must be >= 1 and divide the DeltaNet heads "
                         f"({c.linear_num_key_heads} key, {c.linear_num_value_heads} value)")
    HKV = c.num_key_value_heads
    if HKV % tp_size and tp_size % HKV:
        raise ValueError(f"tp_size: {tp_size} must divide the {HKV} attention key/value heads, or be a multiple of "
                         f"them (each rank then holds one replicated head)")
    kv_heads = max(1, HKV // tp_size)
    kv_spec = GatedAttention.declare_kv(kv_heads, c.head_dim)
    keys = [str(i) for i in c.attention_layers]
    if include_mtp:
        keys += [f"mtp{i}" for i in range(c.num_nextn_predict_layers)]
    state = GatedDeltaNet.declare_state(c.linear_num_key_heads // tp_size, c.linear_num_value_heads // tp_size,
                                        c.linear_key_head_dim, c.linear_value_head_dim, c.linear_conv_kernel_dim)
    return CacheLayout(kv={key: kv_spec for key in keys}, state={str(i): state for i in c.linear_layers})


class HybridCache:
    def __init__(self, config: Qwen3NextConfig, num_slots: int, num_blocks: int, block_size: int = 64,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 state_dtype: torch.dtype = torch.float32, include_mtp: bool = True,
                 layout: CacheLayout | None = None, kv_dtype: torch.dtype | None = None):
        """`layout` defaults to the whole model's (`cache_layout(config, include_mtp=include_mtp)`); a model passes
        the one its layers declare (`Qwen3NextForCausalLM.cache_layout()`), and `include_mtp` is then not used.
        `kv_dtype`: the K/V pools' dtype (None: `dtype`, the activations')."""
        if num_slots < 1 or num_blocks < 0 or block_size < 1:
            raise ValueError(f"HybridCache: need num_slots >= 1, num_blocks >= 0, block_size >= 1; got "
                             f"{num_slots}, {num_blocks}, {block_size}")
        self.config = config
        self.layout = layout if layout is not None else cache_layout(config, include_mtp=include_mtp)
        self.num_slots, self.num_blocks, self.block_size = num_slots, num_blocks, block_size
        self.dtype, self.device, self.state_dtype = dtype, torch.device(device), state_dtype
        self.kv_dtype = kv_dtype = kv_dtype if kv_dtype is not None else dtype

        def zeros(shape: tuple[int, ...], dt: torch.dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dt, device=device)

        rows = num_blocks * block_size
        self.k = {key: zeros((rows, s.num_kv_heads, s.head_dim), kv_dtype) for key, s in self.layout.kv.items()}
        self.v = {key: zeros((rows, s.num_kv_heads, s.head_dim), kv_dtype) for key, s in self.layout.kv.items()}
        # layer key -> pool name -> [num_slots, *shape]
        self.state = {key: {s.name: zeros((num_slots, *s.shape), dtype if s.dtype == "activation" else state_dtype)
                            for s in specs} for key, specs in self.layout.state.items()}

    def _state_pools(self) -> list[torch.Tensor]:
        return [pool for pools in self.state.values() for pool in pools.values()]

    def _check_slots(self, slots: list[int]) -> None:
        bad = [s for s in slots if not 0 <= s < self.num_slots]
        if bad:
            raise ValueError(f"slot {bad[0]} outside the cache's [0, {self.num_slots})")

    def zero_slots(self, slots: list[int]) -> None:
        """Zero every state pool's rows of these slots: a sequence starting there starts from S = 0."""
        if not slots:
            return
        self._check_slots(slots)
        idx = torch.tensor(slots, dtype=torch.long, device=self.device)
        for pool in self._state_pools():
            pool.index_fill_(0, idx, 0)

    def copy_slot(self, src: int, dst: int) -> None:
        """Copy slot `src`'s state to slot `dst` in every pool (a snapshot, or its restore)."""
        self._check_slots([src, dst])
        for pool in self._state_pools():
            pool[dst].copy_(pool[src])

    def copy_kv_rows(self, src_block: int, dst_block: int, num_rows: int) -> None:
        """Copy the first `num_rows` token rows of block `src_block` to block `dst_block` in every K/V pool (a
        cached prefix's partial last block, which a resuming sequence continues in a block of its own)."""
        bs = self.block_size
        if not (0 <= src_block < self.num_blocks and 0 <= dst_block < self.num_blocks and 0 <= num_rows <= bs):
            raise ValueError(f"copy_kv_rows: blocks {src_block}, {dst_block} and {num_rows} rows must lie in the "
                             f"cache's {self.num_blocks} blocks of {bs} rows")
        for pool in (*self.k.values(), *self.v.values()):
            pool[dst_block * bs:dst_block * bs + num_rows].copy_(pool[src_block * bs:src_block * bs + num_rows])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k.values(), *self.v.values(), *self._state_pools()))


class SequenceCache:
    """A cache for `model(input_ids, cache=...)`: B sequences, each with its own slot and a contiguous run of blocks.

    Every call appends that call's tokens; `lengths[i]` counts the tokens sequence i holds so far, at most
    `capacity`.
    """

    def __init__(self, config: Qwen3NextConfig, batch_size: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", block_size: int = 64, layout: CacheLayout | None = None,
                 kv_dtype: torch.dtype | None = None):
        if batch_size < 1 or capacity < 1:
            raise ValueError(f"SequenceCache: batch_size and max_len must be >= 1, got {batch_size}, {capacity}")
        blocks_per_seq = math.ceil(capacity / block_size)
        self.capacity = capacity
        self.hybrid = HybridCache(config, batch_size, batch_size * blocks_per_seq, block_size, dtype, device,
                                  layout=layout, kv_dtype=kv_dtype)
        self.block_tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(batch_size)]
        self.lengths = [0] * batch_size

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    def batch(self, rows: list[int], seq_lens: list[int]) -> BatchInfo:
        """The batch that appends seq_lens[j] tokens to sequence rows[j]; raises ValueError past the capacity."""
        for i, n in zip(rows, seq_lens):
            if self.lengths[i] + n > self.capacity:
                raise ValueError(f"cache: sequence {i} would hold {self.lengths[i] + n} tokens, more than its "
                                 f"max_len {self.capacity}")
        return BatchInfo(seq_lens, [self.lengths[i] for i in rows], list(rows), [self.block_tables[i] for i in rows])

    def advance(self, rows: list[int], seq_lens: list[int]) -> None:
        """Count the tokens of a finished forward built by `batch(rows, seq_lens)`."""
        for i, n in zip(rows, seq_lens):
            self.lengths[i] += n
