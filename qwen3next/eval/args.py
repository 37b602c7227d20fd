"""Options of `qwen3next eval ppl|passkey` (no torch here: the CLI builds them before importing anything heavy)."""

from __future__ import annotations

import argparse

from .. import DEFAULT_MODEL
from ..argtypes import add_hf_overrides_arg, check_output_paths, positive_int


def fraction(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {s!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {v:g}")
    return v


def _common(p: argparse.ArgumentParser, text_help: str) -> None:
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="HF model directory (default: the embedded demo model)")
    p.add_argument("--text", default="austen:emma", metavar="FILE",
                   help=text_help + "; a UTF-8 text file, or austen:NAME for one of Jane Austen's novels (emma, "
                                    "pride-and-prejudice, mansfield-park, sense-and-sensibility, northanger-abbey, "
                                    "persuasion), fetched from Debian r-cran-janeaustenr with apt-get (default: "
                                    "austen:emma)")
    add_hf_overrides_arg(p)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--json", default=None, metavar="PATH", help="write the full results as JSON")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="write a PNG plot (needs matplotlib: pip install 'qwen3next[plot]')")


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", required=True, metavar="{ppl,passkey}")

    p = sub.add_parser("ppl", help="loss by position bucket over long text, per context length")
    _common(p, "the long text to score")
    p.add_argument("--context", type=positive_int, nargs="+", default=[4096], metavar="L",
                   help="window lengths in tokens; the text is cut into non-overlapping windows of each (default: "
                        "4096)")
    p.add_argument("--bucket-size", type=positive_int, default=None, metavar="N",
                   help="tokens per position bucket (default: 4096, or L/8 when that is smaller)")
    p.add_argument("--max-windows", type=positive_int, default=None, metavar="N",
                   help="at most N windows per context (default: as many as the text gives)")
    p.add_argument("--max-tokens", type=positive_int, default=None, metavar="N",
                   help="at most N tokens per context, i.e. N / L windows of length L (at least one): the same "
                        "amount of text for every context")
    p.add_argument("--chunk-size", type=positive_int, default=1024, metavar="N",
                   help="tokens per cached forward (memory: one chunk's activations, never [L, vocab] logits)")
    p.add_argument("--baseline", action="store_true",
                   help="with --hf-overrides: also run the model as shipped and report both side by side")
    p.set_defaults(func=_run_ppl)

    p = sub.add_parser("passkey", help="RULER-style single-needle passkey retrieval: accuracy per length and depth")
    _common(p, "the haystack text")
    p.add_argument("--lengths", type=positive_int, nargs="+", required=True, metavar="L",
                   help="prompt lengths in tokens (haystack + needle + question)")
    p.add_argument("--depths", type=fraction, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], metavar="D",
                   help="needle depths as fractions of the haystack (default: 0 0.25 0.5 0.75 1)")
    p.add_argument("--trials", type=positive_int, default=3, help="prompts per (length, depth) cell (default: 3)")
    p.add_argument("--seed", type=int, default=0, help="draws the keys and haystack offsets")
    p.add_argument("--format", choices=["auto", "chat", "plain"], default="auto",
                   help="chat: the model's chat template; plain: a bare prompt ending 'The pass key is'; auto "
                        "(default): chat when the model directory declares a chat template")
    p.add_argument("--max-tokens", type=positive_int, default=16, help="answer tokens (default: 16)")
    p.add_argument("--max-num-seqs", type=positive_int, default=4, help="prompts the engine runs at once")
    p.set_defaults(func=_run_passkey)


def _check_outputs(args: argparse.Namespace) -> None:
    """Fail before a long evaluation, not after it, when --json / --plot cannot be written."""
    check_output_paths(args, "--json", "--plot")


def _run_ppl(args: argparse.Namespace) -> int:
    _check_outputs(args)
    args.context = list(dict.fromkeys(args.context))
    from .ppl import run_ppl

    return run_ppl(args)


def _run_passkey(args: argparse.Namespace) -> int:
    _check_outputs(args)
    args.depths = sorted(set(args.depths))
    from .passkey import run_passkey

    return run_passkey(args)
