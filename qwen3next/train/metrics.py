"""What a run reports: `metrics.jsonl`, the loss-curve PNG, the progress bar and the step lines."""

from __future__ import annotations

import json
import sys
from pathlib import Path


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


def fmt_time(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def progress_bar(total: int, initial: int):
    """tqdm when installed and stderr is a terminal; None means plain progress lines."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

