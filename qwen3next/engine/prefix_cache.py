"""Hybrid prefix caching: what can be reused across requests, and how it is found. Plain Python, no torch.

Resuming a sequence after a cached prefix of p tokens needs two things of a hybrid model:
- the attention layers' K/V of tokens [0, p): the full KV blocks of the prefix, found by CONTENT HASH (the digest of
  the parent block's digest and the block's token ids, so a digest names the whole prefix up to its block's end) and
  shared by reference count; plus, when p is inside a block, that block's first p % block_size rows, copied into a
  fresh block of the new sequence (the last, partial block is never shared);
- the DeltaNet layers' conv + recurrent state after token p - 1: a SNAPSHOT, i.e. a state slot holding a copy of
  it, keyed by the digest of the last full block before p and the token ids of the partial block (a snapshot pins the
  partial block it reads its rows from).
A hit resumes at the longest prefix that has both (`BlockManager.lookup`); the tokens after it are recomputed.

Where snapshots are taken is the policy (`SnapshotPolicy`): a snapshot of the 80B model's state is ~74 MiB (bf16 conv
state, fp32 recurrent state) while its K/V cost 24 KiB per token, so a snapshot at every block would cost far more
than the KV it makes reusable. Snapshots are taken:
- (a) one token before the end of every prompt (an identical prompt resumes there and feeds its last token; the next
  turn of a conversation resumes there or later), and at the end of every finished, aborted or preempted sequence
  (prompt and output as far as they were fed: its slot becomes the snapshot, no copy);
- (b) after every chat-turn boundary token (`<|im_end|>`), so a system prompt with its tools block is reusable by
  requests that differ after it;
- (c) every `interval` tokens of long prompts, `interval` chosen from the memory budget (engine/memory.py).
A snapshot inside a prefill chunk costs no extra forward: the DeltaNet layers store it while they run the chunk
(model/deltanet.py). Blocks and snapshots nobody uses are evicted least recently used first, when memory runs out.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from dataclasses import dataclass

ROOT = b""  # the digest of the empty prefix


def block_digest(parent: bytes, token_ids: list[int] | tuple[int, ...]) -> bytes:
    """The digest of a full block: BLAKE2b-128 over the parent block's digest and the block's token ids."""
    return hashlib.blake2b(parent + array("q", token_ids).tobytes(), digest_size=16).digest()


@dataclass(eq=False)
class Snapshot:
    """A DeltaNet state slot holding the state after `position` tokens of the prefix named by `digest` (its first
    position // block_size blocks) and `partial` (the tokens after them); `block` is the KV block holding `partial`'s
    rows (pinned), None at a block boundary."""

    slot: int
    position: int
    digest: bytes
    partial: tuple[int, ...]
    block: int | None

    @property
    def key(self) -> tuple[bytes, tuple[int, ...]]:
        return self.digest, self.partial


@dataclass(frozen=True)
class PrefixHit:
    """A cached prefix of `position` tokens: the full blocks to share, and the snapshot to restore (with its partial
    block's rows to copy)."""

    position: int
    blocks: tuple[int, ...]
    snapshot: Snapshot


@dataclass(frozen=True)
class SnapshotPolicy:
    """Where prefill chunks take snapshots (see the module docstring): `interval` (tokens, a multiple of the block
    size; 0: never), after the tokens of `boundary_token_ids`, one token before the prompt's end; at most
    `max_per_chunk` per sequence and chunk, the latest positions first."""

    interval: int = 0
    boundary_token_ids: tuple[int, ...] = ()
    max_per_chunk: int = 4

    def positions(self, token_ids: list[int], start: int, stop: int, prompt_len: int) -> list[int]:
        """The positions p in (start, stop] at which a chunk feeding tokens [start, stop) should leave a snapshot
        of the state after token p - 1; `token_ids` are tokens [start, stop)."""
        found = set()
        if self.interval:
            found.update(range((start // self.interval + 1) * self.interval, stop + 1, self.interval))
        if self.boundary_token_ids:
            found.update(start + i + 1 for i, t in enumerate(token_ids) if t in self.boundary_token_ids)
        if start < prompt_len - 1 <= stop:
            found.add(prompt_len - 1)
        return sorted(found)[-self.max_per_chunk:] if self.max_per_chunk else []


def default_snapshot_interval(block_size: int, prefill_chunk_size: int, kv_bytes_per_token: int,
                              state_bytes_per_slot: int, max_model_len: int, num_slots: int) -> int:
    """Tokens between two interval snapshots of a long prompt: at least a prefill chunk (at most one such snapshot
    per chunk), at least the tokens whose K/V weigh as much as one snapshot (snapshots never cost more memory than the
    KV they make reusable), and long enough that one prompt of max_model_len takes at most a quarter of the cache's
    state slots; rounded up to whole blocks."""
    tokens = max(prefill_chunk_size, block_size,
                 math.ceil(state_bytes_per_slot / kv_bytes_per_token) if kv_bytes_per_token else 0,
                 math.ceil(4 * max_model_len / num_slots) if num_slots else 0)
    return -(-tokens // block_size) * block_size
