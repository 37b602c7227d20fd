"""`qwen3next bench`: prefill and decode speed of our model, our engine and (optionally) transformers or llama.cpp on
the same weights, plus the machine's memory bandwidth and the batch-1 decode roofline it implies.

`--speculative-config JSON` also measures plain vs MTP speculative decoding of the same model through the engine, in
paired rounds (speculative.py).

`--compare llama.cpp` runs `llama-bench` on GGUF files converted from the same `--model` directory, per precision
(GGUF F32 / BF16 / Q8_0 / Q4_K_M against our float32 model / variants bf16 / int8 / int4) in `--repeat` paired
rounds: each round one timed llama.cpp run, then one of ours, so that a change in machine load hits both.

`--workload multi-turn,shared-system-prompt,cache-miss` instead measures prefix caching on vs off through the engine
(TTFT, prompt tokens computed, hit rate, throughput) in interleaved rounds of fresh engines (prefix.py).

`add_bench_args(parser)` declares the options, `run_bench(args)` runs and prints; `bench(options)` returns the report
as a JSON-ready dict (what `--json` writes).
"""

from __future__ import annotations

import argparse
import copy
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

from ..argtypes import (
    add_hf_overrides_arg,
    add_kv_cache_dtype_arg,
    add_tensor_parallel_arg,
    check_output_paths,
    positive_int,
    speculative_config,
)
from ..checkpoint import load_model, parse_dtype
from ..config import Qwen3NextConfig
from ..engine.compiled import CompiledDecoder
from ..engine.speculative import SpeculativeConfig
from ..model.cache import resolve_kv_cache_dtype
from ..model.qwen3_next import Qwen3NextForCausalLM
from ..ops.hugepages import place_weights
from ..quant.quantize import INT4_MIX
from ..tokenizer import Tokenizer
from ..train.presets import PRESETS, preset_config
from . import ablation, llamacpp, measure
from . import parallel as parallel_bench
from . import prefix as prefix_bench
from . import speculative as spec_bench
from . import structured as structured_bench

IMPLS = ("ours", "engine", "compiled", "transformers")  # compiled: ours through engine.compiled (--compile)
# bf16: weights stored bf16, activations fp32 (quantize_model(bits=16)); a variant this build cannot make is reported
# int4: what --quantize int4 loads (groups of 64, bf16 group parameters); int4-mix: what `qwen3next quantize --bits 4`
# writes (coded groups of 32, and of 16 for the drift-sensitive matrices; quant/quantize.py INT4_MIX)
QUANT_VARIANTS = {"bf16": {"bits": 16}, "int8": {"bits": 8}, "int4": {"bits": 4, "group_size": 64},
                  "int4-mix": INT4_MIX}
COMPARE = ("transformers", "llama.cpp")
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
    compare: str | None = None  # "transformers" or "llama.cpp"
    repeat: int = 3  # timed repeats per measurement; with compare="llama.cpp" also the paired rounds
    seed: int = 0
    bandwidth_mib: int | None = None  # None: 16 x the last-level cache, at least 256 MiB, at most 1 GiB
    quantize: list[str] = field(default_factory=list)  # also decode with these weight-only variants (QUANT_VARIANTS)
    compile: bool = False  # also decode through the torch.compile'd decoder (row "compiled")
    llama_bench: str | None = None  # compare="llama.cpp": the llama-bench executable (None: llama-bench on PATH)
    gguf: dict[str, str] = field(default_factory=dict)  # compare="llama.cpp": GGUF format -> file converted from model
    llama_timeout: float = 600.0  # seconds per llama-bench run
    # also plain vs MTP speculative decoding through the engine (a dict or JSON string is parsed by validate)
    speculative_config: SpeculativeConfig | None = None
    hf_overrides: dict | None = None  # config.json values to change (vLLM's flag), for --model and --preset models
    kv_cache_dtype: str = "auto"  # the K/V cache of our decode rows (the engine's `kv_cache_dtype`)

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
        if self.compare not in (None, *COMPARE):
            raise ValueError(f"compare: expected one of {list(COMPARE)}, got {self.compare!r}")
        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        bad = [q for q in self.quantize if q not in QUANT_VARIANTS]
        if bad:
            raise ValueError(f"quantize: expected some of {sorted(QUANT_VARIANTS)}, got {bad}")
        if self.compare == "llama.cpp":
            self._validate_llama()
        elif self.gguf:
            raise ValueError("gguf: --gguf needs --compare llama.cpp")
        elif self.llama_bench is not None:
            raise ValueError("llama_bench: --llama-bench needs --compare llama.cpp")

    def _validate_llama(self) -> None:
        if self.model is None:
            raise ValueError("compare: llama.cpp needs --model, the HF directory its GGUF files were converted from "
                             "(a random --preset model has no GGUF twin)")
        llamacpp.check_gguf(self.gguf)
        if "F32" in self.gguf and self.dtype != "float32":
            raise ValueError(f"gguf: F32 is measured against our float32 model, but --dtype is {self.dtype}")
        llamacpp.find_llama_bench(self.llama_bench)
        if not self.llama_timeout > 0:
            raise ValueError(f"llama_timeout: expected a positive number of seconds, got {self.llama_timeout}")
        resolve_kv_cache_dtype(self.kv_cache_dtype, torch.float32)

    def variants(self) -> list[str]:
        """The variants to measure: `quantize`, then those a `gguf` format is compared with that it does not name."""
        wanted = [llamacpp.GGUF_VARIANTS.get(f) for f in self.gguf]
        return [*self.quantize, *dict.fromkeys(v for v in wanted if v is not None and v not in self.quantize)]

    def check_positions(self, max_positions: int) -> None:
        plans = [measure.DecodePlan(b, self.prompt_len, self.decode_tokens, self.repeat, self.kv_cache_dtype)
                 for b in self.batches]
        longest = max([*self.prefill_lens, *(p.engine_max_len for p in plans)])
        if longest > max_positions:
            raise ValueError(f"prefill_lens / prompt_len: {longest} positions exceed the model's context "
                             f"({max_positions}: max_position_embeddings, or the YaRN length with --hf-overrides)")


# ---- model setup -----------------------------------------------------------------------------------------------------
def random_model(preset: str, dtype: torch.dtype, seed: int, hf_overrides: dict | None = None) -> Qwen3NextForCausalLM:
    """A preset's architecture (with `hf_overrides` applied) with seeded random weights (the init of
    `Qwen3NextForCausalLM.init_weights`)."""
    return measure.random_weights(preset_config(preset, hf_overrides=hf_overrides), dtype, seed)


def synthetic_tokenizer(vocab_size: int, names: dict[int, str] | None = None) -> Tokenizer:
    """A word-level tokenizer with one token per id ("t0", "t1", ...; `names` spells some ids otherwise, e.g. as
    ChatML specials), so the engine can detokenize a random model's output; it has no EOS token (generation runs to
    max_tokens)."""
    import tokenizers

    names = names or {}
    vocab = {names.get(i, f"t{i}"): i for i in range(vocab_size)}
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


def memory_allocator() -> str:
    """The malloc this process runs on: "tcmalloc" or "jemalloc" when one is loaded (LD_PRELOAD; on this project's
    machines tcmalloc made the demo model's compiled engine decode ~9% faster: torch allocates the step's tensors
    anew every step), else "system" (glibc's, or whatever the platform has)."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "system"
    return next((name for name in ("tcmalloc", "jemalloc") if f"lib{name}" in maps), "system")


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
        "allocator": memory_allocator(),
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


@dataclass
class _Session:
    """What the measurements of one bench run share: options, the float model and its inputs, the finished rows."""

    opts: BenchOptions
    model: Qwen3NextForCausalLM
    tokenizer: Tokenizer
    log: Callable[[str], None]
    plans: list[measure.DecodePlan] = field(init=False)
    prefill_ids: dict[int, torch.Tensor] = field(init=False)
    decode_ids: dict[int, torch.Tensor] = field(init=False)
    rows: list[dict[str, object]] = field(default_factory=list)

    def __post_init__(self) -> None:
        o, vocab = self.opts, self.model.config.vocab_size
        self.plans = [measure.DecodePlan(b, o.prompt_len, o.decode_tokens, o.repeat, o.kv_cache_dtype)
                      for b in o.batches]
        self.prefill_ids = {n: measure.random_prompts(vocab, 1, n, o.seed + n) for n in o.prefill_lens}
        self.decode_ids = {b: measure.random_prompts(vocab, b, o.prompt_len, o.seed + 7 * b)
                           for b in sorted({*o.batches, 1})}  # batch 1 also for the llama.cpp rounds

    def record(self, impl: str, kind: str, batch: int, tokens: int, seconds: list[float]) -> None:
        r = _row(impl, kind, batch, tokens, seconds)
        self.rows.append(r)
        unit = "call" if kind == "prefill" else "step"
        self.log(f"{kind:<7} {impl:<12} B={batch:<3} T={tokens:<5} {r['ms']:9.2f} ms/{unit}  "
                 f"{r['tokens_per_s']:10.1f} tokens/s  (median of {len(seconds)})")

    def time_decodes(self, impl: str, m: Qwen3NextForCausalLM, decoder: CompiledDecoder | None = None) -> None:
        """A decode row per plan for model `m`, through `decoder` if given (the plan's warmup steps absorb the
        compiles)."""
        for p in self.plans:
            self.record(impl, "decode", p.batch, p.prompt_len,
                        measure.time_decode_ours(m, self.decode_ids[p.batch], p, decoder))


def _load(opts: BenchOptions, dtype: torch.dtype) -> tuple[Qwen3NextForCausalLM, Tokenizer, bool, str]:
    """The float model, a tokenizer for the engine, whether that tokenizer is the model's own, and a description."""
    if opts.model is not None:
        if not Path(opts.model).is_dir():
            raise ValueError(f"model: {opts.model} is not a model directory")
        model = load_model(opts.model, dtype=dtype, hf_overrides=opts.hf_overrides)
        place_weights(model)  # as the engine's runner does
        has_tokenizer = (Path(opts.model) / "tokenizer.json").is_file()
        tokenizer = Tokenizer.from_dir(opts.model) if has_tokenizer else synthetic_tokenizer(model.config.vocab_size)
        return model, tokenizer, has_tokenizer, opts.model
    if opts.preset not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {opts.preset!r}")
    model = random_model(opts.preset, dtype, opts.seed, opts.hf_overrides)
    place_weights(model)
    return (model, synthetic_tokenizer(model.config.vocab_size), False,
            f"preset {opts.preset} (random weights, seed {opts.seed})")


def _measure_float(s: _Session) -> None:
    """Prefill and decode rows of the float model: raw forwards, the engine, and transformers if compared. Ours and
    theirs back to back per measurement, so that a change in machine load hits both alike."""
    opts, model = s.opts, s.model
    model_dir = opts.model if opts.hf_overrides is None else None  # else from a save, which has the overrides
    hf = load_transformers(model, model_dir, model.dtype) if opts.compare == "transformers" else None
    for n, ids in s.prefill_ids.items():
        s.record("ours", "prefill", 1, n, measure.time_prefill_ours(model, ids, 1, opts.repeat))
        if hf is not None:
            s.record("transformers", "prefill", 1, n, measure.time_prefill_hf(hf, ids, 1, opts.repeat))
    for p in s.plans:
        ids = s.decode_ids[p.batch]
        s.record("ours", "decode", p.batch, p.prompt_len, measure.time_decode_ours(model, ids, p))
        s.record("engine", "decode", p.batch, p.prompt_len, measure.time_decode_engine(model, s.tokenizer, ids, p))
        if hf is not None:
            s.record("transformers", "decode", p.batch, p.prompt_len, measure.time_decode_hf(hf, ids, p))


def _build_variant(s: _Session, name: str) -> tuple[Qwen3NextForCausalLM | None, dict[str, object]]:
    """A weight-only variant of the float model, or None and its report entry with the error when this build
    cannot make it (a failing variant is reported, not fatal: the other variants and llama.cpp still run)."""
    from ..quant.quantize import quantize_model

    try:
        variant = quantize_model(copy.deepcopy(s.model), **QUANT_VARIANTS[name])
        place_weights(variant)
        return variant, dict(QUANT_VARIANTS[name])
    except ValueError as e:
        s.log(f"error   {name}: cannot build this variant ({e}); skipped")
        return None, {"error": str(e), **QUANT_VARIANTS[name]}


def _measure_variant(s: _Session, name: str, variant: Qwen3NextForCausalLM, decoder: CompiledDecoder | None,
                     prompts: list[torch.Tensor]) -> dict[str, object]:
    """Decode rows of a variant (eager, and compiled with `decoder`), its weight bytes per token and logits drift."""
    s.time_decodes(f"ours-{name}", variant)
    if decoder is not None:
        s.time_decodes(f"compiled-{name}", variant, decoder)
    d = logits_drift(s.model, variant, prompts)
    s.log(f"drift   {name}: top-1 agreement {100 * d['top1_agreement']:.1f}% over {d['positions']} positions, "
          f"max |Δ logit| {d['max_abs']:.4f}, mean {d['mean_abs']:.4f} (logits up to {d['ref_max_abs']:.2f})")
    return {"weight_bytes_per_token": decode_weight_bytes_of(variant), "drift": d, **QUANT_VARIANTS[name]}


def _compare_llama(s: _Session, peer: llamacpp.LlamaBench, fmt: str, m: Qwen3NextForCausalLM | None,
                   decoder: CompiledDecoder | None, ours_bytes: int | None, read_gb_s: float) -> dict[str, object]:
    """Paired rounds for one precision: in each of --repeat rounds llama-bench's decode, then ours (eager, then
    compiled), then llama-bench's prefill, then ours; one timed run per side per round. `m` None: our variant could
    not be built, llama.cpp alone is measured. After a failed llama-bench run of a phase, the later rounds skip it."""
    opts = s.opts
    gguf, R = opts.gguf[fmt], opts.repeat
    plan = measure.DecodePlan(1, opts.prompt_len, opts.decode_tokens, repeat=1, kv_cache_dtype=opts.kv_cache_dtype)
    modes = ["eager", "compiled"] if decoder is not None else ["eager"]
    decode: dict[str, list[float | None]] = {"llama_cpp": [], **{mode: [] for mode in modes}}
    prefill = {n: {"llama_cpp": [], "eager": []} for n in opts.prefill_lens}
    errors: list[str] = []
    info: dict[str, object] = {}

    def peer_run(phase: str, call: Callable[[], object]) -> object | None:
        if any(e.startswith(phase) for e in errors):
            return None
        try:
            return call()
        except llamacpp.LlamaBenchError as e:
            errors.append(f"{phase}: {e}")
            s.log(f"error   llama.cpp {fmt} {phase}: {e}")
            return None

    for r in range(R):
        got = peer_run("decode", lambda: peer.decode(gguf, opts.prompt_len, opts.decode_tokens))
        if got is not None:
            info.update({k: got[k] for k in ("model_type", "model_size", "build_commit") if k in got})
        decode["llama_cpp"].append(llamacpp.tokens_per_s(got) if got is not None else None)
        for mode in modes:
            dec = decoder if mode == "compiled" else None
            sec = measure.time_decode_ours(m, s.decode_ids[1], plan, dec)[0] if m is not None else None
            decode[mode].append(1 / sec if sec else None)
        got = peer_run("prefill", lambda: peer.prefill(gguf, opts.prefill_lens))
        for n, ids in s.prefill_ids.items():
            prefill[n]["llama_cpp"].append(llamacpp.tokens_per_s(got[n]) if got is not None else None)
            sec = measure.time_prefill_ours(m, ids, 1, 1)[0] if m is not None else None
            prefill[n]["eager"].append(n / sec if sec else None)
        s.log(f"llama.cpp {fmt} round {r + 1}/{R}: decode " + llamacpp.round_line(decode, r) + "; " +
              "; ".join(f"prefill {n} " + llamacpp.round_line(p, r) for n, p in prefill.items()))

    sizes = llamacpp.gguf_decode_weight_bytes(gguf)
    ours_ideal = read_gb_s * 1e9 / ours_bytes if ours_bytes else None
    ideal = {"llama_cpp": read_gb_s * 1e9 / sizes["weight_bytes_per_token"], "eager": ours_ideal,
             "compiled": ours_ideal}
    rows = [llamacpp.paired_row("decode", opts.decode_tokens, opts.prompt_len, decode, ideal)]
    rows += [llamacpp.paired_row("prefill", n, 0, p, None) for n, p in prefill.items()]
    variant = llamacpp.GGUF_VARIANTS[fmt] or opts.dtype
    return {"gguf": gguf, "ours": variant, **info, "gguf_file_bytes": sizes["file_bytes"],
            "gguf_tensor_bytes": sizes["tensor_bytes"], "weight_bytes_per_token": sizes["weight_bytes_per_token"],
            "ours_weight_bytes_per_token": ours_bytes, "rows": rows, "errors": errors}


def bench(opts: BenchOptions, log: Callable[[str], None] = lambda msg: None) -> dict[str, object]:
    """Run every measurement `opts` asks for; returns the report (machine, model, bandwidth, measurements, ratios,
    roofline, quantized variants, llama.cpp comparison). `log` receives one line per finished measurement."""
    opts.validate()
    dtype = parse_dtype(opts.dtype)
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    threads = torch.get_num_threads()
    machine = describe_machine(threads)
    busy = _busy_warning(machine)
    if busy:
        log(busy)
    model, tokenizer, has_tokenizer, source = _load(opts, dtype)
    config = model.config
    opts.check_positions(config.max_context_len)
    spec_plan = spec_bench.prepare(opts, model, tokenizer, has_tokenizer) if opts.speculative_config else None
    peer = None
    if opts.compare == "llama.cpp":
        for fmt, path in opts.gguf.items():
            llamacpp.check_gguf_model(fmt, path, config.hidden_size, config.vocab_size)
        peer = llamacpp.LlamaBench(llamacpp.find_llama_bench(opts.llama_bench), threads, opts.llama_timeout)
    counts = config.parameter_counts()
    elem = torch.empty((), dtype=dtype).element_size()

    llc = machine["last_level_cache_bytes"] or 32 * 1024**2
    bw_bytes = opts.bandwidth_mib * 1024**2 if opts.bandwidth_mib else min(max(16 * llc, 256 * 1024**2), 1024**3)
    bandwidth = measure.measure_bandwidth(bw_bytes)
    log(f"bandwidth: read {bandwidth['read_gb_s']:.1f} GB/s, copy {bandwidth['copy_gb_s']:.1f} GB/s "
        f"({bw_bytes / 1024**2:.0f} MiB buffer, {threads} threads)")

    # Per precision: our rows, then (with llama.cpp) the paired rounds against its GGUF twin, while that model is alive.
    s = _Session(opts, model, tokenizer, log)
    read_gb_s, weight_bytes = bandwidth["read_gb_s"], decode_weight_bytes(config, elem)
    gguf_of = {llamacpp.GGUF_VARIANTS[f]: f for f in opts.gguf}  # our variant (None: the float model) -> GGUF format
    llama: dict[str, dict[str, object]] = {}
    _measure_float(s)
    decoder = CompiledDecoder(model) if opts.compile else None
    if decoder is not None:
        s.time_decodes("compiled", model, decoder)
    if peer is not None and None in gguf_of:
        llama[gguf_of[None]] = _compare_llama(s, peer, gguf_of[None], model, decoder, weight_bytes, read_gb_s)
    speculative = spec_bench.measure_speculative(opts, model, tokenizer, spec_plan, log) if spec_plan else None

    quantized: dict[str, dict[str, object]] = {}
    prompts = drift_prompts(tokenizer if has_tokenizer else None, config.vocab_size, opts.seed)
    for name in opts.variants():
        variant, quantized[name] = _build_variant(s, name)
        decoder = CompiledDecoder(variant) if opts.compile and variant is not None else None
        if variant is not None:
            quantized[name] = _measure_variant(s, name, variant, decoder, prompts)
        if peer is not None and name in gguf_of:
            llama[gguf_of[name]] = _compare_llama(s, peer, gguf_of[name], variant, decoder,
                                                  quantized[name].get("weight_bytes_per_token"), read_gb_s)
        del variant, decoder

    roofline = _roofline(s.rows, weight_bytes, read_gb_s, decode_cache_bytes(config, elem, opts.prompt_len),
                         opts.prompt_len)
    _summarize_quantized(quantized, s.rows, read_gb_s)
    machine["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    report = {
        "machine": machine,
        "model": {"source": source, "dtype": opts.dtype, "params_total": counts["total"],
                  "params_active": counts["active"] + config.hidden_size, "layer_types": config.layer_types,
                  "num_experts": config.num_experts, "top_k": config.num_experts_per_tok,
                  "vocab_size": config.vocab_size},
        "options": asdict(opts),
        "bandwidth": bandwidth,
        "measurements": s.rows,
        "ratios": compute_ratios(s.rows),
        "roofline": roofline,
        "quantized": quantized,
        "drift_prompts": "text" if has_tokenizer else "random",
    }
    if speculative is not None:
        report["speculative"] = speculative
    if peer is not None:
        report["llama_cpp"] = {
            "binary": peer.binary, "threads": threads, "rounds": opts.repeat, "context": opts.prompt_len,
            "decode_tokens": opts.decode_tokens, "prefill_lens": opts.prefill_lens, "read_gb_s": read_gb_s,
            "weights_per_token": llamacpp.WEIGHTS_RULE, "formats": llama,
        }
    return report


def _roofline(rows: list[dict[str, object]], weight_bytes: int, read_gb_s: float, cache_bytes: int,
              context: int) -> dict[str, object]:
    """The float model's batch-1 decode roofline and each implementation's share of it."""
    ideal = read_gb_s * 1e9 / weight_bytes
    roofline: dict[str, object] = {"weight_bytes_per_token": weight_bytes, "read_gb_s": read_gb_s,
                                   "ideal_tokens_per_s": ideal, "cache_bytes_per_token": cache_bytes,
                                   "context": context}
    for r in rows:
        if r["kind"] == "decode" and r["batch"] == 1 and r["impl"] in IMPLS:
            roofline[f"{r['impl']}_tokens_per_s"] = r["tokens_per_s"]
            roofline[f"{r['impl']}_pct"] = 100 * r["tokens_per_s"] / ideal
    return roofline


def _summarize_quantized(quantized: dict[str, dict[str, object]], rows: list[dict[str, object]],
                         read_gb_s: float) -> None:
    """Each built variant's ideal tok/s and its decode rows against the float rows (eager vs eager, compiled vs
    compiled), in place."""
    float_rows = {(r["impl"], r["batch"]): r for r in rows if r["impl"] in ("ours", "compiled")
                  and r["kind"] == "decode"}
    for name, q in quantized.items():
        if "error" in q:
            continue
        q["ideal_tokens_per_s"] = read_gb_s * 1e9 / q["weight_bytes_per_token"]
        q["decode"] = []
        for r in rows:
            for mode in ("ours", "compiled"):
                if r["impl"] == f"{mode}-{name}":
                    base = float_rows.get((mode, r["batch"]))
                    q["decode"].append({"mode": "eager" if mode == "ours" else "compiled", "batch": r["batch"],
                                        "ms": r["ms"], "tokens_per_s": r["tokens_per_s"],
                                        "vs_float": r["tokens_per_s"] / base["tokens_per_s"] if base else None,
                                        "roofline_pct": 100 * r["tokens_per_s"] / q["ideal_tokens_per_s"]
                                        if r["batch"] == 1 else None})


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
        f"malloc {m.get('allocator', 'system')}; load average at start {load}",
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
    lines += _aligned(table, left=1)
    lines += [
        "",
        "ms = per prefill call (batch 1, logits of the last token) or per decode step (B tokens: cached forward + "
        f"greedy argmax); median of {opts['repeat']} repeats, decode {opts['decode_tokens']} steps per repeat after "
        f"a {opts['prompt_len']}-token prompt, K/V cache {opts.get('kv_cache_dtype', 'auto')} (auto: the activation "
        "dtype); engine = Engine.step() (scheduling, sampling, detokenization included; "
        "multi-step schedules of up to 8 steps); compiled = greedy runs of up to 8 steps (the engine's multi-step "
        "decoding)",
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
        if "error" in q:
            lines += ["", f"{name} weights: not measured ({q['error']})"]
            continue
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
    if "speculative" in report:
        lines += ["", *spec_bench.format_section(report["speculative"], _aligned)]
    if "llama_cpp" in report:
        lines += ["", *_format_llama(report)]
    return "\n".join(lines)


def _aligned(table: list[list[str]], left: int) -> list[str]:
    """Rows of cells as lines: the first `left` columns left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return ["  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
            for row in table]


def _format_llama(report: dict[str, object]) -> list[str]:
    """The ours-vs-llama.cpp table, one row per precision and phase, and its notes."""
    lc, mod = report["llama_cpp"], report["model"]
    model = Path(mod["source"]).name
    modes = [m for m in ("eager", "compiled") if any(m in r for f in lc["formats"].values() for r in f["rows"])]
    header = ["model", "precision", "phase", "llama.cpp tok/s", *(f"ours {m} tok/s" for m in modes),
              *(f"{m} / llama.cpp (min / median)" for m in modes), f"roofline % (llama.cpp / {' / '.join(modes)})"]
    table = [header]

    def tps(x: float | None) -> str:
        return f"{x:.1f}" if x is not None else "-"

    for fmt, f in lc["formats"].items():
        for r in f["rows"]:
            phase = f"decode @{r['context']}" if r["phase"] == "decode" else f"prefill {r['tokens']}"
            cells = [model, f"{fmt} = {f['ours']}", phase, tps(r["llama_cpp"]["tokens_per_s"])]
            cells += [tps(r[m]["tokens_per_s"]) if m in r else "-" for m in modes]
            for m in modes:
                e = r.get(m, {})
                cells.append(f"{e['ratio_min']:.2f}x / {e['ratio_median']:.2f}x" if e.get("ratio_min") else "-")
            pcts = [r[side].get("roofline_pct") if side in r else None for side in ("llama_cpp", *modes)]
            cells.append(" / ".join(f"{x:.1f}" if x is not None else "-" for x in pcts) if r["phase"] == "decode"
                         else "")
            table.append(cells)
    build = next((f["build_commit"] for f in lc["formats"].values() if "build_commit" in f), "?")
    lines = [f"llama.cpp vs ours ({lc['binary']}, build {build}; {lc['threads']} threads on both sides)",
             *_aligned(table, left=3), "",
             f"{lc['rounds']} paired round{'s' if lc['rounds'] != 1 else ''} per precision (one llama-bench run, "
             "then one of ours); tok/s = median over rounds, ratio = ours / llama.cpp of the same round; "
             f"decode = batch 1, {lc['decode_tokens']} tokens "
             f"after a {lc['context']}-token context; prefill = batch 1, logits of the last token",
             f"roofline = tok/s / (read {lc['read_gb_s']:.1f} GB/s / weight bytes per decode token); "
             + lc["weights_per_token"]]
    for fmt, f in lc["formats"].items():
        ours = f"{f['ours_weight_bytes_per_token'] / 1e6:.1f} MB" if f["ours_weight_bytes_per_token"] else "-"
        lines.append(f"  {fmt}: {f['gguf']} ({f.get('model_type', '?')}, {f['gguf_file_bytes'] / 1e6:.1f} MB file): "
                     f"llama.cpp reads {f['weight_bytes_per_token'] / 1e6:.1f} MB per token, ours ({f['ours']}) {ours}")
        lines += [f"    error: {e}" for e in f["errors"]]
    return lines


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
    parser.add_argument("--compare", choices=list(COMPARE), default=None,
                        help="also measure transformers' implementation on the same weights, or llama.cpp's "
                             "llama-bench on --gguf files converted from --model")
    parser.add_argument("--repeat", type=positive_int, default=d.repeat,
                        help="timed repeats (median reported); with --compare llama.cpp also the number of paired "
                             "rounds (llama.cpp, then ours) per precision")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--bandwidth-mib", type=positive_int, default=None,
                        help="buffer for the bandwidth measurement (default: 16 x LLC, 256 MiB to 1 GiB)")
    parser.add_argument("--quantize", nargs="+", choices=sorted(QUANT_VARIANTS), default=[],
                        help="also decode with these weight-only quantized variants of the same model (int4: groups "
                             "of 64, as --quantize int4 loads; int4-mix: as `qwen3next quantize --bits 4` writes) "
                             "and report their logits drift")
    parser.add_argument("--compile", action="store_true",
                        help="also decode through the compiled decode step (row 'compiled': the ahead-of-time library "
                             "for batches of up to 8, torch.compile above; compiling takes a minute or so and is not "
                             "timed; QWEN3NEXT_AOT=0 measures torch.compile alone)")
    parser.add_argument("--llama-bench", default=None, metavar="PATH",
                        help="--compare llama.cpp: the llama-bench executable (default: llama-bench on PATH)")
    parser.add_argument("--gguf", nargs="+", default=[], metavar="FORMAT=PATH",
                        help="--compare llama.cpp: GGUF files of --model, FORMAT one of "
                             f"{', '.join(llamacpp.GGUF_VARIANTS)}, compared with our float32 model / "
                             f"{' / '.join(v for v in llamacpp.GGUF_VARIANTS.values() if v)} (variants not named by "
                             "--quantize are added)")
    parser.add_argument("--llama-timeout", type=float, default=d.llama_timeout, metavar="SECONDS",
                        help=f"--compare llama.cpp: limit per llama-bench run (default {d.llama_timeout:.0f})")
    parser.add_argument("--speculative-config", type=speculative_config, default=None, metavar="JSON",
                        help='also measure plain vs MTP speculative decoding of the same model through the engine, '
                             'e.g. \'{"method": "mtp", "num_speculative_tokens": 2}\' (greedy, --decode-tokens per '
                             'request, real text prompts when the model has a tokenizer; --repeat paired rounds per '
                             'batch size; eager, and compiled with --compile)')
    add_hf_overrides_arg(parser)
    add_kv_cache_dtype_arg(parser)
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the full report as JSON")
    parser.add_argument("--ablation", choices=ablation.ABLATIONS, default=None,
                        help="instead of the usual measurements: 'attention' runs --preset, its full-attention twin "
                             "and a dense twin at each of --contexts (prefill, decode at batch 1 and 4, cache bytes; "
                             "bench/ablation.py)")
    parser.add_argument("--contexts", type=positive_int, nargs="+", default=None, metavar="TOKENS",
                        help="--ablation: context lengths (default 1024 4096 8192 16384 32768)")
    parser.add_argument("--ablation-models", nargs="+", choices=ablation.MODELS, default=list(ablation.MODELS),
                        metavar="MODEL", help="--ablation: which of the twins to run besides the hybrid (default all)")
    parser.add_argument("--plot", default=None, metavar="PNG",
                        help="--ablation: also plot throughput vs context (needs matplotlib: the [plot] extra)")
    prefix_bench.add_workload_args(parser)
    add_tensor_parallel_arg(parser, help="instead of the usual measurements: N tensor-parallel ranks against one "
                            "process: load peak RSS per rank and decode tok/s, ms per step and time in collectives "
                            "(bench/parallel.py; --batch, --prompt-len, --decode-tokens, --repeat, --threads per rank)")
    parser.add_argument("--structured-output", action="store_true",
                        help="instead of the usual measurements: decode tok/s with a JSON-schema constraint vs "
                             "without at each --batch (--decode-tokens per request, --repeat timed rounds, default 5) "
                             "and grammar compile times (bench/structured.py); needs a model with a tokenizer "
                             "(default: the embedded demo model)")


def _reject_flags(args: argparse.Namespace, mode: str, flags: tuple[str, ...], hint: str) -> None:
    """A ValueError naming those of `flags` given (set off their defaults) with `--mode`, which does not use them."""
    d = BenchOptions()
    given = {"--compare": (args.compare, None), "--quantize": (args.quantize, []), "--compile": (args.compile, False),
             "--speculative-config": (args.speculative_config, None), "--hf-overrides": (args.hf_overrides, None),
             "--batch": (args.batches, d.batches), "--prompt-len": (args.prompt_len, d.prompt_len),
             "--prefill-lens": (args.prefill_lens, d.prefill_lens), "--repeat": (args.repeat, d.repeat),
             "--gguf": (args.gguf, []), "--llama-bench": (args.llama_bench, None),
             "--bandwidth-mib": (args.bandwidth_mib, None), "--contexts": (args.contexts, None),
             "--plot": (args.plot, None), "--kv-cache-dtype": (args.kv_cache_dtype, d.kv_cache_dtype)}
    ignored = [flag for flag in flags if given[flag][0] != given[flag][1]]
    if ignored:
        raise ValueError(f"{mode}: {', '.join(ignored)} do not apply to --{mode} ({hint})")


def _run_ablation(args: argparse.Namespace) -> int:
    if args.model is not None:
        raise ValueError("ablation: --ablation builds its three models from --preset (random weights), not --model")
    _reject_flags(args, "ablation", ("--compare", "--quantize", "--compile", "--speculative-config", "--hf-overrides",
                                     "--batch", "--prompt-len", "--prefill-lens", "--gguf", "--llama-bench",
                                     "--bandwidth-mib", "--kv-cache-dtype"),
                  "it runs --preset and its twins at --contexts, decode at batch 1 and 4")
    check_output_paths(args, "--json", "--plot")
    if args.plot:
        from ..eval.plots import require_matplotlib

        require_matplotlib("--plot")
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = ablation.AblationOptions(preset=args.preset, dtype=args.dtype, repeat=args.repeat, seed=args.seed,
                                    decode_steps=args.decode_tokens, models=tuple(args.ablation_models))
    if args.contexts:
        opts.contexts = list(args.contexts)
    report = ablation.run_ablation(opts, log=_log)
    print(ablation.format_ablation(report))
    if args.json:
        ablation.save_json(report, args.json)
    if args.plot:
        ablation.plot_ablation(report, args.plot)
    return 0


def _run_prefix(args: argparse.Namespace) -> int:
    if args.ablation is not None:
        raise ValueError("workload: --workload and --ablation are separate modes; give one")
    _reject_flags(args, "workload", ("--compare", "--quantize", "--compile", "--speculative-config", "--batch",
                                     "--prompt-len", "--prefill-lens", "--repeat", "--gguf", "--llama-bench",
                                     "--bandwidth-mib", "--contexts", "--plot", "--kv-cache-dtype"),
                  "prefix caching on vs off: --rounds, --turns, --history-tokens, --message-tokens, --requests, "
                  "--system-tokens, --prompt-tokens, --decode-tokens")
    check_output_paths(args, "--json")
    opts = prefix_bench.options_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)

    machine = _machine_for_mode()
    load = BenchOptions(model=args.model, preset=args.preset, dtype=args.dtype, seed=args.seed,
                        hf_overrides=args.hf_overrides)
    model, tokenizer, has_tokenizer, source = _load(load, parse_dtype(args.dtype))
    counts = model.config.parameter_counts()
    report = {"machine": machine,
              "model": {"source": source, "dtype": args.dtype, "params_total": counts["total"],
                        "params_active": counts["active"] + model.config.hidden_size,
                        "vocab_size": model.config.vocab_size},
              "options": {**asdict(opts), "threads": machine["threads"]},
              "prefix": prefix_bench.bench_prefix(opts, model, tokenizer if has_tokenizer else None, _log)}
    machine["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    print(prefix_bench.format_report(report, _aligned))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _machine_for_mode() -> dict[str, object]:
    """The machine description of a bench mode (--workload, --structured-output) at torch's thread count, its busy
    warning logged."""
    machine = describe_machine(torch.get_num_threads())
    machine["busy_warning"] = _busy_warning(machine)
    if machine["busy_warning"]:
        _log(machine["busy_warning"])
    return machine


def _run_structured(args: argparse.Namespace) -> int:
    if args.workload or args.ablation is not None:
        raise ValueError("structured-output: --structured-output, --workload and --ablation are separate modes; "
                         "give one")
    _reject_flags(args, "structured-output", ("--compare", "--quantize", "--compile", "--speculative-config",
                                              "--prompt-len", "--prefill-lens", "--gguf", "--llama-bench",
                                              "--bandwidth-mib", "--contexts", "--plot", "--kv-cache-dtype"),
                  "JSON-constrained vs plain decode: --batch, --decode-tokens, --repeat, --threads, --model")
    check_output_paths(args, "--json")
    from .. import DEFAULT_MODEL

    model_dir = args.model if args.model is not None else str(DEFAULT_MODEL)
    if not (Path(model_dir) / "tokenizer.json").is_file():
        raise ValueError(f"structured-output: constrained decoding needs the model's tokenizer, and {model_dir} "
                         f"has no tokenizer.json (give --model DIR of a model with one; presets have none)")
    if args.threads:
        torch.set_num_threads(args.threads)

    machine = _machine_for_mode()
    load = BenchOptions(model=model_dir, dtype=args.dtype, seed=args.seed, hf_overrides=args.hf_overrides)
    model, tokenizer, _, source = _load(load, parse_dtype(args.dtype))
    d = BenchOptions()
    opts = structured_bench.StructuredBenchOptions(batches=list(args.batches), decode_tokens=args.decode_tokens,
                                                   rounds=args.repeat if args.repeat != d.repeat else 5)
    report = {"machine": machine, "model": {"source": source, "dtype": args.dtype},
              "options": {**asdict(opts), "threads": machine["threads"]},
              "structured_output": structured_bench.bench_structured(opts, model, tokenizer, _log)}
    print("\n".join([f"machine: {machine['threads']} threads; model: {source} ({args.dtype})",
                     *structured_bench.format_section(report["structured_output"], _aligned)]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


def _run_parallel(args: argparse.Namespace) -> int:
    if args.workload or args.ablation is not None or args.structured_output:
        raise ValueError("tensor-parallel-size: --tensor-parallel-size, --structured-output, --workload and "
                         "--ablation are separate modes; give one")
    _reject_flags(args, "tensor-parallel-size", ("--compare", "--quantize", "--compile", "--speculative-config",
                                                 "--prefill-lens", "--gguf", "--llama-bench", "--bandwidth-mib",
                                                 "--contexts", "--plot", "--kv-cache-dtype"),
                  "1 rank vs N ranks: --batch, --prompt-len, --decode-tokens, --repeat, --threads, --model/--preset")
    check_output_paths(args, "--json")

    threads = args.threads or 1
    machine = describe_machine(threads)
    with tempfile.TemporaryDirectory(prefix="qwen3next-tp-") as tmp:
        if args.model is not None and args.hf_overrides is None:  # the ranks read it: no copy in this process
            model_dir, source = str(args.model), str(args.model)
            vocab = Qwen3NextConfig.from_pretrained(args.model).vocab_size
        else:  # a preset, or a model changed by --hf-overrides: written to a directory for the ranks to read
            load = BenchOptions(model=args.model, preset=args.preset, dtype=args.dtype, seed=args.seed,
                                hf_overrides=args.hf_overrides)
            model, _, _, source = _load(load, parse_dtype(args.dtype))
            model_dir = parallel_bench.save_random_model(model, tmp)
            vocab = model.config.vocab_size
            del model
        opts = parallel_bench.ParallelBenchOptions(world=args.tensor_parallel_size, batches=list(args.batches),
                                                   prompt_len=args.prompt_len, decode_tokens=args.decode_tokens,
                                                   rounds=args.repeat, threads=threads, dtype=args.dtype)
        report = {"machine": machine, "model": {"source": source, "dtype": args.dtype},
                  "options": asdict(opts),
                  "tensor_parallel": parallel_bench.bench_parallel(opts, model_dir, vocab, args.seed, _log)}
    print("\n".join([f"machine: {threads} thread(s) per rank; model: {source} ({args.dtype})",
                     *parallel_bench.format_section(report["tensor_parallel"], _aligned)]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


def run_bench(args: argparse.Namespace) -> int:
    if args.tensor_parallel_size > 1:
        return _run_parallel(args)
    if args.structured_output:
        return _run_structured(args)
    if args.workload:
        return _run_prefix(args)
    prefix_bench.check_unused(args)
    if args.ablation is not None:
        return _run_ablation(args)
    if args.contexts is not None or args.plot is not None or list(args.ablation_models) != list(ablation.MODELS):
        raise ValueError("ablation: --contexts, --ablation-models and --plot go with --ablation")
    opts = BenchOptions(model=args.model, preset=args.preset, dtype=args.dtype, threads=args.threads,
                        batches=list(args.batches), prompt_len=args.prompt_len, decode_tokens=args.decode_tokens,
                        prefill_lens=list(args.prefill_lens), compare=args.compare, repeat=args.repeat,
                        seed=args.seed, bandwidth_mib=args.bandwidth_mib, quantize=list(args.quantize),
                        compile=args.compile, llama_bench=args.llama_bench,
                        gguf=llamacpp.parse_gguf_args(args.gguf), llama_timeout=args.llama_timeout,
                        speculative_config=args.speculative_config, hf_overrides=args.hf_overrides,
                        kv_cache_dtype=args.kv_cache_dtype)
    report = bench(opts, log=_log)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0
