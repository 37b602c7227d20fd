"""Qwen3NextConfig: the model's hyper-parameters, read from an HF `config.json`.

Accepts both rope spellings (v4: `rope_theta` + `partial_rotary_factor` + `rope_scaling`; v5: `rope_parameters`)
and both layer-pattern spellings (`layer_types` or `full_attention_interval`). Unknown keys are ignored; impossible
values raise `ValueError` naming the field.

`hf_overrides` (named after vLLM's option) changes the file's values at load. Our rule: objects merge key by key,
recursively, other values (lists included) replace; the rope keys of either spelling merge into one set of rope
parameters, so an override wins whichever spelling the file uses (e.g. `{"rope_scaling": {"rope_type": "yarn",
"factor": 4.0, "original_max_position_embeddings": 262144}}` on a file with v5 `rope_parameters` keeps its
rope_theta). vLLM differs: it sets each top-level key with `setattr`, so a dict value such as `rope_scaling` replaces
the file's whole object (it merges only into nested sub-configs); an override that spells out every key it needs
means the same under both rules. Unlike the file, an override may only name keys this config reads, or HF keys of
this architecture it deliberately ignores (`IGNORED_HF_KEYS`): a typo is an error, not a silent no-op.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LAYER_TYPES = ("linear_attention", "full_attention")
# Top-level keys that carry rope settings (v4 spelling, v5 `rope_parameters`, Phi-3's top-level original length).
ROPE_KEYS = ("rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor",
             "original_max_position_embeddings")
# Keys of a `rope_parameters` / `rope_scaling` object that this config reads (for default and yarn rope).
ROPE_PARAMETER_KEYS = ("rope_type", "type", "rope_theta", "partial_rotary_factor", "factor",
                       "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                       "attention_factor", "truncate")
# HF config keys of this architecture that the model does not use: an override may name them and changes nothing.
IGNORED_HF_KEYS = frozenset({"architectures", "attention_dropout", "use_cache", "use_sliding_window", "sliding_window",
                             "max_window_layers", "transformers_version", "_name_or_path", "output_attentions",
                             "output_hidden_states", "return_dict"})


@dataclass
class RopeConfig:
    theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    rope_type: str = "default"  # "default" or "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclass
class Qwen3NextConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 5120
    num_hidden_layers: int = 48
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int = 256
    hidden_act: str = "silu"
    max_position_embeddings: int = 262144
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    rope: RopeConfig = field(default_factory=RopeConfig)
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    num_experts: int = 512
    num_experts_per_tok: int = 10
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False
    layer_types: list[str] = field(default_factory=list)
    num_nextn_predict_layers: int = 1  # MTP layers; the official config omits the key and ships one
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    quantization_config: dict | None = None

    def __post_init__(self) -> None:
        if not self.layer_types:
            self.layer_types = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention"
                                for i in range(self.num_hidden_layers)]
        self.validate()

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], hf_overrides: dict[str, Any] | None = None) -> Qwen3NextConfig:
        """The config of an HF `config.json` dict, with `hf_overrides` applied first (see `apply_hf_overrides`)."""
        if not isinstance(d, dict):
            raise ValueError(f"config must be a JSON object, got {type(d).__name__}")  # noqa: TRY004 (bad input)
        if hf_overrides is not None:
            d = apply_hf_overrides(d, hf_overrides)
        model_type = d.get("model_type", "qwen3_next")
        if model_type != "qwen3_next":
            raise ValueError(f"model_type: expected 'qwen3_next', got {model_type!r}")
        names = {f.name for f in dataclasses.fields(cls)} - {"rope", "layer_types"}
        kwargs = {k: d[k] for k in names if k in d and d[k] is not None}
        if "dtype" in d and "torch_dtype" not in d and isinstance(d["dtype"], str):
            kwargs["torch_dtype"] = d["dtype"]
        n_layers = kwargs.get("num_hidden_layers", cls.num_hidden_layers)
        if not isinstance(n_layers, int) or isinstance(n_layers, bool) or n_layers < 1:
            raise ValueError(f"num_hidden_layers: expected a positive integer, got {n_layers!r}")
        layer_types = d.get("layer_types")
        if layer_types is None:
            interval = d.get("full_attention_interval")
            interval = 4 if interval is None else interval  # transformers' default
            if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
                raise ValueError(f"full_attention_interval: expected a positive integer, got {interval!r}")
            layer_types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n_layers)]
        if not isinstance(layer_types, list):
            raise ValueError(f"layer_types: expected a list of layer type names, got {layer_types!r}")  # noqa: TRY004
        kwargs["layer_types"] = list(layer_types)
        kwargs["rope"] = _parse_rope(d, kwargs.get("max_position_embeddings", cls.max_position_embeddings))
        mlp_only = kwargs.get("mlp_only_layers", [])
        if not isinstance(mlp_only, list):
            raise ValueError(f"mlp_only_layers: expected a list of layer indices, got {mlp_only!r}")  # noqa: TRY004
        kwargs["mlp_only_layers"] = list(mlp_only)
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, path: str | Path, hf_overrides: dict[str, Any] | None = None) -> Qwen3NextConfig:
        """The config of an HF model directory (or a config.json path), with `hf_overrides` applied."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"{file}: no config.json (expected an HF model directory)")
        try:
            d = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(d, hf_overrides)
        except (TypeError, ValueError) as e:
            msg = str(e)  # a value the overrides made impossible is named with them
            where = f"{file} with hf_overrides" if hf_overrides is not None and not msg.startswith("hf_") else file
            raise ValueError(f"{where}: {msg}") from None

    def to_dict(self) -> dict[str, Any]:
        """The HF `config.json` form (v4 rope spelling plus `rope_parameters`, both understood by transformers)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("rope",)}
        d["model_type"] = "qwen3_next"
        d["architectures"] = ["Qwen3NextForCausalLM"]
        rope_params: dict[str, Any] = {"rope_type": self.rope.rope_type, "rope_theta": self.rope.theta,
                                       "partial_rotary_factor": self.rope.partial_rotary_factor}
        if self.rope.rope_type == "yarn":
            rope_params.update(factor=self.rope.factor, beta_fast=self.rope.beta_fast, beta_slow=self.rope.beta_slow,
                               truncate=self.rope.truncate)
            if self.rope.original_max_position_embeddings is not None:
                rope_params["original_max_position_embeddings"] = self.rope.original_max_position_embeddings
            for k in ("mscale", "mscale_all_dim", "attention_factor"):
                if getattr(self.rope, k) is not None:
                    rope_params[k] = getattr(self.rope, k)
        d["rope_parameters"] = rope_params
        d["rope_theta"] = self.rope.theta
        d["partial_rotary_factor"] = self.rope.partial_rotary_factor
        if self.quantization_config is None:
            d.pop("quantization_config")
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    # ---- validation ---------------------------------------------------------------------------------------------
    def validate(self) -> None:
        positive = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "head_dim", "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
                    "linear_num_key_heads", "linear_num_value_heads", "max_position_embeddings",
                    "decoder_sparse_step"]
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ValueError(f"linear_num_value_heads ({self.linear_num_value_heads}) must be a multiple of "
                             f"linear_num_key_heads ({self.linear_num_key_heads})")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types: has {len(self.layer_types)} entries, num_hidden_layers is "
                             f"{self.num_hidden_layers}")
        for i, t in enumerate(self.layer_types):
            if t not in LAYER_TYPES:
                raise ValueError(f"layer_types[{i}]: unknown layer type {t!r} (expected one of {LAYER_TYPES})")
        for i in self.mlp_only_layers:
            if not isinstance(i, int) or not 0 <= i < self.num_hidden_layers:
                raise ValueError(f"mlp_only_layers: layer index {i!r} outside [0, {self.num_hidden_layers})")
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                     "intermediate_size", "num_nextn_predict_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name}: expected a non-negative integer, got {v!r}")
        if not all(self.is_moe_layer(i) for i in range(self.num_hidden_layers)) and self.intermediate_size < 1:
            raise ValueError(f"intermediate_size: expected a positive integer (the dense MLP layers use it), got "
                             f"{self.intermediate_size}")
        if any(self.is_moe_layer(i) for i in range(self.num_hidden_layers)) or self.num_nextn_predict_layers:
            if self.num_experts < 1:
                raise ValueError(f"num_experts: expected a positive integer, got {self.num_experts!r}")
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ValueError(f"num_experts_per_tok: expected 1..num_experts ({self.num_experts}), got "
                                 f"{self.num_experts_per_tok}")
            if self.moe_intermediate_size < 1:
                raise ValueError(f"moe_intermediate_size: expected a positive integer, got "
                                 f"{self.moe_intermediate_size}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act: only 'silu' is supported, got {self.hidden_act!r}")
        if not 0 < self.rope.partial_rotary_factor <= 1:
            raise ValueError(f"partial_rotary_factor: expected in (0, 1], got {self.rope.partial_rotary_factor}")
        if self.rotary_dim % 2:
            raise ValueError(f"partial_rotary_factor: head_dim * factor = {self.rotary_dim} must be even")
        if self.rope.rope_type not in ("default", "yarn"):
            raise ValueError(f"rope_type: only 'default' and 'yarn' are supported, got {self.rope.rope_type!r}")
        if self.rope.rope_type == "yarn" and self.rope.factor < 1:
            raise ValueError(f"rope_scaling.factor: expected >= 1 for yarn, got {self.rope.factor}")
        if not isinstance(self.rms_norm_eps, (int, float)) or isinstance(self.rms_norm_eps, bool) or \
                not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps: expected > 0, got {self.rms_norm_eps}")

    # ---- derived quantities -------------------------------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rope.partial_rotary_factor)

    @property
    def original_context_len(self) -> int:
        """The context the rope was trained for: YaRN's original_max_position_embeddings, which defaults to
        max_position_embeddings (as in the rope math); max_position_embeddings without scaling."""
        return self.rope.original_max_position_embeddings or self.max_position_embeddings

    @property
    def max_context_len(self) -> int:
        """The longest context this config supports: with YaRN, `original_context_len` x factor (vLLM's rule), never
        less than max_position_embeddings; without, max_position_embeddings."""
        if self.rope.rope_type != "yarn":
            return self.max_position_embeddings
        return max(self.max_position_embeddings, int(self.original_context_len * self.rope.factor))

    def rope_description(self) -> str:
        """The rope setting in a few words for reports and errors: 'YaRN: 262,144 x factor 4' or 'no rope scaling'."""
        if self.rope.rope_type == "yarn":
            return f"YaRN: {self.original_context_len:,} x factor {self.rope.factor:g}"
        return "no rope scaling" if self.rope.rope_type == "default" else f"rope {self.rope.rope_type}"

    def is_moe_layer(self, i: int) -> bool:
        return i not in self.mlp_only_layers and self.num_experts > 0 and (i + 1) % self.decoder_sparse_step == 0

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "full_attention"]

    @property
    def linear_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "linear_attention"]

    @property
    def conv_dim(self) -> int:
        return 2 * self.linear_num_key_heads * self.linear_key_head_dim + \
            self.linear_num_value_heads * self.linear_value_head_dim

    def kv_bytes_per_token(self, dtype_bytes: int = 2, include_mtp: bool = False) -> int:
        n = len(self.attention_layers) + (self.num_nextn_predict_layers if include_mtp else 0)
        return n * 2 * self.num_key_value_heads * self.head_dim * dtype_bytes

    def state_bytes_per_sequence(self, conv_dtype_bytes: int = 2, state_dtype_bytes: int = 4) -> int:
        conv = self.conv_dim * (self.linear_conv_kernel_dim - 1) * conv_dtype_bytes
        rec = self.linear_num_value_heads * self.linear_key_head_dim * self.linear_value_head_dim * state_dtype_bytes
        return len(self.linear_layers) * (conv + rec)

    def parameter_counts(self) -> dict[str, int]:
        """Total and per-token-active parameter counts, from the config alone.

        "active" counts, of each MoE layer, the router, the top-k routed experts and the shared expert, and the LM
        head but not the embedding (a gather, not a matmul); the MTP layers are counted apart. For the official
        80B-A3B config: 79,674,391,296 total (81,324,862,720 with MTP, the checkpoint's size), 3,563,764,480 active."""
        D = self.hidden_size
        key_dim = self.linear_num_key_heads * self.linear_key_head_dim
        value_dim = self.linear_num_value_heads * self.linear_value_head_dim
        linear = D * (2 * key_dim + 2 * value_dim) + D * 2 * self.linear_num_value_heads + \
            self.conv_dim * self.linear_conv_kernel_dim + 2 * self.linear_num_value_heads + \
            self.linear_value_head_dim + value_dim * D
        q_out = self.num_attention_heads * self.head_dim
        attn = D * 2 * q_out + 2 * D * self.num_key_value_heads * self.head_dim + q_out * D + 2 * self.head_dim
        expert = 3 * D * self.moe_intermediate_size
        shared = 3 * D * self.shared_expert_intermediate_size + (D if self.shared_expert_intermediate_size else 0)
        moe_total = self.num_experts * expert + self.num_experts * D + shared
        moe_active = self.num_experts_per_tok * expert + self.num_experts * D + shared
        dense = 3 * D * self.intermediate_size
        total = active = 0
        for i, t in enumerate(self.layer_types):
            mixer = attn if t == "full_attention" else linear
            ffn_t, ffn_a = (moe_total, moe_active) if self.is_moe_layer(i) else (dense, dense)
            total += mixer + ffn_t + 2 * D
            active += mixer + ffn_a + 2 * D
        embed = self.vocab_size * D
        head = 0 if self.tie_word_embeddings else embed
        total += embed + head + D
        active += embed + D  # the embedding is a gather, the head a matmul (with the same matrix when tied)
        mtp = self.num_nextn_predict_layers * (2 * D * D + 3 * D + attn + moe_total + 2 * D)
        mtp_active = self.num_nextn_predict_layers * (2 * D * D + 3 * D + attn + moe_active + 2 * D)
        return {"total": total, "active": active, "embedding": embed, "mtp": mtp, "mtp_active": mtp_active,
                "total_with_mtp": total + mtp}


def apply_hf_overrides(d: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`d` (a config.json dict) with `overrides` applied by our rule: objects merge key by key, recursively, other
    values (lists included) replace. (vLLM's `hf_overrides` replaces a top-level dict value such as `rope_scaling`
    whole and merges only into nested sub-configs; see the module docstring.) Rope keys of either spelling
    (`ROPE_KEYS`) first fold into one `rope_parameters` object on each side, so the override wins whichever spelling
    the file uses; `"rope_scaling": null` (or `"rope_parameters": null`) turns scaling off (default rope, same theta).

    Keys must be ones this config reads or `IGNORED_HF_KEYS` (accepted, no effect); anything else, at the top level
    or inside a rope object, is a ValueError naming it (`check_hf_overrides`). Neither argument is modified."""
    check_hf_overrides(overrides)
    merged = _merge(d, {k: v for k, v in overrides.items() if k not in ROPE_KEYS})
    if any(k in overrides for k in ROPE_KEYS):
        rope = _merge(_rope_parameters(d), _rope_parameters(overrides))
        for k in ROPE_KEYS:
            merged.pop(k, None)
        merged["rope_parameters"] = rope
    return merged


def check_hf_overrides(overrides: Any) -> None:
    """ValueError (starting 'hf_overrides:') unless `overrides` is a dict whose keys this config reads or ignores
    knowingly, with rope objects (or null) of known rope parameters. Values are checked when the config is built."""
    if not isinstance(overrides, dict):
        raise ValueError(f"hf_overrides: expected a JSON object of config.json keys, got {overrides!r}")  # noqa: TRY004
    known = {f.name for f in dataclasses.fields(Qwen3NextConfig)} - {"rope"}
    known |= {*ROPE_KEYS, "full_attention_interval", "dtype", "model_type", *IGNORED_HF_KEYS}
    unknown = sorted(k for k in overrides if k not in known)
    if unknown:
        raise ValueError(f"hf_overrides: unknown config key {unknown[0]!r} (a Qwen3-Next config.json key is expected, "
                         f"e.g. rope_scaling, rope_parameters, max_position_embeddings)")
    for key in ("rope_parameters", "rope_scaling"):
        value = overrides.get(key)
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"hf_overrides: {key}: expected an object or null, got {value!r}")
        bad = sorted(k for k in (value or {}) if k not in ROPE_PARAMETER_KEYS)
        if bad:
            raise ValueError(f"hf_overrides: {key}.{bad[0]}: unknown rope parameter (known: "
                             f"{', '.join(ROPE_PARAMETER_KEYS)})")


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _rope_parameters(d: dict[str, Any]) -> dict[str, Any]:
    """The rope keys of a config (or override) dict as ONE v5 `rope_parameters` object (what `_parse_rope` reads),
    with this precedence: `rope_parameters`, then the v4 keys; a top-level original_max_position_embeddings (Phi-3
    style) wins over both, as in transformers. A null `rope_scaling` / `rope_parameters` means the default rope type
    unless the other names one."""
    params, scaling = d.get("rope_parameters"), d.get("rope_scaling")
    src: dict[str, Any] = dict(params) if isinstance(params, dict) else {}
    for k in ("rope_theta", "partial_rotary_factor"):
        if d.get(k) is not None:
            src.setdefault(k, d[k])
    if isinstance(scaling, dict):
        for k, v in scaling.items():
            src.setdefault(k, v)
        if "type" in scaling and "rope_type" not in scaling:
            src["rope_type"] = scaling["type"]
    if "type" in src:  # v4's name of rope_type
        src.setdefault("rope_type", src.pop("type"))
    if ("rope_parameters" in d and params is None) or ("rope_scaling" in d and scaling is None):
        src.setdefault("rope_type", "default")
    if d.get("original_max_position_embeddings") is not None:
        src["original_max_position_embeddings"] = d["original_max_position_embeddings"]
    return src


def _parse_rope(d: dict[str, Any], max_position_embeddings: int) -> RopeConfig:
    scaling = d.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling: expected an object or null, got {scaling!r}")
    src = _rope_parameters(d)  # one set of rope parameters, whichever spelling (see its precedence)
    rope = RopeConfig()
    rope.theta = _rope_number(src, "rope_theta", rope.theta)
    rope.partial_rotary_factor = _rope_number(src, "partial_rotary_factor", rope.partial_rotary_factor)
    rope.rope_type = str(src.get("rope_type", "default"))
    if rope.rope_type == "yarn":
        original = _rope_number(src, "original_max_position_embeddings", None)
        if original is not None:
            if original < 1 or original != int(original):
                raise ValueError(f"original_max_position_embeddings: expected a positive integer, got {original:g}")
            rope.original_max_position_embeddings = int(original)
        factor = _rope_number(src, "factor", None)
        if factor is None:  # transformers derives it from the two context lengths
            factor = max_position_embeddings / original if original else 1.0
        rope.factor = factor
        rope.beta_fast = _rope_number(src, "beta_fast", None) or 32.0
        rope.beta_slow = _rope_number(src, "beta_slow", None) or 1.0
        for k in ("mscale", "mscale_all_dim", "attention_factor"):
            setattr(rope, k, _rope_number(src, k, None))
        rope.truncate = bool(src.get("truncate", True))
    if not math.isfinite(rope.theta) or rope.theta <= 0:
        raise ValueError(f"rope_theta: expected a positive number, got {rope.theta}")
    return rope


def _rope_number(src: dict[str, Any], key: str, default: float | None) -> float | None:
    v = src.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"rope_parameters.{key}: expected a number, got {v!r}")
    return float(v)
