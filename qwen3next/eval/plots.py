"""PNG plots of the evaluations, with matplotlib (the optional `[plot]` extra: `pip install 'qwen3next[plot]'`)."""

from __future__ import annotations

from pathlib import Path


def require_matplotlib(flag: str):
    """matplotlib.pyplot (Agg backend), or a ValueError naming `flag` and how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError(f"{flag}: plotting needs matplotlib, which is not installed; install it with "
                         f"pip install 'qwen3next[plot]' (or pip install matplotlib), or leave out {flag}") from None
    return plt


def _kilo(n: float) -> str:
    return f"{int(n) // 1024}K" if n >= 1024 and n % 1024 == 0 else f"{n:,.0f}"


def plot_position_loss(runs: list[dict], png: Path, title: str, native_context: int | None) -> None:
    """Mean NLL per position bucket: one line per (run, context), x = the bucket's middle position (log scale)."""
    plt = require_matplotlib("--plot")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    styles = ["-", "--", ":", "-."]
    markers = "osd^v<>"
    for r, run in enumerate(runs):
        for c, ctx in enumerate(run["contexts"]):
            pts = [((b["start"] + b["end"]) / 2, b["nll"]) for b in ctx["buckets"] if b["tokens"]]
            if pts:
                ax.plot(*zip(*pts), linestyle=styles[r % len(styles)], marker=markers[c % len(markers)],
                        color=f"C{c}", label=f"{run['label']}, context {_kilo(ctx['context'])}")
    if native_context:
        ax.axvline(native_context, color="grey", lw=0.8, ls=":")
        ax.text(native_context, 0.02, f" max_position_embeddings {_kilo(native_context)}", color="grey", fontsize=8,
                va="bottom", ha="left", transform=ax.get_xaxis_transform())
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda x, _: _kilo(x)))
    ax.set_xlabel("position in the window (tokens; middle of each bucket)")
    ax.set_ylabel("mean loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def plot_passkey_heatmap(accuracy: list[list[float]], lengths: list[int], depths: list[float], png: Path,
                         title: str) -> None:
    """Accuracy heat map: rows = needle depth, columns = prompt length; accuracy[depth][length] in [0, 1]."""
    plt = require_matplotlib("--plot")
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(lengths), 1.2 + 0.55 * len(depths)))
    im = ax.imshow(accuracy, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(lengths)), [_kilo(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("needle depth")
    for i, row in enumerate(accuracy):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=9)
    fig.colorbar(im, ax=ax, label="accuracy")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
