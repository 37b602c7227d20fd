"""`qwen3next train`: train a Qwen3-Next model (LM + MTP + router aux loss) on text files, on CPU.

Reads top to bottom: start (tokenizer -> data -> model -> optimizer) -> loop (step, log, eval, checkpoint) -> final
save. The pieces live next door: `options` (arguments), `optim` (LR schedule, AdamW and its weight-decay policy),
`model_init`, `checkpoints`, `evaluate`, `metrics` and `cpu`. Choices worth knowing:

- `--bf16` runs forward/backward under CPU bf16 autocast (AMX units); weights and optimizer stay fp32.
- Checkpoints: `OUTPUT/checkpoint-NNNNNNN/` = an HF model dir (weights in `--save-dtype`) + tokenizer files +
  `trainer_state.pt` (fp32 weights, optimizer, step, RNG, counters). Batches are a pure function of
  (seed, step), so `--resume` continues exactly like an uninterrupted run.
- Ctrl-C: the first one finishes the current step, saves a checkpoint and exits (code 130); a second one aborts.
- The final model goes to `OUTPUT/` itself (HF layout + tokenizer + generation_config.json), with `metrics.jsonl`
  and `loss_curve.png` (when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import parse_dtype
from ..config import Qwen3NextConfig
from ..model.qwen3_next import Qwen3NextForCausalLM
from ..tokenizer import Tokenizer
from .checkpoints import STATE_FILE, Progress, find_checkpoint, save_checkpoint, save_model_dir
from .cpu import configure_cpu, warn_if_bf16_is_emulated
from .data import PackedDataset, parse_data_specs, tokenizer_fingerprint
from .evaluate import eval_and_log
from .losses import compute_losses
from .metrics import MetricsLog, fmt_time, plot_loss_curve, progress_bar
from .model_init import build_model
from .optim import lr_at, make_optimizer
from .options import add_train_args, check_args, warn_changed_args

__all__ = ["StepCallback", "add_train_args", "run_train"]  # add_train_args: the CLI imports it from here

StepCallback = Callable[[int, dict], None]


def run_train(args: argparse.Namespace, on_step: StepCallback | None = None) -> int:
    """Train as `args` says; returns the exit code (0 done, 130 interrupted, 2 bad arguments).

    `on_step(step, record)` is called after every optimizer step with that step's metrics record (tests use it to
    raise KeyboardInterrupt at a known point).
    """
    try:
        check_args(args)
        return _run(args, on_step)
    except ValueError as e:
        print(f"qwen3next train: error: {e}", file=sys.stderr)
        return 2


@dataclass
class _Run:
    """Everything a training session works with."""

    args: argparse.Namespace
    output: Path
    tok: Tokenizer
    tokenizer_dir: Path
    data: PackedDataset
    eval_windows: dict[str, torch.Tensor]
    model: Qwen3NextForCausalLM
    optimizer: torch.optim.Optimizer
    progress: Progress
    metrics: MetricsLog
    aux_coef: float
    mtp_weight: float
    in_update: bool = False  # True while the parameters are inconsistent (an update is half done)

    @property
    def tokens_per_step(self) -> int:
        return self.args.batch_size * self.args.seq_len * self.args.grad_accum

    def save(self) -> Path:
        return save_checkpoint(self.output, self.model, self.optimizer, self.progress, self.args,
                               self.data.fingerprint(), self.tok, self.tokenizer_dir)

    def evaluate(self, say: Callable[[str], None]) -> dict:
        return eval_and_log(self.model, self.eval_windows, self.args, self.mtp_weight, self.aux_coef, self.progress,
                            self.metrics, say)


def _run(args: argparse.Namespace, on_step: StepCallback | None) -> int:
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    configure_cpu(args.threads)
    run = _start(args, output)
    code = _train_loop(run, on_step)
    return code if code is not None else _finish(run)


def _start(args: argparse.Namespace, output: Path) -> _Run:
    """Load the tokenizer, the data and the model (from the checkpoint when resuming) and build the optimizer."""
    ckpt = find_checkpoint(output, args.resume) if args.resume else None
    state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False) if ckpt else None
    tokenizer_dir = Path(args.tokenizer or args.init_from or ckpt or "")
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise ValueError(f"--tokenizer: {tokenizer_dir} has no tokenizer.json")
    tok = Tokenizer.from_dir(tokenizer_dir)

    cache_dir = Path(args.data_cache) if args.data_cache else output.resolve().parent / ".token_cache"
    data = PackedDataset.from_groups(parse_data_specs(args.data), tok, tokenizer_fingerprint(tokenizer_dir),
                                     cache_dir, args.seq_len, args.val_fraction, args.seed)
    for line in data.describe():
        print(f"data  {line}", flush=True)
    eval_windows = data.eval_windows(args.eval_windows)

    model = _load_model(args, tok, ckpt, state, data)
    aux_coef = model.config.router_aux_loss_coef if args.aux_coef is None else args.aux_coef
    mtp_weight = args.mtp_weight if model.mtp is not None else 0.0

    optimizer = make_optimizer(model, args.lr, args.weight_decay, (args.beta1, args.beta2))
    progress = Progress()
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        progress = Progress(state["step"], state["tokens"], state["elapsed"])
        print(f"resumed from {ckpt} at step {progress.step}", flush=True)
    metrics = MetricsLog(output / "metrics.jsonl", progress.step if state is not None else None)
    return _Run(args, output, tok, tokenizer_dir, data, eval_windows, model, optimizer, progress, metrics, aux_coef,
                mtp_weight)


def _load_model(args: argparse.Namespace, tok: Tokenizer, ckpt: Path | None, state: dict | None,
                data: PackedDataset) -> Qwen3NextForCausalLM:
    """The checkpoint's model when resuming (warning about changed options), else `build_model`'s; in train mode."""
    if state is not None:
        model = Qwen3NextForCausalLM(Qwen3NextConfig.from_pretrained(ckpt))
        model.load_state_dict(state["model"])
        warn_changed_args(state["args"], args, state["data_key"], data.fingerprint())
    else:
        model = build_model(args, tok)
    model.train()
    cfg = model.config
    counts = cfg.parameter_counts()
    print(f"model {cfg.num_hidden_layers} layers, d={cfg.hidden_size}, {cfg.num_experts} experts top-"
          f"{cfg.num_experts_per_tok}, vocab {cfg.vocab_size}: {counts['total_with_mtp'] / 1e6:.2f}M params "
          f"({counts['active'] / 1e6:.2f}M active + {counts['mtp_active'] / 1e6:.2f}M MTP)", flush=True)
    if args.bf16:
        warn_if_bf16_is_emulated()
    return model


# ---- the loop --------------------------------------------------------------------------------------------------------
class _StopRequest:
    """First SIGINT: ask the loop to stop after the current step; second: abort immediately (KeyboardInterrupt)."""

    def __init__(self):
        self.requested = False
        self.aborted = False
        self._previous = None

    def __enter__(self) -> _StopRequest:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: plain KeyboardInterrupt semantics
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            self.aborted = True
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (Ctrl-C again to abort without saving) ...", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _train_loop(run: _Run, on_step: StepCallback | None) -> int | None:
    """Optimizer steps up to `--max-steps`, with periodic evals and checkpoints; None when all steps ran, else the
    exit code of an interrupted run (130)."""
    args, progress = run.args, run.progress
    bar = progress_bar(args.max_steps, progress.step)
    say = bar.write if bar is not None else print
    session_start, session_steps = time.perf_counter(), 0
    stop = _StopRequest()
    try:
        with stop:
            while progress.step < args.max_steps:
                record, grad_norm = _train_step(run)
                session_steps += 1
                rate = session_steps * run.tokens_per_step / (time.perf_counter() - session_start)
                _report_step(run, bar, record, grad_norm, rate)
                if args.eval_every and progress.step % args.eval_every == 0 and progress.step < args.max_steps:
                    run.evaluate(say)
                if args.save_every and progress.step % args.save_every == 0 and progress.step < args.max_steps:
                    say(f"saved {run.save()}")
                if on_step is not None:
                    on_step(progress.step, record)
                if stop.requested:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        return _interrupted(run, stop)
    if bar is not None:
        bar.close()
    return None


def _train_step(run: _Run) -> tuple[dict, float]:
    """One optimizer step over `--grad-accum` micro-batches; returns its metrics record (also appended to
    metrics.jsonl) and the gradient norm before clipping."""
    args, progress, optimizer = run.args, run.progress, run.optimizer
    t0 = time.perf_counter()
    lr = lr_at(progress.step, args.max_steps, args.lr, args.warmup_steps, args.min_lr_ratio)
    for g in optimizer.param_groups:
        g["lr"] = lr
    sums = {"loss": 0.0, "lm": 0.0, "mtp": 0.0, "aux": 0.0}
    for micro in range(args.grad_accum):
        batch = run.data.train_batch(progress.step, micro, args.batch_size)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            r = compute_losses(run.model, batch, run.mtp_weight, run.aux_coef)
        (r.total / args.grad_accum).backward()
        for key, value in (("loss", r.total), ("lm", r.lm), ("mtp", r.mtp), ("aux", r.aux)):
            sums[key] += float(value.detach()) / args.grad_accum if value is not None else 0.0
    run.in_update = True
    params = [p for p in run.model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    progress.step += 1
    progress.tokens += run.tokens_per_step
    run.in_update = False
    dt = time.perf_counter() - t0
    progress.elapsed += dt
    record = {"step": progress.step, **sums, "lr": lr, "grad_norm": round(float(grad_norm), 6),
              "tokens": progress.tokens, "tokens_per_s": round(run.tokens_per_step / dt, 1),
              "elapsed_s": round(progress.elapsed, 2)}
    run.metrics.write(record)
    return record, float(grad_norm)


def _report_step(run: _Run, bar, record: dict, grad_norm: float, rate: float) -> None:
    """Advance the progress bar, or print a step line every `--log-every` steps (and at the last one)."""
    args, progress = run.args, run.progress
    eta = (args.max_steps - progress.step) * run.tokens_per_step / rate
    if bar is not None:
        bar.update(1)
        bar.set_postfix_str(f"loss {record['loss']:.3f} lm {record['lm']:.3f} {rate:,.0f} tok/s")
    elif args.log_every and (progress.step % args.log_every == 0 or progress.step == args.max_steps):
        print(f"step {progress.step}/{args.max_steps} | loss {record['loss']:.4f} (lm {record['lm']:.4f} "
              f"mtp {record['mtp']:.4f} aux {record['aux']:.3f}) | lr {record['lr']:.2e} | gnorm {grad_norm:.2f}"
              f" | {rate:,.0f} tok/s | {fmt_time(progress.elapsed)} elapsed, ETA {fmt_time(eta)}", flush=True)


def _interrupted(run: _Run, stop: _StopRequest) -> int:
    """After Ctrl-C: save a checkpoint unless the run was aborted or stopped in the middle of an update."""
    run.optimizer.zero_grad(set_to_none=True)
    step = run.progress.step
    if stop.aborted:
        print(f"aborted at step {step} without saving", file=sys.stderr)
        return 130
    if run.in_update:
        print(f"interrupted during a parameter update: not saving (last checkpoint stands); step {step}",
              file=sys.stderr)
        return 130
    path = run.save()
    print(f"interrupted at step {step}: saved {path}; continue with --resume", file=sys.stderr)
    return 130


def _finish(run: _Run) -> int:
    """Final eval, checkpoint and model dir, `train_summary.json` and the loss curve."""
    output, progress = run.output, run.progress
    result = run.evaluate(print)
    path = run.save()
    save_model_dir(output, run.model, parse_dtype(run.args.save_dtype), run.tok, run.tokenizer_dir)
    summary = {"steps": progress.step, "tokens": progress.tokens, "train_seconds": round(progress.elapsed, 1),
               "params": run.model.config.parameter_counts(), "data": run.data.summary(), **result}
    (output / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if plot_loss_curve(output / "metrics.jsonl", output / "loss_curve.png"):
        print(f"wrote {output / 'loss_curve.png'}")
    else:
        print("note: matplotlib is not installed; no loss_curve.png (metrics.jsonl has the numbers)")
    print(f"done: {progress.step} steps, {progress.tokens:,} tokens in {fmt_time(progress.elapsed)}; model in "
          f"{output}, last checkpoint {path}", flush=True)
    return 0
