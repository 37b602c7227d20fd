"""A draft vocabulary for MTP speculative decoding: the drafts' logits over a list of frequent tokens only.

Frequency-ranked drafting (Zhao et al. 2025, "FR-Spec"; SGLang's `--speculative-token-map`): a draft's cost is its
MTP layer plus one `lm_head` over the whole vocabulary, and the vocabulary is the largest matrix of a step (the 80B's
151,936 x 2048, 311M weights per draft against the MTP layer's ~60M active ones; the demo model's 8,256 x 256 is
~40% of a draft's time on one CPU thread). Text mostly consists of few distinct tokens (the demo's training data: its
1,024 most frequent tokens are 97% of it, 92% when weighted 60/40 Austen/chat as it was trained; 2,048 99% / 98%), so
the drafts' head keeps those rows only.

Exactness is untouched: a draft only proposes; verification samples every emitted token from the target model
(engine/speculative.py), so a token outside the map is still emitted whenever the target picks it, the draft before
it is merely rejected. What changes is the cost of a draft and, a little, the acceptance.

The map is a file of token ids, the most frequent first (`qwen3next token-map` writes one from text): a JSON list,
or a torch file of a 1-D integer tensor or list (what SGLang loads). Torch is imported only to build the head.
"""

from __future__ import annotations

import collections
import copy
import json
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn


def load_token_map(path: str | Path, vocab_size: int) -> list[int]:
    """The token ids of the map file at `path` (JSON list, or a .pt/.pth torch file of a 1-D integer tensor or
    list), checked against `vocab_size`: at least one id, every id an int in [0, vocab_size), no repeats.
    ValueError naming the file and what is wrong."""
    where = f"speculative_config: speculative_token_map {str(path)!r}"
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{where}: no such file")
    if path.suffix in (".pt", ".pth"):
        try:
            value = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors of many kinds: a file that is not a torch save
            raise ValueError(f"{where}: not a torch file of token ids ({type(e).__name__}: {e})") from None
        if isinstance(value, torch.Tensor):
            if value.dim() != 1 or value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
                raise ValueError(f"{where}: expected a 1-D integer tensor, got {value.dtype} of shape "
                                 f"{tuple(value.shape)}")
            value = value.tolist()
    else:
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{where}: not a JSON list of token ids ({e})") from None
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: expected a non-empty list of token ids, got {type(value).__name__}"
                         + (" (empty)" if isinstance(value, list) else ""))
    bad = next((v for v in value if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < vocab_size), None)
    if bad is not None:
        raise ValueError(f"{where}: {bad!r} is not a token id of this model (ints in [0, {vocab_size}))")
    if len(set(value)) != len(value):
        twice = next(v for v, n in collections.Counter(value).items() if n > 1)
        raise ValueError(f"{where}: token id {twice} is listed more than once")
    return value


def rank_tokens(token_lists: Iterable[list[int]]) -> list[tuple[int, int]]:
    """(token id, count) over all `token_lists`, the most frequent first (ties: the lower id first)."""
    counts: collections.Counter[int] = collections.Counter()
    for ids in token_lists:
        counts.update(ids)
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


class DraftVocabHead(nn.Module):
    """The drafts' logits module over the map's tokens only: `head` holds the rows of `token_ids` (in that order)
    of the full head; the output has the full vocabulary's width, -inf outside the map, so that everything after it
    (the greedy draft, grammar masks) stays as it is. A few microseconds of scatter against the rows not read."""

    def __init__(self, head: nn.Module, token_ids: torch.Tensor, vocab_size: int):
        super().__init__()
        self.head, self.vocab_size = head, vocab_size
        self.register_buffer("token_ids", token_ids)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sub = self.head(x)
        out = sub.new_full((*sub.shape[:-1], self.vocab_size), float("-inf"))
        return out.index_copy(-1, self.token_ids, sub)

    def extra_repr(self) -> str:
        return f"tokens={self.token_ids.numel()}, vocab_size={self.vocab_size}"


def head_rows(head: nn.Module, token_ids: torch.Tensor) -> nn.Module:
    """A copy of `head` (a float Linear or an Int8Linear) holding only the rows of `token_ids` (long, on the head's
    device), in the same format (the rows are copied: `len(token_ids) x hidden` elements of new memory). ValueError
    for other formats."""
    from ..quant.linear import Int8Linear

    if isinstance(head, nn.Linear) and head.weight.is_floating_point() and head.bias is None:
        rows = nn.Parameter(head.weight.detach().index_select(0, token_ids), requires_grad=False)
        sub = copy.deepcopy(head, memo={id(head.weight): rows})
        sub.out_features = len(token_ids)
        return sub
    if isinstance(head, Int8Linear):
        sub = Int8Linear(head.in_features, len(token_ids)).to(head.qweight.device)
        sub.load_quantized(head.qweight.index_select(0, token_ids), head.scales.index_select(0, token_ids))
        return sub
    raise ValueError(f"speculative_config: speculative_token_map needs a float or int8 lm_head to take rows from; "
                     f"this model's is {type(head).__name__}")


def _text_chunks(path: Path, chunk_chars: int = 1 << 20) -> Iterable[str]:
    """The text of `path` in pieces of about `chunk_chars` characters, cut after a newline."""
    with open(path, encoding="utf-8") as f:
        buf: list[str] = []
        size = 0
        for line in f:
            buf.append(line)
            size += len(line)
            if size >= chunk_chars:
                yield "".join(buf)
                buf, size = [], 0
        if buf:
            yield "".join(buf)


def build_token_map(model_dir: str | Path, files: list[str | Path], size: int | None) -> dict[str, object]:
    """Count the tokens of the text `files` with `model_dir`'s tokenizer: the `size` most frequent ids (all that
    occur when None), most frequent first, and how much of the text they cover. ValueError for a file that cannot
    be read as UTF-8 text or text without tokens."""
    from ..tokenizer import Tokenizer

    if size is not None and size < 1:
        raise ValueError(f"size: expected a positive number of tokens, got {size}")
    if not (Path(model_dir) / "tokenizer.json").is_file():
        raise ValueError(f"model: {model_dir} has no tokenizer.json (its tokenizer counts the tokens)")
    tokenizer = Tokenizer.from_dir(model_dir)

    def token_lists() -> Iterable[list[int]]:
        for name in files:
            path = Path(name)
            if not path.is_file():
                raise ValueError(f"{name}: no such file")
            try:
                for chunk in _text_chunks(path):
                    yield tokenizer.encode(chunk)
            except UnicodeDecodeError as e:
                raise ValueError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from None

    ranked = rank_tokens(token_lists())
    total = sum(n for _, n in ranked)
    if not total:
        raise ValueError(f"no tokens in {', '.join(map(str, files))}")
    kept = ranked if size is None else ranked[:size]
    return {"token_ids": [t for t, _ in kept], "distinct": len(ranked), "tokens": total,
            "coverage": sum(n for _, n in kept) / total, "vocab_size": tokenizer.vocab_size}


def add_token_map_args(p) -> None:
    from .. import DEFAULT_MODEL
    from ..argtypes import positive_int

    p.add_argument("files", nargs="+", help="UTF-8 text files to count tokens in (the kind of text to be served)")
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="model directory whose tokenizer counts the tokens (default: the embedded demo model)")
    p.add_argument("--size", type=positive_int, default=None, metavar="N",
                   help="keep the N most frequent tokens (default: every token that occurs)")
    p.add_argument("--output", required=True, help="where to write the map (a JSON list of token ids)")


def run_token_map(args) -> int:
    """`qwen3next token-map`: write the map, print what it covers."""
    result = build_token_map(args.model, args.files, args.size)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result["token_ids"]) + "\n", encoding="utf-8")
    print(f"wrote {out}: {len(result['token_ids'])} of {result['distinct']} distinct tokens (vocabulary "
          f"{result['vocab_size']}), {100 * result['coverage']:.2f}% of the {result['tokens']:,} tokens counted; use "
          f"""it with --speculative-config '{{"method": "mtp", "num_speculative_tokens": 2, """
          f""""speculative_token_map": "{out}"}}'""")
    return 0
