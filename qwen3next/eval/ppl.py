"""`qwen3next eval ppl`: loss by position over a long text, per context length, with and without `--hf-overrides`.

For each `--context L` the text's tokens are cut into non-overlapping windows of L tokens (from the start; at most
`--max-windows`); every window runs through a fresh cache chunk by chunk (`loss.token_nll`), and each scored token's
loss goes to the bucket of its position in the window. A model that uses its context well has a falling curve; a
model pushed past the context it was trained for shows the loss rising after it, which RoPE scaling (YaRN, given as
`--hf-overrides`) is meant to prevent.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ..checkpoint import load_model
from ..config import Qwen3NextConfig
from ..tokenizer import Tokenizer
from .loss import PositionLoss, default_bucket_size, split_windows, token_nll
from .plots import plot_position_loss, require_matplotlib
from .table import format_columns
from .text import load_text

SHIPPED = "as shipped"


def fmt_pos(n: int) -> str:
    return f"{n // 1024}K" if n and n % 1024 == 0 else str(n)


def windows_per_context(context: int, max_windows: int | None, max_tokens: int | None) -> int | None:
    """How many windows of `context` tokens to score at most (None: all the text gives)."""
    caps = [n for n in (max_windows, None if max_tokens is None else max(1, max_tokens // context)) if n is not None]
    return min(caps) if caps else None


def evaluate_contexts(model, ids: list[int], contexts: list[int], bucket_size: int | None, max_windows: int | None,
                      max_tokens: int | None, chunk_size: int, label: str = "",
                      verbose: bool = True) -> list[PositionLoss]:
    """One `PositionLoss` per context length over the windows of `ids`."""
    out = []
    for L in contexts:
        acc = PositionLoss(L, bucket_size or default_bucket_size(L))
        windows = split_windows(ids, L, windows_per_context(L, max_windows, max_tokens))
        for i, window in enumerate(windows):
            t0 = time.perf_counter()
            nll = token_nll(model, window, chunk_size)
            acc.add(nll)
            if verbose:
                print(f"[{label}] context {L:,}: window {i + 1}/{len(windows)} mean loss {nll.mean():.4f} "
                      f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
        out.append(acc)
    return out


def format_table(runs: list[dict], native_context: int) -> str:
    """One table per context: rows = position buckets, columns = runs (mean NLL and perplexity)."""
    lines = []
    for c, ctx in enumerate(runs[0]["contexts"]):
        L = ctx["context"]
        lines.append(f"context {L:,}: {ctx['windows']} window(s), buckets of {ctx['bucket_size']:,} tokens; "
                     f"mean loss (perplexity)")
        header = ["positions", "tokens", *(r["label"] for r in runs)]
        rows = []
        for b, bucket in enumerate(ctx["buckets"]):
            past = "*" if bucket["end"] > native_context else ""
            cells = [f"{r['contexts'][c]['buckets'][b]['nll']:.4f} ({r['contexts'][c]['buckets'][b]['ppl']:.2f})"
                     for r in runs]
            rows.append([f"{fmt_pos(bucket['start'])}-{fmt_pos(bucket['end'])}{past}", f"{bucket['tokens']:,}",
                         *cells])
        rows.append(["all", f"{ctx['tokens']:,}",
                     *(f"{r['contexts'][c]['nll']:.4f} ({r['contexts'][c]['ppl']:.2f})" for r in runs)])
        lines += format_columns(header, rows)
        lines.append("")
    if any(b["end"] > native_context for ctx in runs[0]["contexts"] for b in ctx["buckets"]):
        lines.append(f"* the bucket reaches past position {native_context:,}, the model's max_position_embeddings as "
                     f"shipped")
    return "\n".join(lines)


def run_ppl(args: argparse.Namespace) -> int:
    if args.baseline and args.hf_overrides is None:
        raise ValueError("--baseline: compares the model with and without --hf-overrides; give --hf-overrides too")
    if args.plot:
        require_matplotlib("--plot")  # fail before the evaluation, not after it
    if args.bucket_size is not None and any(args.bucket_size > L for L in args.context):
        raise ValueError(f"--bucket-size: {args.bucket_size} is larger than a --context ({min(args.context)})")
    torch.set_num_threads(args.threads)
    tok = Tokenizer.from_dir(args.model)
    text, source = load_text(args.text)
    ids = tok.encode(text)
    short = [L for L in args.context if L > len(ids)]
    if short:
        raise ValueError(f"--context: {short[0]:,} tokens is longer than the text ({len(ids):,} tokens of "
                         f"{source}); use a longer --text or a shorter --context")
    shipped = Qwen3NextConfig.from_pretrained(args.model)
    plan = []  # (name, hf_overrides) of each model variant to evaluate
    if args.hf_overrides is None or args.baseline:
        plan.append((SHIPPED, None))
    if args.hf_overrides is not None:
        plan.append(("with --hf-overrides", args.hf_overrides))
    start = time.perf_counter()
    runs = []
    for name, overrides in plan:
        model = load_model(args.model, dtype=args.dtype, hf_overrides=overrides)
        label = f"{name} ({model.config.rope_description()})"
        results = evaluate_contexts(model, ids, args.context, args.bucket_size, args.max_windows, args.max_tokens,
                                    args.chunk_size, label)
        runs.append({"label": label, "hf_overrides": overrides, "max_context_len": model.config.max_context_len,
                     "contexts": [r.to_dict() for r in results]})
        del model
    seconds = time.perf_counter() - start
    print(f"loss by position: {args.model} on {source} ({len(ids):,} tokens), {args.dtype}, "
          f"{args.threads} thread(s), {seconds:.0f} s")
    print(format_table(runs, shipped.max_position_embeddings))
    report = {"model": str(args.model), "text": {"source": source, "chars": len(text), "tokens": len(ids)},
              "dtype": args.dtype, "chunk_size": args.chunk_size, "max_windows": args.max_windows,
              "max_tokens": args.max_tokens,
              "max_position_embeddings": shipped.max_position_embeddings, "seconds": round(seconds, 1), "runs": runs}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    if args.plot:
        title = f"loss by position: {Path(args.model).name} on {Path(args.text).name}"
        plot_position_loss(runs, Path(args.plot), title, shipped.max_position_embeddings)
        print(f"wrote {args.plot}")
    return 0
