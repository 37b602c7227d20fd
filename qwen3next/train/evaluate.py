"""Held-out evaluation: LM loss / perplexity / top-1 accuracy and MTP loss / accuracy on fixed windows."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch

from ..model.qwen3_next import Qwen3NextForCausalLM
from .checkpoints import Progress
from .losses import compute_losses
from .metrics import MetricsLog


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


def eval_and_log(model: Qwen3NextForCausalLM, windows: dict[str, torch.Tensor], args: argparse.Namespace,
                 mtp_weight: float, aux_coef: float, progress: Progress, metrics: MetricsLog,
                 say: Callable[[str], None]) -> dict:
    """Evaluate, append the numbers to `metrics.jsonl` and `say` a one-line summary; {} when there are no windows."""
    if not windows:
        return {}
    result = evaluate(model, windows, args.batch_size, mtp_weight, aux_coef, args.bf16)
    metrics.write({"step": progress.step, **{k: round(v, 6) for k, v in result.items()}})
    mtp = f", MTP loss {result['val_mtp_loss']:.4f} top-1 {result['val_mtp_acc']:.1%}" if "val_mtp_acc" in result \
        else ""
    say(f"eval step {progress.step}: held-out loss {result['val_loss']:.4f} (ppl {result['val_ppl']:.1f}, top-1 "
        f"{result['val_acc']:.1%}){mtp}")
    return result

