"""`qwen3next train`: train a Qwen3-Next model (LM + MTP + router aux loss) on text files, on CPU.

Reads top to bottom: arguments -> tokenizer -> data -> model -> optimizer -> loop (step, log, eval, checkpoint) ->
final save. Choices worth knowing:

- Optimizer: AdamW with fp32 master weights. Weight decay applies to every matrix (projections, stacked experts,
  routers, conv kernels, lm_head) and to the zero-centred RMSNorm weights (they store `gain - 1`, so decay pulls
  gains toward 1). It does NOT apply to the embedding (rare tokens would decay to zero between their rare updates),
  to the DeltaNet `A_log` / `dt_bias` (per-head dynamics constants, where 0 has no special meaning), or to the plain
  gain of the gated norm `linear_attn.norm.weight` (decay would pull it toward 0).
- LR: linear warmup to `--lr`, then cosine to `--lr * --min-lr-ratio`; a pure function of the step.
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
import copy
import json
import math
import os
import shutil
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
from .data import DOC_SEPARATOR, PackedDataset, parse_data_specs, tokenizer_fingerprint
from .losses import compute_losses
from .presets import PRESETS, padded_vocab_size, preset_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "added_tokens.json")
STATE_FILE = "trainer_state.pt"
# Arguments whose change makes a resumed run differ from an uninterrupted one.
_RESUME_KEYS = ("seq_len", "batch_size", "grad_accum", "max_steps", "lr", "min_lr_ratio", "warmup_steps",
                "weight_decay", "beta1", "beta2", "grad_clip", "mtp_weight", "aux_coef", "bf16", "seed")

StepCallback = Callable[[int, dict], None]


# ---- arguments -------------------------------------------------------------------------------------------------------
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


def _check_args(args: argparse.Namespace) -> None:
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


# ---- schedule and optimizer ------------------------------------------------------------------------------------------
def lr_at(step: int, max_steps: int, lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay to `lr * min_lr_ratio` at `max_steps`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def is_decayed(name: str) -> bool:
    """Weight-decay policy (see the module docstring)."""
    if name.endswith(("A_log", "dt_bias", "linear_attn.norm.weight", "embed_tokens.weight")):
        return False
    return True  # matrices, stacked experts, conv kernels, zero-centred norm offsets


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                   betas: tuple[float, float]) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if is_decayed(name) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8)


# ---- model / tokenizer setup -----------------------------------------------------------------------------------------
def _tokenizer_ids(tok: Tokenizer) -> tuple[int | None, int | None, int | None]:
    """(bos, eos, pad) for config.json: Qwen's convention bos = pad = <|endoftext|>, eos = the tokenizer's eos."""
    sep = tok.token_to_id(DOC_SEPARATOR)
    return sep, tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else sep


def build_model(args: argparse.Namespace, tok: Tokenizer) -> Qwen3NextForCausalLM:
    """A fresh (seeded) or loaded fp32 model whose vocab covers the tokenizer."""
    bos, eos, pad = _tokenizer_ids(tok)
    if args.init_from:
        model = Qwen3NextForCausalLM.from_pretrained(args.init_from, dtype=torch.float32)
    else:
        if args.preset:
            config = preset_config(args.preset, padded_vocab_size(tok.vocab_size), bos, eos, pad)
        else:
            config = Qwen3NextConfig.from_pretrained(args.config)
            config.bos_token_id, config.eos_token_id, config.pad_token_id = bos, eos, pad
        config.torch_dtype = args.save_dtype
        torch.manual_seed(args.seed)
        model = Qwen3NextForCausalLM(config)
        model.init_weights(torch.Generator().manual_seed(args.seed))
    if model.config.vocab_size < tok.vocab_size:
        raise ValueError(f"vocab_size: the model has {model.config.vocab_size} rows, the tokenizer "
                         f"{tok.vocab_size} ids")
    return model


def write_generation_config(out: Path, tok: Tokenizer, config: Qwen3NextConfig) -> None:
    """Sampling defaults of the Qwen3 Instruct family (SPEC §12.3) and the tokenizer's stop ids."""
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": tok.eos_token_ids,
           "pad_token_id": config.pad_token_id, "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")


def save_model_dir(out: Path, model: Qwen3NextForCausalLM, save_dtype: torch.dtype, tok: Tokenizer,
                   tokenizer_dir: Path) -> None:
    """A complete HF model dir: config + weights (in `save_dtype`) + tokenizer files + generation_config.json."""
    out.mkdir(parents=True, exist_ok=True)
    to_save = model if model.dtype == save_dtype else copy.deepcopy(model).to(save_dtype)
    to_save.save_pretrained(out)
    for name in TOKENIZER_FILES:
        src = tokenizer_dir / name
        if src.is_file() and src.resolve() != (out / name).resolve():
            shutil.copyfile(src, out / name)
    write_generation_config(out, tok, model.config)


# ---- checkpoints -----------------------------------------------------------------------------------------------------
@dataclass
class Progress:
    step: int = 0  # optimizer steps completed
    tokens: int = 0  # input tokens trained on
    elapsed: float = 0.0  # training seconds over all sessions


def save_checkpoint(output: Path, model: Qwen3NextForCausalLM, optimizer: torch.optim.Optimizer, progress: Progress,
                    args: argparse.Namespace, data_key: str, tok: Tokenizer, tokenizer_dir: Path) -> Path:
    """Write `output/checkpoint-NNNNNNN` through a temporary dir (an interrupted save never looks complete)."""
    final = output / f"checkpoint-{progress.step:07d}"
    tmp = output / f".tmp-checkpoint-{progress.step:07d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_model_dir(tmp, model, parse_dtype(args.save_dtype), tok, tokenizer_dir)
    state = {"step": progress.step, "tokens": progress.tokens, "elapsed": progress.elapsed,
             "model": model.state_dict(), "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
             "args": {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))},
             "data_key": data_key}
    torch.save(state, tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    old = sorted(p for p in output.glob("checkpoint-*") if (p / STATE_FILE).is_file())
    for p in old[: max(0, len(old) - args.keep_checkpoints)]:
        shutil.rmtree(p)
    return final


def find_checkpoint(output: Path, resume: str) -> Path:
    if resume != "latest":
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise ValueError(f"--resume: {path} has no {STATE_FILE}")
        return path
    found = sorted(p for p in output.glob("checkpoint-*") if (p / STATE_FILE).is_file())
    if not found:
        raise ValueError(f"--resume: no checkpoint-*/{STATE_FILE} in {output}")
    return found[-1]


# ---- metrics ---------------------------------------------------------------------------------------------------------
class MetricsLog:
    """`metrics.jsonl`: one JSON object per line (train lines every step, eval lines with `val_*` keys)."""

    def __init__(self, path: Path, keep_until_step: int | None):
        self.path = path
        if keep_until_step is None:
            path.write_text("", encoding="utf-8")
        elif path.exists():  # resuming: drop what a longer, abandoned run wrote after the checkpoint
            lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
            kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= keep_until_step]
            path.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")

    def write(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def plot_loss_curve(metrics_path: Path, png_path: Path) -> bool:
    """Train loss (and held-out loss) against step as a PNG; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [json.loads(ln) for ln in metrics_path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), lw=0.6, alpha=0.5, label="train (total)")
        k = max(1, len(train) // 50)
        smooth = [(train[i][0], sum(v for _, v in train[max(0, i - k + 1):i + 1]) / min(k, i + 1))
                  for i in range(len(train))]
        ax.plot(*zip(*smooth), lw=1.2, label=f"train (mean of {k})")
    if val:
        ax.plot(*zip(*val), "o-", lw=1.2, label="held-out LM loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return True


def _fmt_time(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ---- evaluation ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: Qwen3NextForCausalLM, windows: dict[str, torch.Tensor], batch_size: int, mtp_weight: float,
             aux_coef: float, bf16: bool) -> dict:
    """Held-out LM loss / perplexity / top-1 accuracy and MTP loss / top-1 accuracy, per group and overall (the
    overall numbers are token-weighted over all groups)."""
    model.eval()
    out: dict = {}
    tot = {"lm": 0.0, "mtp": 0.0, "n": 0, "lm_hit": 0, "mtp_hit": 0, "mtp_n": 0}
    for name, w in windows.items():
        lm_sum, n = 0.0, 0
        for i in range(0, len(w), batch_size):
            batch = w[i:i + batch_size]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                r = compute_losses(model, batch, mtp_weight, aux_coef, with_accuracy=True)
            lm_sum += float(r.lm) * r.lm_count
            n += r.lm_count
            tot["lm_hit"] += r.lm_correct
            if r.mtp is not None:
                tot["mtp"] += float(r.mtp) * r.mtp_count
                tot["mtp_hit"] += r.mtp_correct
                tot["mtp_n"] += r.mtp_count
        out[f"val_loss/{name}"] = lm_sum / n
        tot["lm"] += lm_sum
        tot["n"] += n
    model.train()
    if not tot["n"]:
        return {}
    out["val_loss"] = tot["lm"] / tot["n"]
    out["val_ppl"] = math.exp(min(out["val_loss"], 50.0))
    out["val_acc"] = tot["lm_hit"] / tot["n"]
    if tot["mtp_n"]:
        out["val_mtp_loss"] = tot["mtp"] / tot["mtp_n"]
        out["val_mtp_acc"] = tot["mtp_hit"] / tot["mtp_n"]
    return out


# ---- the run ---------------------------------------------------------------------------------------------------------
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


def run_train(args: argparse.Namespace, on_step: StepCallback | None = None) -> int:
    """Train as `args` says; returns the exit code (0 done, 130 interrupted, 2 bad arguments).

    `on_step(step, record)` is called after every optimizer step with that step's metrics record (tests use it to
    raise KeyboardInterrupt at a known point).
    """
    try:
        _check_args(args)
        return _run(args, on_step)
    except ValueError as e:
        print(f"qwen3next train: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, on_step: StepCallback | None) -> int:
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    torch.set_flush_denormal(True)  # denormals made steps 5-7x slower on this kind of CPU (CORPUS.md)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    else:
        torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())

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

    if state is not None:
        model = Qwen3NextForCausalLM(Qwen3NextConfig.from_pretrained(ckpt))
        model.load_state_dict(state["model"])
        _warn_changed_args(state["args"], args, state["data_key"], data.fingerprint())
    else:
        model = build_model(args, tok)
    model.train()
    cfg = model.config
    counts = cfg.parameter_counts()
    print(f"model {cfg.num_hidden_layers} layers, d={cfg.hidden_size}, {cfg.num_experts} experts top-"
          f"{cfg.num_experts_per_tok}, vocab {cfg.vocab_size}: {counts['total_with_mtp'] / 1e6:.2f}M params "
          f"({counts['active'] / 1e6:.2f}M active + {counts['mtp_active'] / 1e6:.2f}M MTP)", flush=True)
    if args.bf16 and cpu_has_fast_bf16() is False:
        print("warning: this CPU has no AVX512-BF16/AMX, so bf16 autocast matmuls are emulated (measured ~30x slower "
              "than fp32 on an AVX2 EPYC); consider dropping --bf16", file=sys.stderr)
    aux_coef = cfg.router_aux_loss_coef if args.aux_coef is None else args.aux_coef
    mtp_weight = args.mtp_weight if model.mtp is not None else 0.0

    optimizer = make_optimizer(model, args.lr, args.weight_decay, (args.beta1, args.beta2))
    progress = Progress()
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        progress = Progress(state["step"], state["tokens"], state["elapsed"])
        print(f"resumed from {ckpt} at step {progress.step}", flush=True)
    metrics = MetricsLog(output / "metrics.jsonl", progress.step if state is not None else None)
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum
    params = [p for p in model.parameters() if p.requires_grad]

    bar = _progress_bar(args.max_steps, progress.step)
    say = bar.write if bar is not None else print
    session_start, session_steps = time.perf_counter(), 0
    in_update = False
    stop = _StopRequest()
    try:
        with stop:
            while progress.step < args.max_steps:
                t0 = time.perf_counter()
                lr = lr_at(progress.step, args.max_steps, args.lr, args.warmup_steps, args.min_lr_ratio)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                sums = {"loss": 0.0, "lm": 0.0, "mtp": 0.0, "aux": 0.0}
                for micro in range(args.grad_accum):
                    batch = data.train_batch(progress.step, micro, args.batch_size)
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                        r = compute_losses(model, batch, mtp_weight, aux_coef)
                    (r.total / args.grad_accum).backward()
                    for key, value in (("loss", r.total), ("lm", r.lm), ("mtp", r.mtp), ("aux", r.aux)):
                        sums[key] += float(value.detach()) / args.grad_accum if value is not None else 0.0
                in_update = True  # parameters are inconsistent until the update finishes
                grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else
                                                           float("inf"))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                progress.step += 1
                progress.tokens += tokens_per_step
                in_update = False
                dt = time.perf_counter() - t0
                progress.elapsed += dt
                session_steps += 1

                record = {"step": progress.step, **sums, "lr": lr,
                          "grad_norm": round(float(grad_norm), 6), "tokens": progress.tokens,
                          "tokens_per_s": round(tokens_per_step / dt, 1), "elapsed_s": round(progress.elapsed, 2)}
                metrics.write(record)
                rate = session_steps * tokens_per_step / (time.perf_counter() - session_start)
                eta = (args.max_steps - progress.step) * tokens_per_step / rate
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"loss {sums['loss']:.3f} lm {sums['lm']:.3f} {rate:,.0f} tok/s")
                elif args.log_every and (progress.step % args.log_every == 0 or progress.step == args.max_steps):
                    print(f"step {progress.step}/{args.max_steps} | loss {sums['loss']:.4f} (lm {sums['lm']:.4f} "
                          f"mtp {sums['mtp']:.4f} aux {sums['aux']:.3f}) | lr {lr:.2e} | gnorm {float(grad_norm):.2f}"
                          f" | {rate:,.0f} tok/s | {_fmt_time(progress.elapsed)} elapsed, ETA {_fmt_time(eta)}",
                          flush=True)
                if args.eval_every and progress.step % args.eval_every == 0 and progress.step < args.max_steps:
                    _eval_and_log(model, eval_windows, args, mtp_weight, aux_coef, progress, metrics, say)
                if args.save_every and progress.step % args.save_every == 0 and progress.step < args.max_steps:
                    path = save_checkpoint(output, model, optimizer, progress, args, data.fingerprint(), tok,
                                           tokenizer_dir)
                    say(f"saved {path}")
                if on_step is not None:
                    on_step(progress.step, record)
                if stop.requested:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        optimizer.zero_grad(set_to_none=True)
        if stop.aborted:
            print(f"aborted at step {progress.step} without saving", file=sys.stderr)
            return 130
        if in_update:
            print(f"interrupted during a parameter update: not saving (last checkpoint stands); step "
                  f"{progress.step}", file=sys.stderr)
            return 130
        path = save_checkpoint(output, model, optimizer, progress, args, data.fingerprint(), tok, tokenizer_dir)
        print(f"interrupted at step {progress.step}: saved {path}; continue with --resume", file=sys.stderr)
        return 130
    if bar is not None:
        bar.close()

    result = _eval_and_log(model, eval_windows, args, mtp_weight, aux_coef, progress, metrics, print)
    path = save_checkpoint(output, model, optimizer, progress, args, data.fingerprint(), tok, tokenizer_dir)
    save_model_dir(output, model, parse_dtype(args.save_dtype), tok, tokenizer_dir)
    summary = {"steps": progress.step, "tokens": progress.tokens, "train_seconds": round(progress.elapsed, 1),
               "params": counts, "data": data.summary(), **result}
    (output / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if plot_loss_curve(output / "metrics.jsonl", output / "loss_curve.png"):
        print(f"wrote {output / 'loss_curve.png'}")
    else:
        print("note: matplotlib is not installed; no loss_curve.png (metrics.jsonl has the numbers)")
    print(f"done: {progress.step} steps, {progress.tokens:,} tokens in {_fmt_time(progress.elapsed)}; model in "
          f"{output}, last checkpoint {path}", flush=True)
    return 0


def _eval_and_log(model: Qwen3NextForCausalLM, windows: dict[str, torch.Tensor], args: argparse.Namespace,
                  mtp_weight: float, aux_coef: float, progress: Progress, metrics: MetricsLog,
                  say: Callable[[str], None]) -> dict:
    if not windows:
        return {}
    result = evaluate(model, windows, args.batch_size, mtp_weight, aux_coef, args.bf16)
    metrics.write({"step": progress.step, **{k: round(v, 6) for k, v in result.items()}})
    mtp = f", MTP loss {result['val_mtp_loss']:.4f} top-1 {result['val_mtp_acc']:.1%}" if "val_mtp_acc" in result \
        else ""
    say(f"eval step {progress.step}: held-out loss {result['val_loss']:.4f} (ppl {result['val_ppl']:.1f}, top-1 "
        f"{result['val_acc']:.1%}){mtp}")
    return result


def cpu_has_fast_bf16() -> bool | None:
    """Whether the CPU has native bf16 matmul units (AVX512-BF16 or AMX); None when unknown (not Linux)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _progress_bar(total: int, initial: int):
    """tqdm when installed and stderr is a terminal; None means plain progress lines."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


def _warn_changed_args(saved: dict, args: argparse.Namespace, saved_data_key: str, data_key: str) -> None:
    for k in _RESUME_KEYS:
        if k in saved and saved[k] != getattr(args, k):
            print(f"warning: --{k.replace('_', '-')} was {saved[k]!r} in the checkpoint, now {getattr(args, k)!r}; "
                  f"the run will not match an uninterrupted one", file=sys.stderr)
    if saved_data_key != data_key:
        print("warning: the training data differ from the checkpoint's", file=sys.stderr)
