"""`qwen3next bench`: prefill and decode speed of our model, our engine and (optionally) transformers on the same
weights, plus the machine's memory bandwidth and the batch-1 decode roofline it implies.

`add_bench_args(parser)` declares the options, `run_bench(args)` runs and prints; `bench(options)` returns the report
as a JSON-ready dict (what `--json` writes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..argtypes import positive_int
from ..checkpoint import load_model, parse_dtype
from ..config import Qwen3NextConfig
from ..engine.compiled import CompiledDecoder
from ..model.qwen3_next import Qwen3NextForCausalLM
from ..tokenizer import Tokenizer
from ..train.presets import PRESETS, preset_config
from . import measure

IMPLS = ("ours", "engine", "compiled", "transformers")  # compiled: ours through engine.compiled (--compile)
QUANT_VARIANTS = {"int8": {"bits": 8}, "int4": {"bits": 4, "group_size": 64}}
DRIFT_PROMPTS, DRIFT_LEN = 4, 64  # logits drift of a quantized variant: this many random prompts of this length


@dataclass
class BenchOptions:
    model: str | None = None  # a model directory; None: a random model of `preset`
    preset: str = "small"
    dtype: str = "float32"  # bf16 matmuls are several times slower than fp32 on CPUs without AVX512-BF16/AMX
    threads: int | None = None  # None: leave torch's setting
    batches: list[int] = field(default_factory=lambda: [1, 8])
    prompt_len: int = 512
    decode_tokens: int = 32
    prefill_lens: list[int] = field(default_factory=lambda: [512, 4096])
    compare: str | None = None  # "transformers"
    repeat: int = 3
    seed: int = 0
    bandwidth_mib: int | None = None  # None: 16 x the last-level cache, at least 256 MiB, at most 1 GiB
    quantize: list[str] = field(default_factory=list)  # also decode with these weight-only variants ("int8", "int4")
    compile: bool = False  # also decode through the torch.compile'd decoder (row "compiled")

    def validate(self) -> None:
        for name in ("prompt_len", "decode_tokens", "repeat"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        for name in ("batches", "prefill_lens"):
            values = getattr(self, name)
            if not values or any(v < 1 for v in values):
                raise ValueError(f"{name}: expected positive integers, got {values}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads: expected a positive integer, got {self.threads}")
        if self.compare not in (None, "transformers"):
            raise ValueError(f"compare: expected 'transformers', got {self.compare!r}")
        bad = [q for q in self.quantize if q not in QUANT_VARIANTS]
        if bad:
            raise ValueError(f"quantize: expected some of {sorted(QUANT_VARIANTS)}, got {bad}")

    def check_positions(self, max_positions: int) -> None:
        plans = [measure.DecodePlan(b, self.prompt_len, self.decode_tokens, self.repeat) for b in self.batches]
        longest = max([*self.prefill_lens, *(p.engine_max_len for p in plans)])
        if longest > max_positions:
            raise ValueError(f"prefill_lens / prompt_len: {longest} positions exceed the model's "
                             f"max_position_embeddings ({max_positions})")


# ---- model setup -----------------------------------------------------------------------------------------------------
def random_model(preset: str, dtype: torch.dtype, seed: int) -> Qwen3NextForCausalLM:
    """A preset's architecture with seeded random weights (the init of `Qwen3NextForCausalLM.init_weights`)."""
    model = Qwen3NextForCausalLM(preset_config(preset))
    model.init_weights(torch.Generator().manual_seed(seed))
    return model.to(dtype).eval()


def synthetic_tokenizer(vocab_size: int) -> Tokenizer:
    """A word-level tokenizer with one token per id ("t0", "t1", ...), so the engine can detokenize a random model's
    output; it has no EOS token (generation runs to max_tokens)."""
    import tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size)}
    return Tokenizer(tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0")))


def decode_weight_bytes(config: Qwen3NextConfig, element_size: int) -> int:
    """Weight bytes one batch-1 decode token reads: its embedding row, every non-expert weight of the main model
    (mixers, norms, routers, shared experts and their gates, final norm, lm_head), and top-k of the E routed experts
    in each MoE layer. The MTP head is not run in plain decoding."""
    return (config.parameter_counts()["active"] + config.hidden_size) * element_size


def decode_weight_bytes_of(model: Qwen3NextForCausalLM) -> int:
    """Like `decode_weight_bytes`, but counted from the tensors the model holds, so it also covers quantized models
    (int8/int4 weights with their scales): one embedding row, top-k of E experts, every other parameter and
    buffer of the main model and lm_head in full."""
    from ..model.moe import Experts
    from ..quant.experts import QuantizedExperts

    k, E = model.config.num_experts_per_tok, model.config.num_experts
    total = 0
    for prefix, module in (("model", model.model), ("lm_head", model.lm_head)):
        for name, sub in module.named_modules(prefix=prefix):
            tensors = [*sub.parameters(recurse=False), *sub.buffers(recurse=False)]
            size = sum(t.numel() * t.element_size() for t in tensors)
            if name == "model.embed_tokens":
                size //= model.config.vocab_size
            elif isinstance(sub, (Experts, QuantizedExperts)):
                size = size // E * k
            total += size
    return total


def decode_cache_bytes(config: Qwen3NextConfig, element_size: int, context: int) -> int:
    """Cache traffic of one batch-1 decode token at `context` tokens: DeltaNet conv (model dtype) and recurrent
    (fp32) state read and written, attention K/V of the context read and of the new token written."""
    state = config.state_bytes_per_sequence(element_size, 4)
    return 2 * state + config.kv_bytes_per_token(element_size) * (context + 1)


def describe_machine(threads: int) -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, object] = {
        "cpu": cpu, "logical_cpus": os.cpu_count(), "usable_cpus": affinity,
        "last_level_cache_bytes": measure.last_level_cache_bytes(), "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": threads,
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    return info


def _busy_warning(machine: dict[str, object]) -> str | None:
    """A warning when other work already occupies the CPUs the bench's threads need."""
    load, cpus, threads = machine["load_average"], machine["usable_cpus"], machine["threads"]
    if not load or not cpus or load[0] <= cpus - threads + 0.5:  # 0.5: slack for ourselves starting up
        return None
    return (f"warning: the machine is busy (1-minute load average {load[0]:.1f} on {cpus} CPUs) and {threads} threads "
            "need their own cores: expect noisy timings (a thread that loses its CPU stalls every parallel op)")


# Fixed text for the drift measurement of models that come with a tokenizer (written for this purpose).
DRIFT_TEXTS = (
    "The morning was cold and bright, and the old house at the end of the lane stood quiet while the family gathered "
    "in the parlour to read the letters that had arrived the evening before.",
    "She had not expected him to call so soon, and when he did, she found that she had nothing ready to say.",
    "<|im_start|>user\nWhat is the weather like in Paris today?<|im_end|>\n<|im_start|>assistant\n",
    "A careful reader will notice that every chapter of the book begins with a short account of the weather.",
)


def drift_prompts(tokenizer: Tokenizer | None, vocab_size: int, seed: int) -> list[torch.Tensor]:
    """The fixed prompt set: DRIFT_TEXTS through the model's tokenizer, or DRIFT_PROMPTS random prompts of
    DRIFT_LEN tokens for random-weight models (whose nearly flat logits make top-1 agreement a weak signal)."""
    if tokenizer is not None:
        return [torch.tensor(tokenizer.encode(t)[:DRIFT_LEN]) for t in DRIFT_TEXTS]
    return list(measure.random_prompts(vocab_size, DRIFT_PROMPTS, DRIFT_LEN, seed + 99))


@torch.no_grad()
def logits_drift(reference: Qwen3NextForCausalLM, variant: Qwen3NextForCausalLM,
                 prompts: list[torch.Tensor]) -> dict[str, float]:
    """Logits of `variant` vs `reference` at every position of `prompts`: top-1 agreement, max and mean
    |Δ logit|, and the reference's max |logit| for scale."""
    refs, outs = [], []
    for ids in prompts:
        refs.append(reference(ids[None])[0].float())
        outs.append(variant(ids[None])[0].float())
    ref, out = torch.cat(refs), torch.cat(outs)
    delta = (out - ref).abs()
    return {"top1_agreement": (out.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "max_abs": delta.max().item(), "mean_abs": delta.mean().item(), "ref_max_abs": ref.abs().max().item(),
            "positions": ref.shape[0]}


def load_transformers(model: Qwen3NextForCausalLM, model_dir: str | None, dtype: torch.dtype):
    """transformers' Qwen3NextForCausalLM with the same weights: from `model_dir`, or from a temporary save of
    `model` (our save writes the official checkpoint layout)."""
    try:
        import transformers
    except ImportError:
        raise ValueError("compare: transformers is not installed") from None
    verbosity, bar = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # silence "unused mtp.* weights" and the kernel fallback notices
    transformers.logging.disable_progress_bar()
    try:
        if model_dir is not None:
            return transformers.Qwen3NextForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        with tempfile.TemporaryDirectory(prefix="qwen3next-bench-") as d:
            model.save_pretrained(d)
            return transformers.Qwen3NextForCausalLM.from_pretrained(d, dtype=dtype).eval()
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bar:
            transformers.logging.enable_progress_bar()


# ---- the run ---------------------------------------------------------------------------------------------------------
def _row(impl: str, kind: str, batch: int, tokens: int, seconds: list[float]) -> dict[str, object]:
    s = statistics.median(seconds)
    done = batch * tokens if kind == "prefill" else batch  # tokens processed per call / per decode step
    return {"impl": impl, "kind": kind, "batch": batch, "tokens": tokens, "seconds": seconds, "ms": s * 1e3,
            "tokens_per_s": done / s}


def bench(opts: BenchOptions, log: Callable[[str], None] = lambda msg: None) -> dict[str, object]:
    """Run every measurement `opts` asks for; returns the report (machine, model, bandwidth, measurements, ratios,
    roofline). `log` receives one line per finished measurement."""
    opts.validate()
    dtype = parse_dtype(opts.dtype)
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    threads = torch.get_num_threads()
    machine = describe_machine(threads)
    busy = _busy_warning(machine)
    if busy:
        log(busy)
    if opts.model is not None:
        if not Path(opts.model).is_dir():
            raise ValueError(f"model: {opts.model} is not a model directory")
        model = load_model(opts.model, dtype=dtype)
        has_tokenizer = (Path(opts.model) / "tokenizer.json").is_file()
        tokenizer = Tokenizer.from_dir(opts.model) if has_tokenizer else synthetic_tokenizer(model.config.vocab_size)
        source = opts.model
    else:
        if opts.preset not in PRESETS:
            raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {opts.preset!r}")
        model = random_model(opts.preset, dtype, opts.seed)
        tokenizer, has_tokenizer = synthetic_tokenizer(model.config.vocab_size), False
        source = f"preset {opts.preset} (random weights, seed {opts.seed})"
    config = model.config
    opts.check_positions(config.max_position_embeddings)
    counts = config.parameter_counts()
    elem = torch.empty((), dtype=dtype).element_size()

    llc = machine["last_level_cache_bytes"] or 32 * 1024**2
    bw_bytes = opts.bandwidth_mib * 1024**2 if opts.bandwidth_mib else min(max(16 * llc, 256 * 1024**2), 1024**3)
    bandwidth = measure.measure_bandwidth(bw_bytes)
    log(f"bandwidth: read {bandwidth['read_gb_s']:.1f} GB/s, copy {bandwidth['copy_gb_s']:.1f} GB/s "
        f"({bw_bytes / 1024**2:.0f} MiB buffer, {threads} threads)")

    rows: list[dict[str, object]] = []

    def record(impl: str, kind: str, batch: int, tokens: int, seconds: list[float]) -> None:
        r = _row(impl, kind, batch, tokens, seconds)
        rows.append(r)
        unit = "call" if kind == "prefill" else "step"
        log(f"{kind:<7} {impl:<12} B={batch:<3} T={tokens:<5} {r['ms']:9.2f} ms/{unit}  {r['tokens_per_s']:10.1f} "
            f"tokens/s  (median of {len(seconds)})")

    vocab = config.vocab_size
    plans = [measure.DecodePlan(b, opts.prompt_len, opts.decode_tokens, opts.repeat) for b in opts.batches]
    prefill_ids = {n: measure.random_prompts(vocab, 1, n, opts.seed + n) for n in opts.prefill_lens}
    decode_ids = {p.batch: measure.random_prompts(vocab, p.batch, p.prompt_len, opts.seed + 7 * p.batch)
                  for p in plans}
    # Ours and theirs back to back per measurement, so that a change in machine load hits both alike.
    hf = load_transformers(model, opts.model, dtype) if opts.compare == "transformers" else None
    for n, ids in prefill_ids.items():
        record("ours", "prefill", 1, n, measure.time_prefill_ours(model, ids, 1, opts.repeat))
        if hf is not None:
            record("transformers", "prefill", 1, n, measure.time_prefill_hf(hf, ids, 1, opts.repeat))
    for p in plans:
        ids = decode_ids[p.batch]
        record("ours", "decode", p.batch, p.prompt_len, measure.time_decode_ours(model, ids, p))
        record("engine", "decode", p.batch, p.prompt_len, measure.time_decode_engine(model, tokenizer, ids, p))
        if hf is not None:
            record("transformers", "decode", p.batch, p.prompt_len, measure.time_decode_hf(hf, ids, p))
    del hf
    def time_decodes(impl: str, m: Qwen3NextForCausalLM, compiled: bool = False) -> None:
        """A decode row per plan for model `m`, through a compiled decoder if `compiled` (the plan's warmup steps
        absorb the compiles)."""
        decoder = CompiledDecoder(m) if compiled else None
        for p in plans:
            record(impl, "decode", p.batch, p.prompt_len, measure.time_decode_ours(m, decode_ids[p.batch], p, decoder))

    if opts.compile:
        time_decodes("compiled", model, compiled=True)

    quantized: dict[str, dict[str, object]] = {}
    prompts = drift_prompts(tokenizer if has_tokenizer else None, vocab, opts.seed)
    for name in opts.quantize:
        import copy

        from ..quant.quantize import quantize_model

        variant = quantize_model(copy.deepcopy(model), **QUANT_VARIANTS[name])
        time_decodes(f"ours-{name}", variant)
        if opts.compile:
            time_decodes(f"compiled-{name}", variant, compiled=True)
        quantized[name] = {"weight_bytes_per_token": decode_weight_bytes_of(variant),
                           "drift": logits_drift(model, variant, prompts), **QUANT_VARIANTS[name]}
        d = quantized[name]["drift"]
        log(f"drift   {name}: top-1 agreement {100 * d['top1_agreement']:.1f}% over {d['positions']} positions, "
            f"max |Δ logit| {d['max_abs']:.4f}, mean {d['mean_abs']:.4f} (logits up to {d['ref_max_abs']:.2f})")
        del variant

    weight_bytes = decode_weight_bytes(config, elem)
    ideal = bandwidth["read_gb_s"] * 1e9 / weight_bytes
    roofline: dict[str, object] = {
        "weight_bytes_per_token": weight_bytes, "read_gb_s": bandwidth["read_gb_s"], "ideal_tokens_per_s": ideal,
        "cache_bytes_per_token": decode_cache_bytes(config, elem, opts.prompt_len), "context": opts.prompt_len,
    }
    for r in rows:
        if r["kind"] == "decode" and r["batch"] == 1 and r["impl"] in IMPLS:
            roofline[f"{r['impl']}_tokens_per_s"] = r["tokens_per_s"]
            roofline[f"{r['impl']}_pct"] = 100 * r["tokens_per_s"] / ideal
    float_rows = {(r["impl"], r["batch"]): r for r in rows if r["impl"] in ("ours", "compiled")
                  and r["kind"] == "decode"}
    for name, q in quantized.items():
        q["ideal_tokens_per_s"] = bandwidth["read_gb_s"] * 1e9 / q["weight_bytes_per_token"]
        q["decode"] = []
        for r in rows:
            for mode in ("ours", "compiled"):  # eager variant vs eager float, compiled vs compiled
                if r["impl"] == f"{mode}-{name}":
                    base = float_rows.get((mode, r["batch"]))
                    q["decode"].append({"mode": "eager" if mode == "ours" else "compiled", "batch": r["batch"],
                                        "ms": r["ms"], "tokens_per_s": r["tokens_per_s"],
                                        "vs_float": r["tokens_per_s"] / base["tokens_per_s"] if base else None,
                                        "roofline_pct": 100 * r["tokens_per_s"] / q["ideal_tokens_per_s"]
                                        if r["batch"] == 1 else None})
    machine["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {
        "machine": machine,
        "model": {"source": source, "dtype": opts.dtype, "params_total": counts["total"],
                  "params_active": counts["active"] + config.hidden_size, "layer_types": config.layer_types,
                  "num_experts": config.num_experts, "top_k": config.num_experts_per_tok, "vocab_size": vocab},
        "options": asdict(opts),
        "bandwidth": bandwidth,
        "measurements": rows,
        "ratios": compute_ratios(rows),
        "roofline": roofline,
        "quantized": quantized,
        "drift_prompts": "text" if has_tokenizer else "random",
    }


def compute_ratios(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """ours / transformers (and engine / transformers) tokens/s for every measurement both sides made."""
    theirs = {(r["kind"], r["batch"], r["tokens"]): r for r in rows if r["impl"] == "transformers"}
    out = []
    for r in rows:
        t = theirs.get((r["kind"], r["batch"], r["tokens"]))
        if r["impl"] != "transformers" and t is not None:
            out.append({"impl": r["impl"], "kind": r["kind"], "batch": r["batch"], "tokens": r["tokens"],
                        "tokens_per_s": r["tokens_per_s"], "transformers_tokens_per_s": t["tokens_per_s"],
                        "ratio": r["tokens_per_s"] / t["tokens_per_s"]})
    return out


# ---- printing --------------------------------------------------------------------------------------------------------
def format_report(report: dict[str, object]) -> str:
    m, mod, bw, roof, opts = (report[k] for k in ("machine", "model", "bandwidth", "roofline", "options"))
    llc = f", LLC {m['last_level_cache_bytes'] / 1024**2:.0f} MiB" if m["last_level_cache_bytes"] else ""
    load = " ".join(f"{x:.1f}" for x in m["load_average"]) if m["load_average"] else "n/a"
    if m.get("load_average_end"):
        load += " (end " + " ".join(f"{x:.1f}" for x in m["load_average_end"]) + ")"
    pattern = "".join("A" if t == "full_attention" else "L" for t in mod["layer_types"])
    lines = [
        f"machine    {m['cpu']}, {m['usable_cpus']}/{m['logical_cpus']} usable CPUs{llc}; torch {m['torch']} "
        f"({m['cpu_capability']}), transformers {m['transformers'] or 'not installed'}; {m['threads']} threads; "
        f"load average at start {load}",
        *([f"           {busy}"] if (busy := _busy_warning(m)) else []),
        f"model      {mod['source']}: {mod['dtype']}, {mod['params_total'] / 1e6:.1f}M params, "
        f"{mod['params_active'] / 1e6:.1f}M active per token, layers {pattern}, {mod['num_experts']} experts "
        f"top-{mod['top_k']}, vocab {mod['vocab_size']}",
        f"bandwidth  read {bw['read_gb_s']:.1f} GB/s, copy {bw['copy_gb_s']:.1f} GB/s "
        f"({bw['buffer_bytes'] / 1024**2:.0f} MiB buffer, median of {bw['repeat']})",
        "",
    ]
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in report["measurements"]:
        by_key.setdefault((r["kind"], r["batch"], r["tokens"]), {})[r["impl"]] = r
    present = [impl for impl in IMPLS if any(r["impl"] == impl for r in report["measurements"])]
    names = {"transformers": "hf"}
    header = ["phase", "batch", "tokens"]
    for impl in present:
        header += [f"{names.get(impl, impl)} ms", f"{names.get(impl, impl)} tok/s"]
    ours_impls = [impl for impl in present if impl != "transformers"]
    if "transformers" in present:
        header += [f"{impl}/hf" for impl in ours_impls]
    table = [header]
    for (kind, batch, tokens), impls in by_key.items():
        if not any(impl in impls for impl in present):
            continue
        cells = [kind, str(batch), str(tokens)]
        for impl in present:
            r = impls.get(impl)
            cells += [f"{r['ms']:.2f}", f"{r['tokens_per_s']:.1f}"] if r else ["-", "-"]
        if "transformers" in present:
            t = impls.get("transformers")
            for impl in ours_impls:
                r = impls.get(impl)
                cells.append(f"{r['tokens_per_s'] / t['tokens_per_s']:.2f}x" if r and t else "-")
        table.append(cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    lines += [
        "",
        "ms = per prefill call (batch 1, logits of the last token) or per decode step (B tokens: cached forward + "
        f"greedy argmax); median of {opts['repeat']} repeats, decode {opts['decode_tokens']} steps per repeat after "
        f"a {opts['prompt_len']}-token prompt; engine = Engine.step() (scheduling, sampling, detokenization included)",
        f"decode roofline (batch 1): {roof['weight_bytes_per_token'] / 1e6:.1f} MB of weights per token "
        f"(embedding row + non-expert weights + top-{mod['top_k']} experts + shared experts + lm_head) / "
        f"{roof['read_gb_s']:.1f} GB/s = {roof['ideal_tokens_per_s']:.1f} tokens/s ideal"
        f" (cache traffic not counted: {roof['cache_bytes_per_token'] / 1e6:.2f} MB/token at {roof['context']} tokens)",
    ]
    got = [f"{impl} {roof[impl + '_tokens_per_s']:.1f} tokens/s = {roof[impl + '_pct']:.1f}%"
           for impl in IMPLS if impl + "_pct" in roof]
    if got:
        lines.append("  " + "; ".join(got) + " of ideal")
    for name, q in report.get("quantized", {}).items():
        d = q["drift"]
        source = "fixed text" if report.get("drift_prompts") == "text" else "random tokens"
        lines += ["", f"{name} weights ({q['weight_bytes_per_token'] / 1e6:.1f} MB per batch-1 token, ideal "
                      f"{q['ideal_tokens_per_s']:.1f} tokens/s): drift vs {mod['dtype']} over {d['positions']} "
                      f"positions ({source}): top-1 agreement {100 * d['top1_agreement']:.1f}%, max |Δ logit| "
                      f"{d['max_abs']:.4f}, mean {d['mean_abs']:.4f} (logits up to {d['ref_max_abs']:.2f})"]
        for r in q["decode"]:
            vs = f"{r['vs_float']:.2f}x ours {mod['dtype']} ({r['mode']})" if r["vs_float"] else "-"
            roof_pct = f", {r['roofline_pct']:.1f}% of ideal" if r["roofline_pct"] is not None else ""
            lines.append(f"  decode B={r['batch']} {r['mode']:<8}: {r['ms']:.2f} ms/step, {r['tokens_per_s']:.1f} "
                         f"tokens/s = {vs}{roof_pct}")
    return "\n".join(lines)


# ---- command line ----------------------------------------------------------------------------------------------------
def add_bench_args(parser: argparse.ArgumentParser) -> None:
    d = BenchOptions()
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="model directory to benchmark (default: a random --preset model)")
    src.add_argument("--preset", choices=sorted(PRESETS), default=d.preset,
                     help=f"random model of this architecture (default {d.preset})")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=d.dtype)
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--batch", type=positive_int, nargs="+", default=d.batches, dest="batches",
                        help="decode batch sizes")
    parser.add_argument("--prompt-len", type=positive_int, default=d.prompt_len, help="prompt tokens before decoding")
    parser.add_argument("--decode-tokens", type=positive_int, default=d.decode_tokens, help="decode steps per repeat")
    parser.add_argument("--prefill-lens", type=positive_int, nargs="+", default=d.prefill_lens,
                        help="prompt lengths for the prefill measurement (batch 1)")
    parser.add_argument("--compare", choices=["transformers"], default=None,
                        help="also measure transformers' implementation on the same weights")
    parser.add_argument("--repeat", type=positive_int, default=d.repeat, help="timed repeats (median reported)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--bandwidth-mib", type=positive_int, default=None,
                        help="buffer for the bandwidth measurement (default: 16 x LLC, 256 MiB to 1 GiB)")
    parser.add_argument("--quantize", nargs="+", choices=sorted(QUANT_VARIANTS), default=[],
                        help="also decode with these weight-only quantized variants of the same model (int4: groups "
                             "of 64) and report their logits drift")
    parser.add_argument("--compile", action="store_true",
                        help="also decode through the torch.compile'd decode step (row 'compiled'; compiling takes "
                             "a minute or so and is not timed)")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the full report as JSON")


def run_bench(args: argparse.Namespace) -> int:
    opts = BenchOptions(model=args.model, preset=args.preset, dtype=args.dtype, threads=args.threads,
                        batches=list(args.batches), prompt_len=args.prompt_len, decode_tokens=args.decode_tokens,
                        prefill_lens=list(args.prefill_lens), compare=args.compare, repeat=args.repeat,
                        seed=args.seed, bandwidth_mib=args.bandwidth_mib, quantize=list(args.quantize),
                        compile=args.compile)
    report = bench(opts, log=lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True))
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0
