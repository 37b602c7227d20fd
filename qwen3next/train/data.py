"""Training data: text files -> cached token ids -> random packed windows.

Packing (typical small-LM practice): every document is tokenized on its own and followed by `<|endoftext|>`; the
documents of a group are concatenated into one token stream and training windows are cut from it at random offsets,
so a window may span a document boundary. The model has no cross-document mask and the DeltaNet state cannot be
reset in the middle of a sequence, so nothing is reset there: the separator token is the only boundary signal, and
the model learns that text after it starts afresh.

Documents: a file is one document unless it contains the `<|endoftext|>` separator (the layout of
`qwen3next.train.documents`: each document is followed by a line holding `<|endoftext|>`), in which case each piece
between separators is a document (blank pieces are dropped); see `split_documents`.

Tokens are cached once per (file content, tokenizer) pair as `.npy` files (uint16 when the vocab fits, else uint32)
that are memory-mapped on later runs.

Held-out split: the last `val_fraction` of every file's tokens (deterministic, and every file/source contributes).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..tokenizer import Tokenizer
from .documents import DOC_SEPARATOR, split_documents

_CACHE_FORMAT = "qwen3next-tokens-v1"


# ---- data specs ------------------------------------------------------------------------------------------------------
@dataclass
class DataGroup:
    """Files that are sampled together; `weight` is the group's share of training windows (None = by size)."""

    name: str
    files: list[Path] = field(default_factory=list)
    weight: float | None = None


def parse_data_specs(specs: Sequence[str]) -> list[DataGroup]:
    """Parse `--data` values of the form `[NAME=]PATH[:WEIGHT]`; PATH is a file or a directory (its *.txt files).

    Specs with the same NAME form one group (default name: "default"). Either every group has a weight or none
    has (then groups are mixed in proportion to their sizes).
    """
    groups: dict[str, DataGroup] = {}
    for spec in specs:
        name, rest = ("default", spec)
        if "=" in spec and not Path(spec).exists():
            name, rest = spec.split("=", 1)
        weight = None
        if ":" in rest and not Path(rest).exists():
            head, tail = rest.rsplit(":", 1)
            try:
                weight = float(tail)
            except ValueError:
                raise ValueError(f"--data: weight must be a number in {spec!r}, got {tail!r}") from None
            if not weight > 0:
                raise ValueError(f"--data: weight must be > 0 in {spec!r}, got {weight}")
            rest = head
        files = expand_path(Path(rest))
        group = groups.setdefault(name, DataGroup(name))
        if weight is not None:
            if group.weight is not None and group.weight != weight:
                raise ValueError(f"--data: group {name!r} given two weights ({group.weight} and {weight})")
            group.weight = weight
        group.files.extend(f for f in files if f not in group.files)
    result = list(groups.values())
    if not result:
        raise ValueError("--data: expected at least one text file or directory")
    if len({g.weight is None for g in result}) > 1:
        raise ValueError("--data: give a weight to every group or to none, got "
                         + ", ".join(f"{g.name}={g.weight}" for g in result))
    return result


def expand_path(path: Path) -> list[Path]:
    """A file -> [file]; a directory -> its *.txt files (recursively, sorted)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise ValueError(f"--data: directory {path} holds no *.txt files")
        return files
    if not path.is_file():
        raise ValueError(f"--data: {path} is neither a file nor a directory")
    return [path]


# ---- tokenization and cache ------------------------------------------------------------------------------------------
def tokenize_text(text: str, tokenizer: Tokenizer, separator_id: int) -> np.ndarray:
    """All documents of `text`, each followed by `separator_id`, as one int64 array."""
    ids: list[int] = []
    for doc in split_documents(text):
        ids.extend(tokenizer.encode(doc))
        ids.append(separator_id)
    return np.asarray(ids, dtype=np.int64)


def tokenizer_fingerprint(tokenizer_dir: str | Path) -> str:
    """A hash of the tokenizer that decides token ids (`tokenizer.json`)."""
    return hashlib.sha256(Path(tokenizer_dir, "tokenizer.json").read_bytes()).hexdigest()


def load_tokens(file: Path, tokenizer: Tokenizer, tokenizer_key: str, cache_dir: Path) -> np.ndarray:
    """Token ids of a text file (memory-mapped from the cache; tokenized and cached on the first call)."""
    data = file.read_bytes()
    sep = tokenizer.token_to_id(DOC_SEPARATOR)
    if sep is None:
        raise ValueError(f"tokenizer: needs the document separator token {DOC_SEPARATOR!r}")
    key = hashlib.sha256(f"{_CACHE_FORMAT}\0{tokenizer_key}\0".encode() + hashlib.sha256(data).digest()).hexdigest()
    cached = cache_dir / f"{key[:32]}.npy"
    if cached.exists():
        return np.load(cached, mmap_mode="r")
    ids = tokenize_text(data.decode("utf-8"), tokenizer, sep)
    dtype = np.uint16 if ids.size == 0 or ids.max() < 2**16 else np.uint32
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, ids.astype(dtype))
    os.replace(tmp, cached)  # atomic: a concurrent or interrupted run never sees a half-written file
    return np.load(cached, mmap_mode="r")


# ---- the packed dataset ----------------------------------------------------------------------------------------------
@dataclass
class GroupTokens:
    name: str
    train: np.ndarray  # concatenated training tokens of the group's files
    val: np.ndarray  # concatenated held-out tails
    weight: float


class PackedDataset:
    """Random training windows of `seq_len + 1` tokens and a fixed set of held-out windows.

    Batches are a pure function of (seed, step, micro-batch index), so resuming at a step needs no sampler state and
    reproduces an uninterrupted run exactly.
    """

    def __init__(self, groups: list[GroupTokens], seq_len: int, seed: int):
        if seq_len < 3:
            raise ValueError(f"--seq-len: expected >= 3, got {seq_len}")
        self.seq_len, self.seed = seq_len, seed
        self.groups = groups
        for g in groups:
            if len(g.train) < seq_len + 1:
                raise ValueError(f"--data: group {g.name!r} has {len(g.train)} training tokens, fewer than one "
                                 f"window of --seq-len + 1 = {seq_len + 1}")
        w = np.array([g.weight for g in groups], dtype=np.float64)
        self.probs = w / w.sum()

    @classmethod
    def from_groups(cls, groups: list[DataGroup], tokenizer: Tokenizer, tokenizer_key: str, cache_dir: str | Path,
                    seq_len: int, val_fraction: float, seed: int) -> PackedDataset:
        if not 0 <= val_fraction < 1:
            raise ValueError(f"--val-fraction: expected in [0, 1), got {val_fraction}")
        out = []
        for g in groups:
            train, val = [], []
            for f in g.files:
                ids = load_tokens(f, tokenizer, tokenizer_key, Path(cache_dir))
                n_val = int(round(len(ids) * val_fraction))
                train.append(ids[: len(ids) - n_val])
                val.append(ids[len(ids) - n_val:])
            t = np.concatenate(train) if len(train) > 1 else np.asarray(train[0])
            v = np.concatenate(val) if len(val) > 1 else np.asarray(val[0])
            out.append(GroupTokens(g.name, t, v, float(len(t)) if g.weight is None else g.weight))
        return cls(out, seq_len, seed)

    @property
    def num_train_tokens(self) -> int:
        return sum(len(g.train) for g in self.groups)

    @property
    def num_val_tokens(self) -> int:
        return sum(len(g.val) for g in self.groups)

    def train_batch(self, step: int, micro: int, batch_size: int) -> torch.Tensor:
        """Windows [B, T + 1] (int64) for optimizer step `step`, micro-batch `micro`."""
        rng = np.random.default_rng([self.seed, step, micro])
        which = rng.choice(len(self.groups), size=batch_size, p=self.probs)
        L = self.seq_len + 1
        rows = []
        for gi in which:
            stream = self.groups[gi].train
            start = int(rng.integers(0, len(stream) - L + 1))
            rows.append(np.asarray(stream[start:start + L], dtype=np.int64))
        return torch.from_numpy(np.stack(rows))

    def eval_windows(self, max_windows: int) -> dict[str, torch.Tensor]:
        """Per group, up to `max_windows` evenly spaced held-out windows [n, T + 1] (groups too small are left out)."""
        L = self.seq_len + 1
        out = {}
        for g in self.groups:
            n = min(max_windows, len(g.val) // L)
            if n == 0:
                continue
            starts = np.linspace(0, len(g.val) - L, n).round().astype(np.int64)
            out[g.name] = torch.from_numpy(np.stack([np.asarray(g.val[s:s + L], dtype=np.int64) for s in starts]))
        return out

    def describe(self) -> Iterator[str]:
        for g, p in zip(self.groups, self.probs):
            yield f"{g.name}: {len(g.train):,} train / {len(g.val):,} held-out tokens, sampled {p:.0%}"

    def summary(self) -> dict:
        return {g.name: {"train_tokens": len(g.train), "val_tokens": len(g.val), "prob": float(p)}
                for g, p in zip(self.groups, self.probs)}

    def fingerprint(self) -> str:
        """Changes when the token streams or the mixing change (used to warn on resume)."""
        h = hashlib.sha256(json.dumps(self.summary(), sort_keys=True).encode())
        for g in self.groups:
            h.update(np.ascontiguousarray(g.train[:4096]).tobytes())
        return h.hexdigest()[:16]
