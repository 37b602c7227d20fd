"""Per-forward batch metadata: which tokens, where they sit, and which cache rows they read and write.

The model always runs on a flat "varlen" batch: B sequences, sequence i contributing `seq_lens[i]` new tokens after
`context_lens[i]` cached ones, all N = sum(seq_lens) tokens concatenated in order. Projections, norms and the MoE see
`[N, D]`; the two sequence mixers pad to `[B, T, ...]` internally (right padding, exact for both).

`BatchInfo.prepare()` derives three independent parts, each with its own read/write methods:
- `tokens` (`TokenLayout`): positions, the padded layout, and the mask of a batch without cache;
- `state` (`SlotAccess`): the DeltaNet state slots, read and committed through `StateRows`;
- `kv` (`KVAccess`): the paged K/V rows written and read by the attention layers.

Speculative verification (`BatchInfo.capture_states`): the DeltaNet layers then keep their state after EVERY new
token instead of committing the last one (`ForwardContext.captured`), and the caller commits, per sequence, the
state after the last token it keeps (`ForwardContext.commit_captured`): exact rollback of rejected drafts without
re-running anything.

Prefix-caching snapshots (`BatchInfo.snapshots`): `(b, m, slot)` asks the DeltaNet layers to also store sequence b's
state after its first m new tokens (1 <= m <= seq_lens[b]) in state slot `slot`, besides committing the state after
the last token as usual: a snapshot inside a prefill chunk costs no extra forward (see deltanet.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .layout import paged_row

if TYPE_CHECKING:
    from .cache import HybridCache


@dataclass
class BatchInfo:
    """What one forward computes: per sequence, how many new tokens after how many cached ones.

    `slots` and `block_tables` are required when a cache is passed. `positions` and `kv_write_rows` (per token) are
    taken as given when the caller has them (the engine's scheduler does), else derived. Build with `prepare()`.
    """

    seq_lens: list[int]
    context_lens: list[int] | None = None
    slots: list[int] | None = None
    block_tables: list[list[int]] | None = None
    positions: list[int] | None = None
    kv_write_rows: list[int] | None = None
    capture_states: bool = False  # keep every token's DeltaNet state; commit later with commit_captured()
    snapshots: list[tuple[int, int, int]] | None = None  # (b, m, slot): also store b's state after m new tokens
    # ---- derived by prepare() ----
    tokens: TokenLayout = field(default=None, repr=False)
    state: SlotAccess | None = field(default=None, repr=False)
    kv: KVAccess | None = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return sum(self.seq_lens)

    def prepare(self, device: torch.device | str, block_size: int | None = None,
                num_blocks: int | None = None, views: bool = True) -> BatchInfo:
        """Derive the parts the layers read. `views=False` keeps to index-based access (no state or K/V views,
        always a mask): one code path whatever the slots and block tables, for a compiled decoder."""
        B = len(self.seq_lens)
        if B == 0 or any(n < 1 for n in self.seq_lens):
            raise ValueError(f"seq_lens: need at least one sequence with >= 1 token each, got {self.seq_lens}")
        ctx = self.context_lens if self.context_lens is not None else [0] * B
        N = self.num_tokens
        for b, m, slot in self.snapshots or ():
            if not (0 <= b < B and 1 <= m <= self.seq_lens[b]) or self.slots is None or slot in self.slots:
                raise ValueError(f"snapshots: ({b}, {m}, {slot}) needs a sequence b of the batch, 1 <= m <= its "
                                 f"new tokens and a slot outside the batch's own slots")
        if self.snapshots and self.capture_states:
            raise ValueError("snapshots: not with capture_states (a verification keeps every state already)")
        for name, given, want in (("context_lens", ctx, B), ("slots", self.slots, B),
                                  ("block_tables", self.block_tables, B), ("positions", self.positions, N),
                                  ("kv_write_rows", self.kv_write_rows, N)):
            if given is not None and len(given) != want:
                raise ValueError(f"{name}: expected {want} entries, got {len(given)}")
        self.tokens = TokenLayout(self.seq_lens, ctx, device, self.positions)
        if self.slots is not None:
            self.state = SlotAccess(self.slots, device, views)
        if self.block_tables is not None:
            if block_size is None:
                raise ValueError("block_tables: need the cache's block_size")
            self.kv = KVAccess(self.tokens, self.seq_lens, ctx, self.block_tables, block_size, num_blocks, views,
                               self.kv_write_rows)
        elif any(ctx):
            raise ValueError("context_lens: cached context needs block_tables and a cache")
        elif not self.tokens.is_uniform:
            self.tokens.build_self_mask()
        return self


@dataclass
class ForwardContext:
    """Everything a layer needs besides its input, built once per forward."""

    batch: BatchInfo
    cos: torch.Tensor  # [N, rotary_dim]
    sin: torch.Tensor
    cache: HybridCache | None = None
    router_logits: list[torch.Tensor] | None = None  # filled by MoE layers when not None (training aux loss)
    # (layer key, pool name) -> [B, T, *state shape]: the state after each new token (batch.capture_states)
    captured: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)

    def state(self, key: str, name: str) -> StateRows | None:
        """The batch's rows of layer `key`'s state pool `name` (None without a cache)."""
        if self.cache is None:
            return None
        return self.batch.state.rows(self.cache.state[key][name])

    @property
    def captures_states(self) -> bool:
        return self.cache is not None and self.batch.capture_states

    def commit_captured(self, keep: list[int]) -> None:
        """After a forward with `capture_states`: store, for each sequence b, its state after its first `keep[b]`
        new tokens (1 <= keep[b] <= seq_lens[b]) in its slot of every DeltaNet pool."""
        if not self.captures_states:
            raise RuntimeError("commit_captured(): the forward did not capture states (BatchInfo.capture_states)")
        lens = self.batch.seq_lens
        if len(keep) != len(lens) or any(not 1 <= n <= m for n, m in zip(keep, lens)):
            raise ValueError(f"keep: expected 1 <= keep[b] <= seq_lens[b] for {lens}, got {keep}")
        if not self.captured:
            return
        any_states = next(iter(self.captured.values()))
        rows = torch.arange(len(keep), device=any_states.device)
        last = torch.tensor(keep, dtype=torch.long, device=any_states.device) - 1
        for (key, name), states in self.captured.items():
            self.state(key, name).commit(states[rows, last])


class TokenLayout:
    """Where the N flat tokens sit: absolute positions and the [B, T] right-padded layout of the mixers."""

    def __init__(self, seq_lens: list[int], context_lens: list[int], device: torch.device | str,
                 positions: list[int] | None = None):
        B, T = len(seq_lens), max(seq_lens)
        self.batch_size = B
        self.padded_len = T  # T of the padded layout: the most new tokens of any sequence
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.long, device=device)  # [B] new tokens per sequence
        self.is_decode = T == 1  # every sequence has exactly one new token
        self.is_uniform = all(n == T for n in seq_lens) and not any(context_lens)  # equal fresh prompts
        if positions is None:
            positions = list(context_lens) if T == 1 else [p for n, c in zip(seq_lens, context_lens)
                                                           for p in range(c, c + n)]
        self.positions = torch.tensor(positions, dtype=torch.long, device=device)  # [N]
        self.pad_index = None  # [N] row of each token in the [B * T] padded layout; None when nothing is padded
        if any(n != T for n in seq_lens):
            pad = [i * T + j for i, n in enumerate(seq_lens) for j in range(n)]
            self.pad_index = torch.tensor(pad, dtype=torch.long, device=device)
        self.mask = None  # [B, 1, T, T] causal mask over real tokens, for varlen batches without a cache

    def build_self_mask(self) -> None:
        """Causal mask of a varlen batch with no cache (queries see only their own sequence's earlier tokens)."""
        q_pos = torch.arange(self.padded_len, device=self.seq_lens.device)
        valid = q_pos[None, :] < self.seq_lens[:, None]  # [B, T] keys that exist
        self.mask = ((q_pos[None, :, None] >= q_pos[None, None, :]) & valid[:, None, :])[:, None]

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[N, ...] -> [B, T, ...], zeros at padded positions."""
        T = self.padded_len
        if self.pad_index is None:  # -1, not batch_size: under torch.compile the batch size stays symbolic
            return x.reshape(-1, T, *x.shape[1:])
        out = x.new_zeros(self.batch_size * T, *x.shape[1:])
        out.index_copy_(0, self.pad_index, x)
        return out.view(self.batch_size, T, *x.shape[1:])

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [N, ...]."""
        flat = x.reshape(-1, *x.shape[2:])
        return flat if self.pad_index is None else flat.index_select(0, self.pad_index)


class SlotAccess:
    """The batch's DeltaNet state slots (one per sequence): consecutive slots are read as views of the pools."""

    def __init__(self, slots: list[int], device: torch.device | str, views: bool):
        self.index = torch.tensor(slots, dtype=torch.long, device=device)  # [B]
        first = slots[0]
        # (first, last + 1) when the slots are consecutive in batch order and views are allowed
        self.range = (first, first + len(slots)) if views and slots == list(range(first, first + len(slots))) else None

    def rows(self, pool: torch.Tensor) -> StateRows:
        return StateRows(pool, self)


class StateRows:
    """This forward's rows [B, ...] of one per-slot state pool: the only way a layer reads or writes its state.

    `read()` returns the rows: a VIEW of the pool when the slots are consecutive, else a gathered copy. Then either
    `commit(new)` stores rows computed out of place, or `commit()` stores the rows `read()` returned after the layer
    updated them in place (a no-op for a view: the update already landed in the pool).
    """

    def __init__(self, pool: torch.Tensor, slots: SlotAccess):
        self.pool, self.slots = pool, slots
        self._rows: torch.Tensor | None = None

    def read(self) -> torch.Tensor:
        rng = self.slots.range
        self._rows = self.pool[rng[0]:rng[1]] if rng is not None else self.pool.index_select(0, self.slots.index)
        return self._rows

    def commit(self, new: torch.Tensor | None = None) -> None:
        rng = self.slots.range
        if new is None:
            if self._rows is None:
                raise RuntimeError("StateRows.commit(): nothing read; pass the new rows")
            if rng is None:
                self.pool.index_copy_(0, self.slots.index, self._rows)
        elif rng is not None:
            self.pool[rng[0]:rng[1]].copy_(new)
        else:
            self.pool.index_copy_(0, self.slots.index, new.to(self.pool.dtype))


class KVAccess:
    """Rows of the paged K/V pools `[num_blocks * block_size, HKV, head_dim]` that the batch writes and reads.

    Token p of a sequence lives at row `block_table[p // block_size] * block_size + p % block_size`.
    """

    def __init__(self, tokens: TokenLayout, seq_lens: list[int], context_lens: list[int],
                 block_tables: list[list[int]], block_size: int, num_blocks: int | None, views: bool,
                 write_rows: list[int] | None = None):
        device = tokens.positions.device
        totals = [c + n for n, c in zip(seq_lens, context_lens)]
        check_tables_hold(block_tables, totals, block_size)
        L = max(totals)
        self.batch_size = len(totals)
        self.kv_len = L  # keys per sequence after this forward (the longest context + new tokens)
        # One query per sequence and every sequence holds L keys: attention needs no mask.
        self.sees_all_keys = views and tokens.is_decode and all(t == L for t in totals)
        # (first row, row stride) when sequence b's L keys are pool rows first + b * stride ...: read as a view
        self.view = _strided_kv_view(block_tables, totals, L, block_size, num_blocks) if views else None
        self.read_index: torch.Tensor | None = None  # [B, L] pool rows, when K/V are gathered
        self.key_lens: torch.Tensor | None = None  # [B] how many of those rows are keys, with read_index
        # read_index / key_lens hold a row per QUERY token, not per sequence (indexed_batch: no mask needed)
        self.per_query = False
        self.seq_lens, self.context_lens = list(seq_lens), list(context_lens)  # per sequence, as Python ints
        self._mask: torch.Tensor | None = None  # [B, 1, T, L] bool, True = attend; built when first read
        self._mask_args: tuple[torch.Tensor, torch.Tensor] | None = None
        if write_rows is None and self.view is not None and self.sees_all_keys:  # the common decode step
            write_rows = [paged_row(t, c, block_size) for t, c in zip(block_tables, context_lens)]
        self.write_index = None if write_rows is None else torch.tensor(write_rows, dtype=torch.long, device=device)
        if self.view is not None and self.sees_all_keys:
            return
        # paged_row for every key position at once (no per-token Python).
        nb = max(len(t) for t in block_tables)
        tables = torch.tensor([t + [0] * (nb - len(t)) for t in block_tables], dtype=torch.long, device=device)
        key_pos = torch.arange(L, device=device)
        rows = tables[:, (key_pos // block_size).clamp(max=nb - 1)] * block_size + key_pos % block_size  # [B, L]
        self.key_lens = torch.tensor(totals, device=device)  # [B] keys of each sequence in read_index's rows
        valid = key_pos[None, :] < self.key_lens[:, None]
        self.read_index = torch.where(valid, rows, 0)
        if self.write_index is None:
            b_of = torch.repeat_interleave(torch.arange(len(totals), device=device), tokens.seq_lens)
            self.write_index = rows[b_of, tokens.positions]  # [N]
        q_pos = torch.arange(tokens.padded_len, device=device)[None, :] + torch.tensor(context_lens, device=device)[
            :, None]  # [B, T]
        self._mask_args = (key_pos, q_pos)
        if not views:  # the compiled decoder's inputs: built here, outside its graph
            self._mask = self.mask

    @property
    def mask(self) -> torch.Tensor | None:
        """[B, 1, T, L] bool (True = attend), or None when no read needs one. Built on first use: prefill chunks
        over a long context take the mask-free path (attention.py) and never pay for its B x T x L booleans."""
        if self._mask is None and self._mask_args is not None:
            key_pos, q_pos = self._mask_args
            self._mask = (key_pos[None, None, :] <= q_pos[:, :, None])[:, None]
        return self._mask

    def write(self, pool: torch.Tensor, x: torch.Tensor) -> None:
        """Store the new tokens' keys (or values) x [N, ...] at their rows."""
        pool.index_copy_(0, self.write_index, x.to(pool.dtype))

    def read(self, pool: torch.Tensor) -> torch.Tensor:
        """The batch's keys (or values) [B, L, ...]: a view when the block tables allow it, else a gather."""
        return self.read_view(pool) if self.view is not None else self.gather(pool)

    def read_view(self, pool: torch.Tensor) -> torch.Tensor:
        first, stride = self.view
        if self.batch_size == 1:
            return pool[first:first + self.kv_len].unsqueeze(0)
        # plain slicing and view ops (no as_strided), so that torch.compile can trace it
        block = pool[first:first + self.batch_size * stride]
        return block.view(self.batch_size, stride, *pool.shape[1:])[:, :self.kv_len]

    def gather(self, pool: torch.Tensor) -> torch.Tensor:
        """The plain read (a copy of every sequence's context), the twin of `read_view`."""
        return pool[self.read_index]


def check_tables_hold(block_tables: list[list[int]], totals: list[int], block_size: int) -> None:
    """ValueError unless each block table has room for its sequence's total tokens (context + new)."""
    for total, table in zip(totals, block_tables):
        if len(table) * block_size < total:
            raise ValueError(f"block_tables: a table of {len(table)} blocks of {block_size} cannot hold "
                             f"{total} tokens")


def indexed_batch(positions: torch.Tensor, slots: torch.Tensor, write_rows: torch.Tensor, read_rows: torch.Tensor,
                  key_lens: torch.Tensor, tokens_per_seq: int = 1, capture_states: bool = False) -> BatchInfo:
    """A prepared step of `tokens_per_seq` new tokens per sequence (a decode step for 1, a speculative verification
    for more) with index-based cache access, built from its tensors alone, for a traced step whose inputs are these
    tensors (engine/aot_step.py). B sequences, N = B x tokens_per_seq tokens in sequence order: positions /
    write_rows / key_lens [N], slots [B], read_rows [N, L]: one row of key rows PER QUERY, of which its first
    key_lens are its keys (its context and the new tokens up to itself: causal without a mask), read by the decode
    attention (`KVAccess.per_query`)."""
    N, L = read_rows.shape
    batch = BatchInfo.__new__(BatchInfo)
    batch.seq_lens, batch.context_lens, batch.slots, batch.block_tables = None, None, None, None
    batch.positions, batch.kv_write_rows, batch.capture_states, batch.snapshots = None, None, capture_states, None
    tokens = TokenLayout.__new__(TokenLayout)
    tokens.batch_size, tokens.padded_len = slots.shape[0], tokens_per_seq
    tokens.is_decode, tokens.is_uniform = tokens_per_seq == 1, False
    tokens.seq_lens, tokens.positions, tokens.pad_index, tokens.mask = None, positions, None, None
    state = SlotAccess.__new__(SlotAccess)
    state.index, state.range = slots, None
    kv = KVAccess.__new__(KVAccess)
    kv.batch_size, kv.kv_len, kv.sees_all_keys, kv.view, kv.per_query = slots.shape[0], L, False, None, True
    kv.read_index, kv.write_index, kv.seq_lens, kv.context_lens = read_rows, write_rows, None, None
    kv._mask, kv._mask_args, kv.key_lens = None, None, key_lens
    batch.tokens, batch.state, batch.kv = tokens, state, kv
    return batch


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
