"""Grammar-constrained decoding with llguidance: constraints compiled into token matchers, the per-step token masks
(speculative drafts included) and the matcher's advance over the tokens a step emitted.

The engine compiles a request's `StructuredOutputsParams` once (`GrammarCompiler.matcher`), keeps one
`GrammarMatcher` per sequence (`Sequence.grammar`), and after every step feeds it exactly the tokens the scheduler
appended. Before sampling, `fill_masks` writes the sequence's allowed tokens into rows of a bitmask (llguidance's
layout: int32 words, bit i of word w = token 32 w + i), one row per sampled position: for a speculative verification
the row of draft position j is the mask after drafts[:j], computed by consuming the drafts and rolling them back.
Rows after a draft the grammar rejects stay all-ones: that draft cannot be sampled at its position, so nothing
after it is ever emitted. Why llguidance, not xgrammar: see docs/structured_output.md.

`allowed_mask` turns the bitmask into the sampler's boolean mask.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence as SequenceLike

import llguidance
import torch
from llguidance.torch import fill_next_token_bitmask

from .sampling import StructuredOutputsParams

log = logging.getLogger(__name__)

# JSON as json.dumps and the chat format write it: ", " and ": ", no newlines or indentation. Whitespace left
# flexible lets a model pad with spaces and newlines until max_tokens.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def closed_objects(schema, close: bool = True):
    """The schema with `additionalProperties: false` added to every object schema that lists `properties` and says
    nothing about others (xgrammar's strict default, which vLLM's default backend follows): a model is never led to
    invent keys the schema did not name. Left open: a schema that says anything about other keys or combines
    schemas (`additionalProperties`, `patternProperties`, `unevaluatedProperties`, `allOf` / `anyOf` / `oneOf`,
    `if`, `$ref`, `dependentSchemas`), one that requires a key it does not list, and the direct branches of an
    `allOf` (each sees only its own keys). `not` / `if` / `then` / `else` subschemas are kept as they are: closing
    them would change what they reject."""
    if isinstance(schema, list):
        return [closed_objects(s, close) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):  # name -> subschema
            out[key] = {name: closed_objects(sub) for name, sub in value.items()}
        elif key == "allOf" and isinstance(value, list):
            out[key] = [closed_objects(sub, close=False) for sub in value]
        elif key in _SUBSCHEMAS:
            out[key] = closed_objects(value)
        else:  # const, enum, default, examples, not/if/then/else and the rest: kept as they are
            out[key] = value
    props = out.get("properties")
    required = out.get("required") if isinstance(out.get("required"), list) else []
    if close and isinstance(props, dict) and not _OPEN_KEYS & set(out) and all(k in props for k in required):
        out["additionalProperties"] = False
    return out


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMAS = ("items", "prefixItems", "additionalItems", "contains", "additionalProperties", "propertyNames",
               "anyOf", "oneOf", "unevaluatedItems", "unevaluatedProperties")
_OPEN_KEYS = {"additionalProperties", "patternProperties", "unevaluatedProperties", "allOf", "anyOf", "oneOf", "if",
              "$ref", "dependentSchemas", "dependencies"}


def words_per_row(vocab_size: int) -> int:
    """int32 words of one bitmask row."""
    return (vocab_size + 31) // 32


class GrammarMatcher:
    """Where one sequence stands in its grammar (an llguidance `LLMatcher`)."""

    def __init__(self, matcher: llguidance.LLMatcher, kind: str):
        self._m = matcher
        self.kind = kind  # what the constraint is, for messages

    def copy(self) -> GrammarMatcher:
        """An independent matcher in the same state (the n samples of a request each advance their own)."""
        return GrammarMatcher(self._m.deep_copy(), self.kind)

    @property
    def error(self) -> str | None:
        return _first_line(self._m.get_error()) if self._m.is_error() else None

    @property
    def is_stopped(self) -> bool:
        """The grammar is complete and admits nothing more (only end-of-sequence tokens are allowed)."""
        return self._m.is_stopped() and not self._m.is_error()

    def accept(self, tokens: SequenceLike[int]) -> bool:
        """Advance over tokens the sequence emitted; False (and the matcher in its error state) when one of them
        is outside the grammar, which the masks make impossible for sampled tokens. Tokens after the grammar's end
        (the end-of-sequence token that closes it) change nothing."""
        m = self._m
        for t in tokens:
            if m.is_error():
                return False
            if m.is_stopped():
                break
            if not m.consume_token(int(t)):
                return False
        return not m.is_error()

    def valid_prefix(self, tokens: SequenceLike[int]) -> int:
        """How many of `tokens`, in a row from the start, the grammar would accept next (nothing changes)."""
        return self._m.validate_tokens([int(t) for t in tokens]) if tokens else 0

    def fill_masks(self, bitmask: torch.Tensor, row: int, drafts: SequenceLike[int] = ()) -> int:
        """Write the allowed tokens of the next 1 + len(drafts) positions into rows row, row + 1, ... of `bitmask`
        (int32 [R, words_per_row], all-ones on entry): position j's mask is the grammar's after drafts[:j]. Returns
        how many rows were written: the rows after a draft the grammar does not allow, or after the grammar's end,
        stay untouched. The drafts are consumed by a copy of the matcher (a copy costs ~2 us): this one does not
        move."""
        m = self._m.deep_copy() if drafts else self._m
        for j in range(len(drafts) + 1):
            fill_next_token_bitmask(m, bitmask, row + j)
            if j == len(drafts) or m.is_stopped() or m.is_error() or m.validate_tokens([int(drafts[j])]) != 1:
                return j + 1
            m.consume_token(int(drafts[j]))
        return len(drafts) + 1


class GrammarCompiler:
    """Turns `StructuredOutputsParams` into matchers over one tokenizer. The llguidance tokenizer (its token trie)
    is built on first use, from the engine tokenizer's `tokenizer.json` (no transformers needed)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: SequenceLike[int]):
        self._json, self.vocab_size, self.eos_token_ids = tokenizer_json, vocab_size, list(eos_token_ids)
        self._tok: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tok is None:
                self._tok = llguidance.LLTokenizer(self._json, n_vocab=self.vocab_size, eos_token=self.eos_token_ids)
            return self._tok

    @staticmethod
    def grammar(params: StructuredOutputsParams) -> str:
        """The llguidance grammar of a constraint (not yet checked)."""
        kind = params.kind
        if kind in ("json", "json_object"):
            schema = closed_objects(params.json) if kind == "json" else {"type": "object"}
            style = JSON_STYLE if params.whitespace_pattern is None else {
                **JSON_STYLE, "whitespace_flexible": True, "whitespace_pattern": params.whitespace_pattern}
            return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=style)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(params.regex)
        if kind == "choice":
            return llguidance.grammar_from("choice", json.dumps(params.choice))
        try:
            return llguidance.grammar_from("grammar", params.grammar)  # Lark, or GBNF turned into Lark
        except Exception as e:  # the GBNF converter raises plain exceptions on syntax errors
            raise ValueError(f"structured_outputs.grammar: {e}") from None

    def matcher(self, params: StructuredOutputsParams) -> GrammarMatcher:
        """A matcher at the start of the constraint; ValueError naming the field when it does not compile."""
        kind = params.kind
        grammar = self.grammar(params)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise ValueError(f"structured_outputs.{kind}: {_first_line(messages[0])}")
        for w in messages:
            log.debug("structured_outputs.%s: %s", kind, w)
        m = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if m.is_error():
            raise ValueError(f"structured_outputs.{kind}: {_first_line(m.get_error())}")
        return GrammarMatcher(m, kind)


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "invalid grammar"


_BITS = torch.arange(8, dtype=torch.uint8)


def allowed_mask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 bitmask [R, words] -> bool [R, vocab_size] (little-endian words: byte k, bit j = token 8 k + j)."""
    b = bitmask.contiguous().view(torch.uint8)
    return ((b[:, :, None] >> _BITS) & 1).bool().reshape(b.shape[0], -1)[:, :vocab_size]
