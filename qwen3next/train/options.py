"""The options of `qwen3next train`, their checks, and the warning when a resumed run changes one that matters."""

from __future__ import annotations

import argparse
import sys

from .presets import PRESETS

# Arguments whose change makes a resumed run differ from an uninterrupted one.
RESUME_KEYS = ("seq_len", "batch_size", "grad_accum", "max_steps", "lr", "min_lr_ratio", "warmup_steps",
               "weight_decay", "beta1", "beta2", "grad_clip", "mtp_weight", "aux_coef", "bf16", "seed")


def add_train_args(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("model")
    src.add_argument("--preset", choices=sorted(PRESETS), help="train from scratch with a named config")
    src.add_argument("--config", help="train from scratch with this config.json (vocab_size >= tokenizer's)")
    src.add_argument("--init-from", help="start from the weights of this HF model directory")
    src.add_argument("--tokenizer", help="tokenizer dir (tokenizer.json); default: the --init-from dir")
    data = parser.add_argument_group("data")
    data.add_argument("--data", action="append", required=True, metavar="[NAME=]PATH[:WEIGHT]",
                      help="text file or directory of *.txt; repeat for several; same NAME = one group; WEIGHT = "
                           "the group's share of windows (all groups or none; none = by size)")
    data.add_argument("--val-fraction", type=float, default=0.01, help="held-out tail of every file")
    data.add_argument("--data-cache", help="token cache dir (default: .token_cache next to --output)")
    run = parser.add_argument_group("run")
    run.add_argument("--output", required=True, help="output dir (final HF model, checkpoints, metrics)")
    run.add_argument("--resume", nargs="?", const="latest", help="continue from a checkpoint dir (default: the "
                                                                 "latest one in --output)")
    run.add_argument("--max-steps", type=int, default=1000)
    run.add_argument("--seq-len", type=int, default=256)
    run.add_argument("--batch-size", type=int, default=16, help="windows per micro-batch")
    run.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    run.add_argument("--lr", type=float, default=2e-3)
    run.add_argument("--min-lr-ratio", type=float, default=0.1)
    run.add_argument("--warmup-steps", type=int, default=100)
    run.add_argument("--weight-decay", type=float, default=0.1)
    run.add_argument("--beta1", type=float, default=0.9)
    run.add_argument("--beta2", type=float, default=0.95)
    run.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm (0 = off)")
    run.add_argument("--mtp-weight", type=float, default=0.3, help="weight of the MTP loss (0 = skip the MTP head)")
    run.add_argument("--aux-coef", type=float, help="router aux-loss coefficient (default: the config's "
                                                    "router_aux_loss_coef)")
    run.add_argument("--bf16", action="store_true", help="bf16 autocast for forward/backward (fp32 weights)")
    run.add_argument("--threads", type=int, help="torch CPU threads (default: all available cores)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--eval-every", type=int, default=200, help="steps between held-out evals (0 = only at the end)")
    run.add_argument("--eval-windows", type=int, default=32, help="held-out windows per data group")
    run.add_argument("--save-every", type=int, default=500, help="steps between checkpoints (0 = only at the end)")
    run.add_argument("--keep-checkpoints", type=int, default=2, help="how many recent checkpoints to keep")
    run.add_argument("--save-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                     help="dtype of the saved HF weights (trainer_state.pt always keeps fp32)")
    run.add_argument("--log-every", type=int, default=10, help="steps between progress lines (without tqdm)")


def check_args(args: argparse.Namespace) -> None:
    sources = [n for n in ("preset", "config", "init_from") if getattr(args, n)]
    if len(sources) > 1:
        raise ValueError(f"give one of --preset, --config, --init-from, got {', '.join('--' + s for s in sources)}")
    if not sources and not args.resume:
        raise ValueError("give --preset, --config or --init-from (or --resume)")
    for name in ("max_steps", "seq_len", "batch_size", "grad_accum", "eval_windows", "keep_checkpoints"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    for name in ("warmup_steps", "eval_every", "save_every", "log_every"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')}: expected >= 0, got {getattr(args, name)}")
    if not args.lr > 0 or not 0 <= args.min_lr_ratio <= 1:
        raise ValueError(f"--lr must be > 0 and --min-lr-ratio in [0, 1], got {args.lr}, {args.min_lr_ratio}")
    if args.weight_decay < 0 or args.grad_clip < 0 or args.mtp_weight < 0:
        raise ValueError("--weight-decay, --grad-clip and --mtp-weight must be >= 0")
    if args.aux_coef is not None and args.aux_coef < 0:
        raise ValueError(f"--aux-coef: expected >= 0, got {args.aux_coef}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads: expected a positive integer, got {args.threads}")


def warn_changed_args(saved: dict, args: argparse.Namespace, saved_data_key: str, data_key: str) -> None:
    """Warn (stderr) about every resume-relevant option and the data that differ from the checkpoint's."""
    for k in RESUME_KEYS:
        if k in saved and saved[k] != getattr(args, k):
            print(f"warning: --{k.replace('_', '-')} was {saved[k]!r} in the checkpoint, now {getattr(args, k)!r}; "
                  f"the run will not match an uninterrupted one", file=sys.stderr)
    if saved_data_key != data_key:
        print("warning: the training data differ from the checkpoint's", file=sys.stderr)
