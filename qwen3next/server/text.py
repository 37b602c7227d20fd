"""Token text for logprobs: each token's text and UTF-8 bytes, and its character offset in a completion."""

from __future__ import annotations

import codecs
import math

import tokenizers

from ..tokenizer import Tokenizer


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte <-> printable-character map, inverted: printable bytes stand for themselves, the others are
    shifted to U+0100 onwards in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    kept = set(printable)
    for k, b in enumerate(b for b in range(256) if b not in kept):
        table[chr(256 + k)] = b
    return table


class TokenText:
    """Text and UTF-8 bytes of single tokens. A byte-level token may hold part of a character: its bytes are
    exact and its text is then written as 'bytes:\\xe2\\x80' (like vLLM)."""

    _TABLE = _byte_level_table()

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._added = {i: t.content for i, t in tokenizer.backend.get_added_tokens_decoder().items()}
        self._byte_level = isinstance(tokenizer.backend.decoder, tokenizers.decoders.ByteLevel)
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is not None:
            return hit
        if token_id in self._added:
            raw = self._added[token_id].encode()
        else:
            piece = self._tok.id_to_token(token_id)
            if piece is None:
                raw = b""
            elif self._byte_level and all(c in self._TABLE for c in piece):
                raw = bytes(self._TABLE[c] for c in piece)
            else:
                raw = self._tok.decode([token_id]).encode()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        self._cache[token_id] = hit = (text, list(raw))
        return hit


class TextOffsets:
    """Character offset of each token in a completion's text; a character split over several byte-level tokens
    counts once it is complete, and skipped special tokens add nothing."""

    def __init__(self, start: int, skipped: set[int]):
        self.chars = start
        self._skipped = skipped
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def advance(self, token_id: int, raw: list[int]) -> int:
        at = self.chars
        if token_id not in self._skipped:
            self.chars += len(self._decoder.decode(bytes(raw)))
        return at


def finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0
