"""`qwen3next bench --ablation attention`: the hybrid layout's long-context advantage, reproduced in one engine.

Three models with random weights run the same workload at each context length:
- `hybrid`: the preset itself (3 Gated DeltaNet : 1 gated attention, MoE);
- `full_attention`: its twin with EVERY layer gated attention, same MoE and sizes: isolates the hybrid layout;
- `dense`: a dense full-attention model shaped like the release's comparison (Qwen3-32B vs Qwen3-Next-80B-A3B):
  twice the width, twice the attention heads, a dense SwiGLU MLP sized so that its non-embedding parameters are
  ~11x the preset's active ones (the 32B : 3B ratio). Its total is NOT 0.4x the preset's (the 32B : 80B ratio):
  the presets are far less sparse than the 80B (`small`: 4.9x total / active, the 80B ~27x), so both ratios
  cannot hold at once; the report prints the ratios it got.

Per context L: prefill of one L-token prompt in chunks of `chunk` tokens (as the engine prefills; the first chunk
takes SDPA's causal form, later ones the mask-free context split), then decode steps at that context for batch 1
and for batch 4 (the first sequence's cache copied into three more rows: same context, no three more prefills).
The hybrid always runs (the ratios are against it); `models` picks the twins.
Rounds are interleaved (each round measures every model once per context); medians are reported, with the
ratios hybrid / full_attention and hybrid / dense.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import Qwen3NextConfig
from ..engine.memory import config_geometry, fmt_bytes
from ..model.qwen3_next import Qwen3NextForCausalLM
from ..train.presets import PRESETS, preset_config
from . import measure

ABLATIONS = ("attention",)
MODELS = ("hybrid", "full_attention", "dense")
DENSE_ACTIVE_RATIO = 32.0 / 3.0  # Qwen3-32B : Qwen3-Next-80B-A3B active parameters
DENSE_TOTAL_RATIO = 32.0 / 80.0


@dataclass
class AblationOptions:
    preset: str = "small"
    contexts: list[int] = field(default_factory=lambda: [1024, 4096, 8192, 16384, 32768])
    chunk: int = 4096  # prefill chunk (tokens)
    decode_steps: int = 8  # timed decode steps per measurement (after 2 untimed)
    batches: tuple[int, ...] = (1, 4)
    repeat: int = 1  # interleaved rounds
    dtype: str = "float32"
    seed: int = 0
    models: tuple[str, ...] = MODELS

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {self.preset!r}")
        if not self.contexts or any(c < 2 for c in self.contexts):
            raise ValueError(f"contexts: expected token counts >= 2, got {self.contexts}")
        for name in ("chunk", "decode_steps", "repeat"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        bad = [m for m in self.models if m not in MODELS]
        if bad or not self.models:
            raise ValueError(f"models: expected some of {list(MODELS)}, got {list(self.models)}")


# ---- the three configurations ----------------------------------------------------------------------------------------
def _no_mtp(config: Qwen3NextConfig, **changes) -> Qwen3NextConfig:
    d = config.to_dict()
    d.update(num_nextn_predict_layers=0, **changes)
    d.pop("full_attention_interval", None)
    return Qwen3NextConfig.from_dict(d)


def full_attention_twin(base: Qwen3NextConfig) -> Qwen3NextConfig:
    """`base` with every layer full attention (same heads, MoE, widths)."""
    return _no_mtp(base, layer_types=["full_attention"] * base.num_hidden_layers)


def _mixer_ffn_active(config: Qwen3NextConfig) -> int:
    """Active parameters per token without the embedding and the LM head (what the layers compute with)."""
    counts = config.parameter_counts()
    return counts["active"] - counts["embedding"]  # "active" counts the head's matmul (embedding-sized) once


def dense_twin(base: Qwen3NextConfig) -> Qwen3NextConfig:
    """All full attention, dense SwiGLU MLP, 2x width and attention heads, MLP width for ~11x the active
    non-embedding parameters of `base` (module docstring)."""
    D, L = 2 * base.hidden_size, base.num_hidden_layers
    heads, kv_heads = 2 * base.num_attention_heads, 2 * base.num_key_value_heads
    attn = D * 2 * heads * base.head_dim + 2 * D * kv_heads * base.head_dim + heads * base.head_dim * D
    target = DENSE_ACTIVE_RATIO * _mixer_ffn_active(base)
    inter = max(64, round((target / L - attn - 2 * D) / (3 * D) / 64) * 64)
    return _no_mtp(base, hidden_size=D, num_attention_heads=heads, num_key_value_heads=kv_heads,
                   intermediate_size=inter, layer_types=["full_attention"] * L, mlp_only_layers=list(range(L)))


def ablation_configs(preset: str) -> dict[str, Qwen3NextConfig]:
    base = _no_mtp(preset_config(preset))
    return {"hybrid": base, "full_attention": full_attention_twin(base), "dense": dense_twin(base)}


def describe_configs(configs: dict[str, Qwen3NextConfig]) -> dict[str, dict]:
    out = {}
    base = configs["hybrid"]
    for name, c in configs.items():
        counts = c.parameter_counts()
        out[name] = {
            "layers": "".join("A" if t == "full_attention" else "L" for t in c.layer_types),
            "hidden_size": c.hidden_size, "attention_heads": f"{c.num_attention_heads}/{c.num_key_value_heads}",
            "ffn": "MoE" if c.is_moe_layer(0) else f"dense {c.intermediate_size}",
            "params_total": counts["total"], "params_active_non_embedding": _mixer_ffn_active(c),
            "active_ratio_to_hybrid": _mixer_ffn_active(c) / _mixer_ffn_active(base),
            "total_ratio_to_hybrid": counts["total"] / base.parameter_counts()["total"],
        }
    return out


# ---- measurement -----------------------------------------------------------------------------------------------------
def _forward(model: Qwen3NextForCausalLM, cache, rows: list[int], ids: torch.Tensor, n: int) -> torch.Tensor:
    """Append n tokens to each of `rows` (ids flat [len(rows) * n]); the last token's logits per row."""
    info = cache.batch(rows, [n] * len(rows))
    hidden = model.hidden_states(ids, model.context(info, cache.hybrid))
    cache.advance(rows, [n] * len(rows))
    return model.lm_head(hidden.view(len(rows), n, -1)[:, -1])


def _copy_sequence(cache, src: int, dst: int) -> None:
    """Sequence dst becomes a copy of sequence src (its K/V rows and DeltaNet state)."""
    hy, bs, n = cache.hybrid, cache.hybrid.block_size, cache.lengths[src]
    for key in hy.k:
        for pool in (hy.k[key], hy.v[key]):
            for p in range(0, n, bs):
                a, b = cache.block_tables[src][p // bs] * bs, cache.block_tables[dst][p // bs] * bs
                m = min(bs, n - p)
                pool[b:b + m].copy_(pool[a:a + m])
    hy.copy_slot(src, dst)
    cache.lengths[dst] = n


@torch.no_grad()
def measure_once(model: Qwen3NextForCausalLM, context: int, opts: AblationOptions, seed: int) -> dict[str, float]:
    """One prefill of `context` tokens (seconds) and decode step times at that context (seconds, median)."""
    B = max(opts.batches)
    cache = model.new_cache(B + 1, context + opts.decode_steps + 3)
    ids = torch.randint(0, model.config.vocab_size, (context,), generator=torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    logits = None
    for a in range(0, context, opts.chunk):
        logits = _forward(model, cache, [0], ids[a:a + opts.chunk], min(opts.chunk, context - a))
    out = {"prefill_s": time.perf_counter() - t0}
    tok = logits.argmax(-1)
    spare = B  # one more slot holds the prefilled DeltaNet state, restored before each batch size
    cache.hybrid.copy_slot(0, spare)
    for b in opts.batches:
        cache.hybrid.copy_slot(spare, 0)
        for dst in range(1, b):
            _copy_sequence(cache, 0, dst)
        rows = list(range(b))
        tok = tok[:1].repeat(b)
        times = []
        for step in range(opts.decode_steps + 2):
            t0 = time.perf_counter()
            tok = _forward(model, cache, rows, tok, 1).argmax(-1)
            if step >= 2:
                times.append(time.perf_counter() - t0)
        out[f"decode_b{b}_s"] = statistics.median(times)
        for row in rows:  # back to the prefilled sequence: its K/V rows past `context` are overwritten, its
            cache.lengths[row] = context  # DeltaNet state restored from the spare slot above
    return out


def cache_bytes(config: Qwen3NextConfig, context: int, element_size: int) -> int:
    """Per-sequence cache at `context` tokens as the engine allocates it (K/V blocks of the attention layers, the
    DeltaNet conv and recurrent state slot)."""
    return config_geometry(config, element_size).sequence_bytes(context)


def run_ablation(opts: AblationOptions, log: Callable[[str], None] = lambda m: None) -> dict:
    opts.validate()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[opts.dtype]
    configs = {k: v for k, v in ablation_configs(opts.preset).items() if k in opts.models or k == "hybrid"}
    longest = max(opts.contexts) + opts.decode_steps + 3
    for c in configs.values():  # random weights: positions past the trained context are just positions
        c.max_position_embeddings = max(c.max_position_embeddings, longest)
    models = {name: measure.random_weights(c, dtype, opts.seed) for name, c in configs.items()}
    warm = dataclasses.replace(opts, decode_steps=1, chunk=64)
    for model in models.values():  # first calls (kernel build / load, allocator growth) are not timed
        measure_once(model, 128, warm, opts.seed)
    samples: dict[tuple[str, int], list[dict[str, float]]] = {}
    for context in opts.contexts:
        for r in range(opts.repeat):
            for name, model in models.items():
                got = measure_once(model, context, opts, opts.seed + r)
                samples.setdefault((name, context), []).append(got)
                log(f"{name} @ {context}: prefill {context / got['prefill_s']:.0f} tok/s, "
                    + ", ".join(f"decode b{b} {b / got[f'decode_b{b}_s']:.1f} tok/s" for b in opts.batches))
    rows = []
    for context in opts.contexts:
        for name in models:
            s = samples[(name, context)]
            row = {"model": name, "context": context,
                   "prefill_tok_s": context / statistics.median(x["prefill_s"] for x in s),
                   "cache_bytes_per_seq": cache_bytes(configs[name], context, torch.tensor([], dtype=dtype)
                                                      .element_size())}
            for b in opts.batches:
                row[f"decode_b{b}_tok_s"] = b / statistics.median(x[f"decode_b{b}_s"] for x in s)
            rows.append(row)
    ratios = []
    by = {(r["model"], r["context"]): r for r in rows}
    metrics = ["prefill_tok_s", *(f"decode_b{b}_tok_s" for b in opts.batches)]
    for context in opts.contexts:
        hy = by.get(("hybrid", context))
        if hy is None:
            continue
        for other in ("full_attention", "dense"):
            ot = by.get((other, context))
            if ot is not None:
                ratios.append({"context": context, "vs": other,
                               **{m: hy[m] / ot[m] for m in metrics},
                               "cache_bytes": hy["cache_bytes_per_seq"] / ot["cache_bytes_per_seq"]})
    return {"ablation": "attention", "options": dataclasses.asdict(opts), "threads": torch.get_num_threads(),
            "models": describe_configs(configs), "rows": rows, "ratios": ratios}


# ---- report ----------------------------------------------------------------------------------------------------------
def format_ablation(report: dict) -> str:
    batches = report["options"]["batches"]
    lines = [f"ablation: attention layout ({report['options']['preset']} preset, random weights, "
             f"{report['options']['dtype']}, {report['threads']} threads, prefill chunks of "
             f"{report['options']['chunk']}, medians of {report['options']['repeat']} interleaved rounds)", ""]
    for name, m in report["models"].items():
        lines.append(f"  {name:<15} layers {m['layers']}  hidden {m['hidden_size']}  heads {m['attention_heads']}  "
                     f"ffn {m['ffn']}  params {m['params_total'] / 1e6:.1f}M total ({m['total_ratio_to_hybrid']:.2f}x"
                     f" hybrid), {m['params_active_non_embedding'] / 1e6:.1f}M active non-embedding "
                     f"({m['active_ratio_to_hybrid']:.2f}x)")
    def table(title: str, columns: list[tuple[str, int]], rows: list[list[str]]) -> list[str]:
        head = f"{'context':>8}  {title:<15}" + "".join(f"{name:>{width}}" for name, width in columns)
        return ["", head, "-" * len(head)] + [f"{r[0]:>8}  {r[1]:<15}" + "".join(
            f"{cell:>{width}}" for cell, (_, width) in zip(r[2:], columns)) for r in rows]

    lines += table("model", [("prefill tok/s", 14), *((f"decode b{b} tok/s", 17) for b in batches),
                             ("cache / seq", 13)],
                   [[r["context"], r["model"], f"{r['prefill_tok_s']:.1f}",
                     *(f"{r[f'decode_b{b}_tok_s']:.2f}" for b in batches), fmt_bytes(r["cache_bytes_per_seq"])]
                    for r in report["rows"]])
    if report["ratios"]:
        lines += table("hybrid / ...", [("prefill", 10), *((f"decode b{b}", 12) for b in batches), ("cache", 9)],
                       [[q["context"], q["vs"], f"{q['prefill_tok_s']:.2f}x",
                         *(f"{q[f'decode_b{b}_tok_s']:.2f}x" for b in batches), f"{q['cache_bytes']:.2f}x"]
                        for q in report["ratios"]])
    return "\n".join(lines)


def plot_ablation(report: dict, path: str | Path) -> None:
    """Throughput vs context, one panel per metric, a line per model (matplotlib, the optional [plot] extra)."""
    from ..eval.plots import require_matplotlib

    plt = require_matplotlib("--plot")
    batches = report["options"]["batches"]
    metrics = [("prefill_tok_s", "prefill tok/s")] + [(f"decode_b{b}_tok_s", f"decode tok/s, batch {b}")
                                                      for b in batches]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4))
    for ax, (key, title) in zip(axes, metrics):
        for name in report["models"]:
            rows = [r for r in report["rows"] if r["model"] == name]
            ax.plot([r["context"] for r in rows], [r[key] for r in rows], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"hybrid vs full-attention and dense twins ({report['options']['preset']}, "
                 f"{report['threads']} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_json(report: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
