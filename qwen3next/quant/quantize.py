"""Model-level weight-only quantization: module swaps, the saved format, drift measurement and the CLI command.

`quantize_model(model, bits=8|4)` swaps, in place, every projection `nn.Linear` for `Int8Linear` / `Int4Linear` and
every stacked `Experts` for `QuantizedExperts`. These stay in high precision (as in the official FP8 checkpoint;
they are small, and the router and gates decide which experts run): the router `mlp.gate`,
`mlp.shared_expert_gate`, `linear_attn.in_proj_ba`, the embeddings, every norm, `conv1d`, `A_log`, `dt_bias`.
`lm_head` is quantized to int8 in both schemes unless asked not to (see `quantize_model`). `quantize_module(part,
bits)` makes the same swaps inside a part of a model without recording a config (the MTP head's int8 drafting copy,
engine/runner.py `make_draft_mtp`).

Saved format (our own; transformers does not load it). `config.json` gains
    "quantization_config": {"quant_method": "qwen3next", "bits": 8 | 4, "group_size": G (int4) | null,
                            "modules_not_converted": [name or dotted suffix, ...], "lm_head_bits": 8 | null,
                            "scale_format": "bf16" | "coded8" (int4; absent: bf16),
                            "group_size_overrides": {dotted suffix: G, ...} (int4; absent: none)}
and the safetensors keep the official HF names and layouts of the unquantized checkpoint (per-expert tensors,
interleaved `in_proj_qkvz` rows), with each quantized `<module>.weight` [N, K] replaced by
    int8: `<module>.qweight` int8 [N, K], `<module>.scales` bf16 [N]            w = qweight · scales[:, None]
    int4: `<module>.qweight` uint8 [N, K/2] (column 2j in the low nibble, 2j+1 in the high one),
          `<module>.scales`, `<module>.zeros` bf16 [N, K/G]                       w = (q - 8) · scale + zero
          (scale and zero of column k are those of group k // G)
    int4, "scale_format": "coded8": `<module>.scales` uint8 and `<module>.zeros` int8 [N, K/G] are codes, and
          `<module>.factors` bf16 [N, 2] holds each row's (fs, fz):      scale = scales · fs, zero = zeros · fz
    (quant/linear.py `quantize_int4_coded`: 8-bit codes of the searched grids, 2 bytes per group instead of 4).
    `group_size_overrides` gives some modules their own group size (matched like `modules_not_converted`; the
    routed experts' projections as `<experts>.gate_up_proj` / `<experts>.down_proj`).

e.g. `model.layers.0.mlp.experts.3.gate_proj.qweight`. Which modules are quantized is read from the tensors present
(an int4 checkpoint's int8 `lm_head` is the Linear without `zeros`).

`qwen3next quantize --bits 4` writes coded8 with groups of 32 and groups of 16 for the matrices whose int4 error
moves the logits most (`INT4_SENSITIVE`: DeltaNet's in_proj_qkvz and out_proj, every down projection): on the demo
model that drifts less than llama.cpp's Q4_K_M for fewer bytes per token (README, the drift table).
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import CheckpointError, qkvz_from_hf, qkvz_to_hf
from ..model.moe import Experts
from ..model.qwen3_next import Qwen3NextForCausalLM
from ..progress import progress
from .experts import PROJECTIONS, QuantizedExperts
from .linear import Int4Linear, Int8Linear, quantize_int4_for, quantize_int8

QUANT_METHOD = "qwen3next"
# Kept in high precision, as names or dotted suffixes of module names.
HIGH_PRECISION = ("lm_head", "mlp.gate", "mlp.shared_expert_gate", "linear_attn.in_proj_ba")
_QKVZ = ".linear_attn.in_proj_qkvz"
SCALE_FORMATS = ("bf16", "coded8")
# int4: the matrices given smaller groups by `qwen3next quantize` (dotted suffixes). Measured on the demo model by
# fake quantization (one matrix kind at int4, the rest fp32): in_proj_qkvz moves the logits most (mean KLD 0.00108),
# then out_proj (0.00069) and the experts' down projections (0.00059); attention projections < 0.0001 each.
INT4_SENSITIVE = ("linear_attn.in_proj_qkvz", "linear_attn.out_proj", "down_proj")
# What `qwen3next quantize --bits 4` writes by default, as `quantize_model` arguments (the bench's "int4-mix")
INT4_MIX = {"bits": 4, "group_size": 32, "scale_format": "coded8",
            "group_size_overrides": {p: 16 for p in INT4_SENSITIVE}}


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def _check_bits(bits: int, group_size: int, scale_format: str = "bf16",
                group_size_overrides: dict[str, int] | None = None) -> None:
    if bits not in (8, 4):
        raise ValueError(f"bits: expected 8 or 4, got {bits!r}")
    if bits == 4:
        for what, g in (("group_size", group_size), *((f"group_size_overrides[{k!r}]", v)
                                                     for k, v in (group_size_overrides or {}).items())):
            if not isinstance(g, int) or isinstance(g, bool) or g < 2 or g % 2:
                raise ValueError(f"{what}: expected a positive even integer (e.g. 16, 32, 64), got {g!r}")
    if scale_format not in SCALE_FORMATS:
        raise ValueError(f"scale_format: expected one of {SCALE_FORMATS}, got {scale_format!r}")


def _int4_spec(config: dict, name: str) -> tuple[int, bool]:
    """(group size, coded) of the int4 module `name` under a quantization config."""
    group = config["group_size"]
    for pattern, g in (config.get("group_size_overrides") or {}).items():
        if _matches(name, pattern):
            group = g
    return group, config.get("scale_format", "bf16") == "coded8"


def _experts_group_sizes(config: dict, name: str) -> dict[str, int]:
    return {p: _int4_spec(config, f"{name}.{p}")[0] for p in PROJECTIONS}


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_model(model: Qwen3NextForCausalLM, bits: int, group_size: int = 64,
                   quantize_lm_head: bool = True,
                   row_absmax: dict[str, torch.Tensor] | None = None, scale_format: str = "bf16",
                   group_size_overrides: dict[str, int] | None = None) -> Qwen3NextForCausalLM:
    """Swap the projections and experts of `model` for weight-only int8 (per output channel) or int4 (per group of
    `group_size` input channels) versions, in place; record the scheme in `model.config.quantization_config`.
    `bits=16` is `store_bf16(model)` (bf16 storage, not a quantization scheme).

    `quantize_lm_head` (default yes) also quantizes `lm_head` (never when it is tied to the embedding), always to
    int8: it is the largest matrix a decode step reads, int8 adds almost no drift there, while int4 raised the mean
    logit drift ~25% (demo model). An int4 model thus holds one int8 Linear (recorded as `lm_head_bits: 8`).
    Int4 modules whose input size their group size does not divide stay in high precision
    and are listed in `modules_not_converted`. `row_absmax` (int8, tensor parallelism): per Linear name, the largest
    |w| of each of its whole rows, for a rank holding only part of every row (parallel/engine.py `load_shard`).
    int4 only: `scale_format` "coded8" codes each group's (scale, zero) in 8 bits under per-row factors (half the
    bytes of "bf16" pairs); `group_size_overrides` {dotted suffix: G} gives matching modules their own group size.
    """
    if bits == 16:
        return store_bf16(model)
    targets = _targets(model, bits, group_size, quantize_lm_head, scale_format, group_size_overrides)
    _swap_in(model, progress(targets.modules, desc=f"Quantizing to int{bits}", unit="module"), targets.config,
             row_absmax)
    model.config.quantization_config = targets.config
    return model


def quantize_module(module: nn.Module, bits: int, group_size: int = 64) -> nn.Module:
    """`quantize_model`'s swaps inside a part of a model (e.g. a copy of its MTP head), in place: its projections
    and experts to int8 / int4, the same modules kept in high precision (`HIGH_PRECISION`); nothing is recorded in a
    config. Returns `module`."""
    _check_bits(bits, group_size)
    config = {"quant_method": QUANT_METHOD, "bits": bits, "group_size": group_size if bits == 4 else None}
    _swap_in(module, _convertible(module, bits, config, HIGH_PRECISION)[0], config)
    return module


def _convertible(root: nn.Module, bits: int, config: dict,
                 keep: list[str] | tuple[str, ...]) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """The projections (not matching `keep`) and stacked experts under `root` that `config`'s scheme converts, as
    (name, module) pairs, and the names of the int4 ones whose group size does not divide their input size."""
    modules, skipped = [], []
    for name, module in root.named_modules():
        if isinstance(module, nn.Linear):
            if any(_matches(name, p) for p in keep):
                continue
            fits = bits == 8 or module.in_features % _int4_spec(config, name)[0] == 0
        elif isinstance(module, Experts):
            _, two_i, D = module.gate_up_proj.shape
            groups = _experts_group_sizes(config, name) if bits == 4 else {}
            fits = bits == 8 or not (D % groups["gate_up_proj"] or (two_i // 2) % groups["down_proj"])
        else:
            continue
        if fits:
            modules.append((name, module))
        else:
            skipped.append(name)
    return modules, skipped


def _swap_in(root: nn.Module, modules, config: dict, row_absmax: dict[str, torch.Tensor] | None = None) -> None:
    """Replace each (name, float module) of `modules` under `root` by its quantized version under `config`."""
    with torch.no_grad():
        for name, module in modules:
            new = _empty_quantized(module, name, config).to_empty(device=_device_of(module))
            fill_quantized(new, module, (row_absmax or {}).get(name))
            _set_module(root, name, new)


class _Targets:
    """What `quantize_model` converts: (name, float module) pairs, and the config it records."""

    def __init__(self, modules: list[tuple[str, nn.Module]], config: dict):
        self.modules, self.config = modules, config


def _targets(model: Qwen3NextForCausalLM, bits: int, group_size: int, quantize_lm_head: bool,
             scale_format: str = "bf16", group_size_overrides: dict[str, int] | None = None) -> _Targets:
    _check_bits(bits, group_size, scale_format, group_size_overrides)
    config = {"quant_method": QUANT_METHOD, "bits": bits, "group_size": group_size if bits == 4 else None}
    if bits == 4:
        config.update(scale_format=scale_format, group_size_overrides=dict(group_size_overrides or {}))
    if model.config.quantization_config is not None:
        raise ValueError(f"model: already quantized ({model.config.quantization_config})")
    quantize_lm_head = bool(quantize_lm_head) and not model.config.tie_word_embeddings
    keep = [p for p in HIGH_PRECISION if not (p == "lm_head" and quantize_lm_head)]
    # lm_head, when quantized, is int8 whatever `bits`: taken first, on its own
    converted, skipped = _convertible(model, bits, config, [*keep, "lm_head"])
    modules = [("lm_head", model.lm_head)] if quantize_lm_head else []
    modules += converted
    not_converted = keep + skipped
    config.update(modules_not_converted=not_converted, lm_head_bits=8 if quantize_lm_head else None)
    return _Targets(modules, config)


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _empty_quantized(module: nn.Module, name: str, config: dict) -> nn.Module:
    """The quantized module that replaces float `module` (its buffers uninitialised in effect), on the meta device:
    `lm_head` and int8 Linears -> Int8Linear, int4 Linears -> Int4Linear, Experts -> QuantizedExperts."""
    bits = config["bits"]
    with torch.device("meta"):
        if isinstance(module, Experts):
            E, two_i, D = module.gate_up_proj.shape
            if bits == 8:
                return QuantizedExperts(E, D, two_i // 2, 8)
            return QuantizedExperts(E, D, two_i // 2, 4, config["group_size"], _int4_spec(config, name)[1],
                                    _experts_group_sizes(config, name))
        if module.bias is not None:
            raise ValueError("linear: quantization supports bias-free nn.Linear only (Qwen3-Next has no biases)")
        if bits == 8 or name == "lm_head":
            return Int8Linear(module.in_features, module.out_features)
        return Int4Linear(module.in_features, module.out_features, *_int4_spec(config, name))


def fill_quantized(quantized: nn.Module, module: nn.Module, row_absmax: torch.Tensor | None = None) -> None:
    """Quantize the float weights of `module` (nn.Linear or Experts) into the allocated `quantized` module made for
    it (`Int8Linear.from_linear` / `Int4Linear.from_linear` / `QuantizedExperts.from_experts`, in place)."""
    with torch.no_grad():
        if isinstance(quantized, QuantizedExperts):
            quantized.quantize_from(module)
        elif isinstance(quantized, Int8Linear):
            quantized.load_quantized(*quantize_int8(module.weight, row_absmax))
        else:
            quantized.load_quantized(*quantize_int4_for(module.weight, quantized.group_size, quantized.coded))


def swap_in_empty_quantized(model: Qwen3NextForCausalLM, bits: int, group_size: int = 64,
                            quantize_lm_head: bool = True) -> dict[str, nn.Module]:
    """Quantization while loading (`load_model(..., quantize="int8"|"int4")`), on the meta model before allocation:
    swap in an empty quantized module for every module `quantize_model` would convert, and record the same
    `quantization_config`. Returns {name: the float module taken out (meta)}; the loader allocates and fills one such
    module at a time, then `fill_quantized(model.get_submodule(name), it)`, so the float copy of the model never
    exists whole. Same modules, same tensors as `quantize_model` after loading."""
    targets = _targets(model, bits, group_size, quantize_lm_head)
    for name, module in targets.modules:
        _set_module(model, name, _empty_quantized(module, name, targets.config))
    model.config.quantization_config = targets.config
    return dict(targets.modules)


def store_bf16(model: Qwen3NextForCausalLM) -> Qwen3NextForCausalLM:
    """bf16 STORAGE, fp32 compute, in place: the weights of the projections, the routed experts and (untied)
    `lm_head` are held in bfloat16, everything else (embeddings, norms, router, gates, DeltaNet's conv and decay
    parameters) keeps the model's dtype, and so do activations, states and accumulation.

    Half the bytes a decode step reads, for no loss at all when the checkpoint is bf16 (as Qwen3-Next's is): those
    weights are bf16 values already. Few rows (decode) run through the native kernels, which convert in register
    (`ops.linear`, `ops.moe`: "native_linear", "native_moe"); more rows convert the weight to fp32 per call. Inference
    only (the parameters no longer require grad); saving writes an ordinary bf16 checkpoint."""
    if model.config.quantization_config is not None:
        raise ValueError(f"model: already quantized ({model.config.quantization_config})")
    if model.dtype != torch.float32:
        raise ValueError(f"quantize: bf16 storage computes in fp32 and needs a float32 model (--dtype float32), "
                         f"got {model.dtype}")
    keep = [p for p in HIGH_PRECISION if p != "lm_head" or model.config.tie_word_embeddings]

    def to_bf16(module: nn.Module, name: str) -> None:
        setattr(module, name, nn.Parameter(getattr(module, name).detach().to(torch.bfloat16), requires_grad=False))

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not any(_matches(name, p) for p in keep):
            to_bf16(module, "weight")
        elif isinstance(module, Experts):
            to_bf16(module, "gate_up_proj")
            to_bf16(module, "down_proj")
    return model


def is_quantized_config(quantization_config: dict | None) -> bool:
    """Whether a config's `quantization_config` is ours (another method, e.g. fp8, is not)."""
    return isinstance(quantization_config, dict) and quantization_config.get("quant_method") == QUANT_METHOD


# ---- saving ---------------------------------------------------------------------------------------------------------
def _rows_to_hf(t: torch.Tensor, model: Qwen3NextForCausalLM) -> torch.Tensor:
    # Row-wise quantization commutes with the row interleave of in_proj_qkvz: permute qweight/scales/zeros alike.
    return qkvz_to_hf(t[:, None] if t.ndim == 1 else t, model.config).reshape(t.shape)


def quantized_hf_tensors(model: Qwen3NextForCausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    """The quantized modules' tensors under the saved format's names (see the module docstring)."""
    for name, module in model.named_modules():
        if isinstance(module, (Int8Linear, Int4Linear)):
            for key, t in module.quantized_tensors().items():
                yield f"{name}.{key}", _rows_to_hf(t, model) if name.endswith(_QKVZ) else t
        elif isinstance(module, QuantizedExperts):
            intermediate = module.shapes["gate_up_proj"][0] // 2
            for e in range(module.num_experts):
                for key, t in module.expert_tensors("gate_up_proj", e).items():
                    yield f"{name}.{e}.gate_proj.{key}", t[:intermediate]
                    yield f"{name}.{e}.up_proj.{key}", t[intermediate:]
                for key, t in module.expert_tensors("down_proj", e).items():
                    yield f"{name}.{e}.down_proj.{key}", t


# ---- loading --------------------------------------------------------------------------------------------------------
def _keys(bits: int, coded: bool = False) -> tuple[str, ...]:
    if bits == 8:
        return ("qweight", "scales")
    return ("qweight", "scales", "zeros", "factors") if coded else ("qweight", "scales", "zeros")


def swap_in_quantized(model: Qwen3NextForCausalLM, available: set[str]) -> list[str]:
    """Before allocation: replace every module whose quantized tensors the checkpoint holds (`<name>.qweight`) by an
    empty quantized module (on the model's device, normally meta). Returns the checkpoint tensors they will read."""
    qc = model.config.quantization_config
    if not is_quantized_config(qc):
        raise ValueError(f"quantization_config: expected quant_method {QUANT_METHOD!r}, got {qc!r}")
    bits, group_size = qc.get("bits"), qc.get("group_size")
    _check_bits(bits, group_size, qc.get("scale_format", "bf16"), qc.get("group_size_overrides"))
    sources = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and f"{name}.qweight" in available:
            int8 = bits == 8 or f"{name}.zeros" not in available  # int4 models keep an int8 lm_head
            device = module.weight.device
            with torch.device(device):
                new = (Int8Linear(module.in_features, module.out_features) if int8 else
                       Int4Linear(module.in_features, module.out_features, *_int4_spec(qc, name)))
            sources += [f"{name}.{k}" for k in _keys(8 if int8 else bits, not int8 and new.coded)]
        elif isinstance(module, Experts) and f"{name}.0.gate_proj.qweight" in available:
            E, two_i, D = module.gate_up_proj.shape
            with torch.device(module.gate_up_proj.device):
                new = (QuantizedExperts(E, D, two_i // 2, 8) if bits == 8 else
                       QuantizedExperts(E, D, two_i // 2, 4, group_size, _int4_spec(qc, name)[1],
                                        _experts_group_sizes(qc, name)))
            sources += [f"{name}.{e}.{p}.{k}" for e in range(E) for p in ("gate_proj", "up_proj", "down_proj")
                        for k in _keys(bits, new.coded)]
        else:
            continue
        _set_module(model, name, new)
    return sources


def read_quantized(model: Qwen3NextForCausalLM, read: Callable[[str], torch.Tensor]) -> None:
    """Fill every quantized module of `model` (allocated) from checkpoint tensors; `read(name)` returns one."""
    for name, module in model.named_modules():
        if isinstance(module, (Int8Linear, Int4Linear)):
            int4 = isinstance(module, Int4Linear)
            keys = _keys(4 if int4 else 8, int4 and module.coded)
            tensors = [read(f"{name}.{k}") for k in keys]
            if name.endswith(_QKVZ):
                tensors = [qkvz_from_hf(t[:, None] if t.ndim == 1 else t, model.config).reshape(t.shape)
                           for t in tensors]
            group = module.group_size if int4 else None
            _check_shapes(name, tensors, _saved_shapes(module.out_features, module.in_features, group,
                                                       int4 and module.coded))
            module.load_quantized(*tensors)
        elif isinstance(module, QuantizedExperts):
            keys = _keys(module.bits, module.coded)
            groups = module.group_sizes if module.bits == 4 else {p: None for p in PROJECTIONS}
            for e in range(module.num_experts):
                gate = [read(f"{name}.{e}.gate_proj.{k}") for k in keys]
                up = [read(f"{name}.{e}.up_proj.{k}") for k in keys]
                gate_up = [torch.cat(pair) for pair in zip(gate, up)]
                down = [read(f"{name}.{e}.down_proj.{k}") for k in keys]
                _check_shapes(f"{name}.{e}.gate_proj+up_proj", gate_up,
                              _saved_shapes(*module.shapes["gate_up_proj"], groups["gate_up_proj"], module.coded))
                _check_shapes(f"{name}.{e}.down_proj", down,
                              _saved_shapes(*module.shapes["down_proj"], groups["down_proj"], module.coded))
                module.load_expert("gate_up_proj", e, *gate_up)
                module.load_expert("down_proj", e, *down)


def _saved_shapes(N: int, K: int, group_size: int | None, coded: bool = False) -> dict[str, tuple[int, ...]]:
    """Shapes of the saved tensors of one [N, K] weight (int8 when `group_size` is None)."""
    if group_size is None:
        return {"qweight": (N, K), "scales": (N,)}
    shapes = {"qweight": (N, K // 2), "scales": (N, K // group_size), "zeros": (N, K // group_size)}
    return {**shapes, "factors": (N, 2)} if coded else shapes


def _check_shapes(name: str, got: list[torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    for t, (key, shape) in zip(got, expected.items()):
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{name}.{key}: has shape {list(t.shape)}, the config implies {list(shape)}")


# ---- drift ----------------------------------------------------------------------------------------------------------
def measure_drift(model_ref: Qwen3NextForCausalLM, model_q: Qwen3NextForCausalLM,
                  prompts: list[list[int]]) -> dict[str, float]:
    """Compare next-token logits of two models over prompts (full forward, no cache), all positions.

    Returns positions, top1_agreement (fraction of positions with the same argmax), max_abs_logit_diff,
    mean_abs_logit_diff, mean_kl (KL(ref || q) per position, nats) and ref_logit_std (scale for the diffs).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: expected a non-empty list of non-empty token id lists")
    n = agree = 0
    max_abs = sum_abs = sum_kl = sum_sq = 0.0
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device=model_ref.device)
            a = model_ref(ids)[0].float()  # [T, vocab]
            b = model_q(ids.to(model_q.device))[0].float().to(a.device)
            d = (a - b).abs()
            n += len(p)
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            max_abs = max(max_abs, float(d.max()))
            sum_abs += float(d.mean(-1).sum())
            la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
            sum_kl += float((la.exp() * (la - lb)).sum(-1).sum())
            sum_sq += float(a.var(-1).sum())
    return {"positions": n, "top1_agreement": agree / n, "max_abs_logit_diff": max_abs,
            "mean_abs_logit_diff": sum_abs / n, "mean_kl": sum_kl / n, "ref_logit_std": (sum_sq / n) ** 0.5}


# ---- CLI ------------------------------------------------------------------------------------------------------------
def add_quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF model directory (unquantized)")
    p.add_argument("--out", required=True, help="output directory (config.json, safetensors, tokenizer files)")
    p.add_argument("--bits", type=int, choices=[8, 4], required=True)
    p.add_argument("--group-size", type=int, choices=[16, 32, 64, 128], default=INT4_MIX["group_size"],
                   help="int4 group size (default 32: with coded8 group parameters, 4.5 bits per weight)")
    p.add_argument("--scale-format", choices=list(SCALE_FORMATS), default=INT4_MIX["scale_format"],
                   help="int4 group parameters: coded8 (default; each group's scale and zero as 8-bit codes under "
                        "per-row factors, 2 bytes per group) or bf16 (a bf16 pair, 4 bytes per group)")
    p.add_argument("--sensitive-group-size", type=int, choices=[0, 16, 32, 64],
                   default=INT4_MIX["group_size_overrides"][INT4_SENSITIVE[0]],
                   help="int4 group size of the matrices whose error moves the logits most (DeltaNet in_proj_qkvz "
                        "and out_proj, every down projection); default 16, 0: --group-size everywhere")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="dtype of the modules kept in high precision (default: the checkpoint's)")
    p.add_argument("--quantize-lm-head", action=argparse.BooleanOptionalAction, default=True,
                   help="quantize lm_head too, to int8 whatever --bits says (default: yes)")


def run_quantize(args: argparse.Namespace) -> int:
    """`qwen3next quantize`: load, quantize, save (+ copy tokenizer and other side files)."""
    from ..checkpoint import load_model, save_model

    src, out = Path(args.model), Path(args.out)
    if out.resolve() == src.resolve():
        raise ValueError(f"--out: must differ from --model ({src}); quantizing in place would destroy the original")
    model = load_model(src, dtype=args.dtype)
    overrides = ({p: args.sensitive_group_size for p in INT4_SENSITIVE}
                 if args.bits == 4 and args.sensitive_group_size not in (0, args.group_size) else {})
    quantize_model(model, args.bits, args.group_size, quantize_lm_head=args.quantize_lm_head,
                   scale_format=args.scale_format, group_size_overrides=overrides)
    save_model(model, out)
    weights = ("config.json", "model.safetensors.index.json")
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name not in weights and f.suffix != ".safetensors":
            shutil.copy2(f, out / f.name)
    before = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    after = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    qc = model.config.quantization_config
    detail = "" if args.bits != 4 else (
        f" (group size {qc['group_size']}, {qc['scale_format']} group parameters"
        + (f"; {args.sensitive_group_size} for " + ", ".join(overrides) if overrides else "") + ")")
    print(f"wrote {out}: int{args.bits}" + detail
          + f", {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB of safetensors; kept in high precision: "
          + ", ".join(qc["modules_not_converted"]))
    return 0
