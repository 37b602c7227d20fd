"""Hybrid cache and per-forward batch metadata.

The model always runs on a flat "varlen" batch: B sequences, sequence i contributing `seq_lens[i]` new tokens
after `context_lens[i]` cached ones, all N = Σ seq_lens tokens concatenated in order. Projections, norms and the
MoE see `[N, D]`; the two sequence mixers pad to `[B, T, ...]` internally (right padding, exact for both).

`HybridCache` holds everything a sequence carries between forwards:
- full-attention layers (and the MTP layer): a PAGED K/V pool `[num_blocks * block_size, HKV, head_dim]` per layer;
  a sequence owns a block table (list of block ids) and its token p lives at row
  `block_table[p // block_size] * block_size + p % block_size`;
- DeltaNet layers: one fixed STATE SLOT per sequence: conv state `[num_slots, C, W-1]` (activation dtype) and the
  recurrent state `[num_slots, HV, K, V]` (fp32 by default).
The engine's block manager decides block tables and slots; `SequenceCache` is the simple owner used by
`model(input_ids, cache=...)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..config import Qwen3NextConfig


class HybridCache:
    def __init__(self, config: Qwen3NextConfig, num_slots: int, num_blocks: int, block_size: int = 64,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 state_dtype: torch.dtype = torch.float32, include_mtp: bool = True):
        if num_slots < 1 or num_blocks < 0 or block_size < 1:
            raise ValueError(f"HybridCache: need num_slots >= 1, num_blocks >= 0, block_size >= 1; got "
                             f"{num_slots}, {num_blocks}, {block_size}")
        self.config = config
        self.num_slots, self.num_blocks, self.block_size = num_slots, num_blocks, block_size
        self.dtype, self.device, self.state_dtype = dtype, torch.device(device), state_dtype
        c = config
        kv_shape = (num_blocks * block_size, c.num_key_value_heads, c.head_dim)
        keys: list[str] = [str(i) for i in c.attention_layers]
        if include_mtp:
            keys += [f"mtp{i}" for i in range(c.num_nextn_predict_layers)]
        self.k = {key: torch.zeros(kv_shape, dtype=dtype, device=device) for key in keys}
        self.v = {key: torch.zeros(kv_shape, dtype=dtype, device=device) for key in keys}
        conv_shape = (num_slots, c.conv_dim, c.linear_conv_kernel_dim - 1)
        rec_shape = (num_slots, c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim)
        self.conv = {str(i): torch.zeros(conv_shape, dtype=dtype, device=device) for i in c.linear_layers}
        self.recurrent = {str(i): torch.zeros(rec_shape, dtype=state_dtype, device=device) for i in c.linear_layers}

    def reset_slots(self, slots: list[int]) -> None:
        """Zero the DeltaNet state of these slots (a new sequence starts from S = 0)."""
        if not slots:
            return
        idx = torch.tensor(slots, dtype=torch.long, device=self.device)
        for t in (*self.conv.values(), *self.recurrent.values()):
            t.index_fill_(0, idx, 0)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for d in (self.k, self.v, self.conv, self.recurrent) for t in d.values())


@dataclass
class BatchInfo:
    """What one forward computes: per sequence, how many new tokens after how many cached ones.

    `slots` and `block_tables` are required when a cache is passed. Build with `prepare()` before use.
    """

    seq_lens: list[int]
    context_lens: list[int] | None = None
    slots: list[int] | None = None
    block_tables: list[list[int]] | None = None
    # ---- derived by prepare() ----
    positions: torch.Tensor = field(default=None, repr=False)  # [N] absolute position of each token
    lengths: torch.Tensor = field(default=None, repr=False)  # [B] new tokens per sequence
    pad_index: torch.Tensor | None = field(default=None, repr=False)  # [N] row in the [B*T] padded layout
    max_len: int = 0  # T of the padded layout
    slot_index: torch.Tensor | None = field(default=None, repr=False)  # [B]
    slot_range: tuple[int, int] | None = None  # (first, last + 1) when the slots are consecutive, in batch order
    kv_write_index: torch.Tensor | None = field(default=None, repr=False)  # [N] rows of the paged pool
    kv_read_index: torch.Tensor | None = field(default=None, repr=False)  # [B, L] rows of the paged pool
    attn_mask: torch.Tensor | None = field(default=None, repr=False)  # [B, 1, T, L] bool, True = attend
    kv_len: int = 0  # L: keys per sequence after this forward (the longest sequence's context + new tokens)
    sees_all_keys: bool = False  # one query per sequence and every sequence holds L keys: attention needs no mask
    kv_view: tuple[int, int] | None = None  # (first row, row stride) when sequence b's L keys are the pool rows
    # first + b * stride ... + L - 1: K/V can then be read as a strided view instead of gathered (see kv_rows)
    is_uniform: bool = False  # all sequences have the same number of new tokens and no context
    is_decode: bool = False  # every sequence has exactly one new token

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return sum(self.seq_lens)

    def prepare(self, device: torch.device | str, block_size: int | None = None,
                num_blocks: int | None = None, views: bool = True) -> BatchInfo:
        """Derive the tensors and flags the layers read. `views=False` keeps to index-based access (no state or K/V
        views, always a mask): one code path whatever the slots and block tables, for the compiled decoder."""
        B = len(self.seq_lens)
        if B == 0 or any(n < 1 for n in self.seq_lens):
            raise ValueError(f"seq_lens: need at least one sequence with >= 1 token each, got {self.seq_lens}")
        ctx = self.context_lens if self.context_lens is not None else [0] * B
        if len(ctx) != B:
            raise ValueError(f"context_lens: expected {B} entries, got {len(ctx)}")
        T = max(self.seq_lens)
        self.max_len = T
        self.lengths = torch.tensor(self.seq_lens, dtype=torch.long, device=device)
        if T == 1:
            pos, pad = list(ctx), list(range(B))
        else:
            pos, pad = [], []
            for i, (n, c) in enumerate(zip(self.seq_lens, ctx)):
                pos.extend(range(c, c + n))
                pad.extend(range(i * T, i * T + n))
        self.positions = torch.tensor(pos, dtype=torch.long, device=device)
        self.is_uniform = all(n == T for n in self.seq_lens) and not any(ctx)
        self.is_decode = T == 1
        self.pad_index = None if all(n == T for n in self.seq_lens) else torch.tensor(pad, dtype=torch.long,
                                                                                      device=device)
        if self.slots is not None:
            if len(self.slots) != B:
                raise ValueError(f"slots: expected {B} entries, got {len(self.slots)}")
            self.slot_index = torch.tensor(self.slots, dtype=torch.long, device=device)
            first = self.slots[0]
            consecutive = views and self.slots == list(range(first, first + B))
            self.slot_range = (first, first + B) if consecutive else None
        if self.block_tables is not None:
            assert block_size is not None
            if len(self.block_tables) != B:
                raise ValueError(f"block_tables: expected {B} entries, got {len(self.block_tables)}")
            L = max(c + n for n, c in zip(self.seq_lens, ctx))
            nb = max(len(t) for t in self.block_tables)
            for n, c, table in zip(self.seq_lens, ctx, self.block_tables):
                if len(table) * block_size < c + n:
                    raise ValueError(f"block_tables: a table of {len(table)} blocks of {block_size} cannot hold "
                                     f"{c + n} tokens")
            totals = [c + n for n, c in zip(self.seq_lens, ctx)]
            self.kv_len = L
            self.sees_all_keys = views and T == 1 and all(t == L for t in totals)
            self.kv_view = _strided_kv_view(self.block_tables, totals, L, block_size, num_blocks) if views else None
            if self.is_decode and self.kv_view is not None and self.sees_all_keys:
                # The common decode step: no read index, no mask; the B write rows computed on the host.
                rows = [t[c // block_size] * block_size + c % block_size for t, c in zip(self.block_tables, ctx)]
                self.kv_write_index = torch.tensor(rows, dtype=torch.long, device=device)
                return self
            # Vectorised: row of token p = table[p // block_size] * block_size + p % block_size (no per-token Python).
            tables = torch.tensor([t + [0] * (nb - len(t)) for t in self.block_tables], dtype=torch.long,
                                  device=device)  # [B, nb]
            key_pos = torch.arange(L, device=device)
            blocks = tables[:, (key_pos // block_size).clamp(max=nb - 1)]  # [B, L]
            rows = blocks * block_size + key_pos % block_size
            valid = key_pos[None, :] < torch.tensor(totals, device=device)[:, None]
            self.kv_read_index = torch.where(valid, rows, 0)  # [B, L]
            b_of = torch.repeat_interleave(torch.arange(B, device=device), self.lengths)
            self.kv_write_index = rows[b_of, self.positions]  # [N]
            q_pos = torch.arange(T, device=device)[None, :] + torch.tensor(ctx, device=device)[:, None]  # [B, T]
            self.attn_mask = (key_pos[None, None, :] <= q_pos[:, :, None])[:, None]  # [B, 1, T, L]
        elif not self.is_uniform:
            if any(ctx):
                raise ValueError("context_lens: cached context needs block_tables and a cache")
            q_pos = torch.arange(T, device=device)
            valid = q_pos[None, :] < self.lengths[:, None]  # [B, T] keys that exist
            self.attn_mask = ((q_pos[None, :, None] >= q_pos[None, None, :]) & valid[:, None, :])[:, None]
        return self

    def kv_rows(self, pool: torch.Tensor) -> torch.Tensor:
        """This batch's keys (or values) [B, L, ...] from a paged K/V pool [rows, ...]: a view when the block tables
        allow it (`kv_view`), else a gather (a copy of the whole context)."""
        if self.kv_view is not None:
            first, stride = self.kv_view
            if self.batch_size == 1:
                return pool[first:first + self.kv_len].unsqueeze(0)
            # plain slicing and view ops (no as_strided), so that torch.compile can trace it
            block = pool[first:first + self.batch_size * stride]
            return block.view(self.batch_size, stride, *pool.shape[1:])[:, :self.kv_len]
        return pool[self.kv_read_index]

    def state_rows(self, pool: torch.Tensor) -> torch.Tensor:
        """This batch's rows [B, ...] of a per-slot state pool: a VIEW when the slots are consecutive (in-place
        updates land in the cache), else a gathered copy that `store_state_rows` writes back."""
        if self.slot_range is not None:
            return pool[self.slot_range[0]:self.slot_range[1]]
        return pool.index_select(0, self.slot_index)

    def store_state_rows(self, pool: torch.Tensor, rows: torch.Tensor) -> None:
        """Write NEW rows [B, ...] (not the `state_rows` view) to this batch's slots of the pool."""
        if self.slot_range is None:
            pool.index_copy_(0, self.slot_index, rows.to(pool.dtype))
        else:
            pool[self.slot_range[0]:self.slot_range[1]].copy_(rows)

    def write_back_state_rows(self, pool: torch.Tensor, rows: torch.Tensor) -> None:
        """After updating the `state_rows(pool)` result in place: copy it back unless it was a view of the pool."""
        if self.slot_range is None:
            pool.index_copy_(0, self.slot_index, rows)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[N, ...] -> [B, T, ...], zeros at padded positions."""
        T = self.max_len
        if self.pad_index is None:  # -1, not len(seq_lens): under torch.compile the batch size stays symbolic
            return x.reshape(-1, T, *x.shape[1:])
        B = self.batch_size
        out = x.new_zeros(B * T, *x.shape[1:])
        out.index_copy_(0, self.pad_index, x)
        return out.view(B, T, *x.shape[1:])

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [N, ...]."""
        flat = x.reshape(-1, *x.shape[2:])
        return flat if self.pad_index is None else flat.index_select(0, self.pad_index)


def _strided_kv_view(tables: list[list[int]], totals: list[int], L: int, block_size: int,
                     num_blocks: int | None) -> tuple[int, int] | None:
    """(first row, stride) if sequence b's first L pool rows are rows first + b * stride ... + L - 1, i.e. its
    blocks are consecutive, the sequences sit at equal distances of at least L rows, and every row read lies inside
    the pool; else None. Rows past a sequence's own length are read but masked."""
    if num_blocks is None:
        return None
    starts = []
    for table, total in zip(tables, totals):
        used = -(-total // block_size)
        if any(table[j] != table[0] + j for j in range(1, used)):
            return None
        starts.append(table[0] * block_size)
    if len(starts) == 1:
        return (starts[0], 0) if starts[0] + L <= num_blocks * block_size else None
    stride = starts[1] - starts[0]
    if stride < L or any(s != starts[0] + i * stride for i, s in enumerate(starts)):
        return None
    if starts[0] + len(starts) * stride > num_blocks * block_size:
        return None
    return starts[0], stride


class SequenceCache:
    """A cache for `model(input_ids, cache=...)`: B sequences, each with its own slot and a contiguous run of blocks.

    Every call appends that call's tokens; `lengths[i]` counts the tokens sequence i holds so far.
    """

    def __init__(self, config: Qwen3NextConfig, batch_size: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", block_size: int = 64):
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"SequenceCache: batch_size and max_len must be >= 1, got {batch_size}, {max_len}")
        blocks_per_seq = math.ceil(max_len / block_size)
        self.max_len = max_len
        self.cache = HybridCache(config, batch_size, batch_size * blocks_per_seq, block_size, dtype, device)
        self.block_tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(batch_size)]
        self.lengths = [0] * batch_size

    @property
    def batch_size(self) -> int:
        return len(self.lengths)


@dataclass
class ForwardContext:
    """Everything a layer needs besides its input, built once per forward."""

    batch: BatchInfo
    cos: torch.Tensor  # [N, rotary_dim]
    sin: torch.Tensor
    cache: HybridCache | None = None
    router_logits: list[torch.Tensor] | None = None  # filled by MoE layers when not None (training aux loss)
