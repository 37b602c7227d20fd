"""HF checkpoint directory <-> model.

Loading streams tensor by tensor from memory-mapped safetensors into parameters allocated once in the target dtype,
so peak memory stays near one copy of the model. All layout adaptation happens here, once (DESIGN principle 3):

| checkpoint (HF)                                            | model parameter                          |
|------------------------------------------------------------|------------------------------------------|
| `*.mlp.experts.{e}.{gate,up}_proj.weight` (official)        | `*.mlp.experts.gate_up_proj[e]` [2I, D]  |
| `*.mlp.experts.{e}.down_proj.weight` (official)             | `*.mlp.experts.down_proj[e]` [D, I]      |
| `*.mlp.experts.gate_up_proj` / `down_proj` (transformers v5) | same names, copied as is                 |
| `*.linear_attn.in_proj_qkvz.weight` per-group [q|k|v..|z..] | rows reordered to [all q|all k|all v|all z] |
| `*.linear_attn.in_proj_ba.weight` per-group [b..|a..]       | rows reordered to [all b|all a]          |
| `mtp.*`                                                    | the MTP head (never dropped)             |

Saving writes the official layout (per-expert names, interleaved projections) that transformers loads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import Qwen3NextConfig
from .model.qwen3_next import Qwen3NextForCausalLM

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded: the message names the file and tensor."""


def parse_dtype(dtype: torch.dtype | str | None, default: str = "bfloat16") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = default if dtype is None else dtype
    if name not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


# ---- layout conversions (pure functions on tensors) -----------------------------------------------------------------
def _groups(config: Qwen3NextConfig) -> tuple[int, int, int, int]:
    return (config.linear_num_key_heads, config.linear_num_value_heads // config.linear_num_key_heads,
            config.linear_key_head_dim, config.linear_value_head_dim)


def qkvz_from_hf(w: torch.Tensor, config: Qwen3NextConfig) -> torch.Tensor:
    H, r, K, V = _groups(config)
    g = w.reshape(H, 2 * K + 2 * r * V, -1)
    q, k, v, z = g.split([K, K, r * V, r * V], dim=1)
    return torch.cat([t.reshape(-1, w.shape[-1]) for t in (q, k, v, z)])


def qkvz_to_hf(w: torch.Tensor, config: Qwen3NextConfig) -> torch.Tensor:
    H, r, K, V = _groups(config)
    q, k, v, z = w.split([H * K, H * K, H * r * V, H * r * V])
    parts = [q.reshape(H, K, -1), k.reshape(H, K, -1), v.reshape(H, r * V, -1), z.reshape(H, r * V, -1)]
    return torch.cat(parts, dim=1).reshape(w.shape)


def ba_from_hf(w: torch.Tensor, config: Qwen3NextConfig) -> torch.Tensor:
    H, r, _, _ = _groups(config)
    b, a = w.reshape(H, 2 * r, -1).split([r, r], dim=1)
    return torch.cat([b.reshape(H * r, -1), a.reshape(H * r, -1)])


def ba_to_hf(w: torch.Tensor, config: Qwen3NextConfig) -> torch.Tensor:
    H, r, _, _ = _groups(config)
    b, a = w.split([H * r, H * r])
    return torch.cat([b.reshape(H, r, -1), a.reshape(H, r, -1)], dim=1).reshape(w.shape)


# ---- reading --------------------------------------------------------------------------------------------------------
class _TensorIndex:
    """name -> file over a directory's safetensors files, with lazy, memory-mapped reads."""

    def __init__(self, path: Path):
        self.path = path
        self._handles: dict[Path, object] = {}
        index_file = path / "model.safetensors.index.json"
        if index_file.exists():
            try:
                weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_file}: not a valid safetensors index ({e})") from None
            self.files = {name: path / f for name, f in weight_map.items()}
            for f in set(self.files.values()):
                if not f.exists():
                    raise CheckpointError(f"{f}: listed in {index_file.name} but missing")
        else:
            shards = sorted(path.glob("*.safetensors"))
            if not shards:
                raise CheckpointError(f"{path}: no model.safetensors, index or *.safetensors files")
            self.files = {}
            for f in shards:
                for name in self._open(f).keys():
                    self.files[name] = f

    def _open(self, f: Path):
        if f not in self._handles:
            try:
                self._handles[f] = safe_open(str(f), framework="pt")
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{f}: cannot read safetensors file ({e})") from None
        return self._handles[f]

    def names(self) -> set[str]:
        return set(self.files)

    def get(self, name: str) -> torch.Tensor:
        f = self.files[name]
        h = self._open(f)
        try:
            return h.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{f}: tensor {name!r} cannot be read ({e}); the file may be truncated or "
                                  f"corrupt") from None

    def shape(self, name: str) -> list[int]:
        f = self.files[name]
        try:
            return list(self._open(f).get_slice(name).get_shape())
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{f}: tensor {name!r} cannot be read ({e})") from None


_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def _plan_sources(param_names: list[str], available: set[str]) -> tuple[dict[str, list[tuple[str, ...]]], set[str]]:
    """For each parameter, the checkpoint tensors it is built from; returns (plan, used names)."""
    expert_sources: dict[str, dict[int, set[str]]] = {}
    for name in available:
        m = _EXPERT.match(name)
        if m:
            expert_sources.setdefault(m.group(1), {}).setdefault(int(m.group(2)), set()).add(m.group(3))
    plan: dict[str, list[tuple[str, ...]]] = {}
    used: set[str] = set()
    for p in param_names:
        if p in available:
            plan[p] = [(p,)]
            used.add(p)
            continue
        m = re.match(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$", p)
        if m and m.group(1) in expert_sources:
            prefix, kind = m.groups()
            srcs = []
            for e in sorted(expert_sources[prefix]):
                if kind == "gate_up_proj":
                    names = (f"{prefix}.{e}.gate_proj.weight", f"{prefix}.{e}.up_proj.weight")
                else:
                    names = (f"{prefix}.{e}.down_proj.weight",)
                srcs.append(names)
            plan[p] = srcs
            used.update(n for names in srcs for n in names if n in available)
    return plan, used


def load_model(path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu",
               strict: bool = True) -> Qwen3NextForCausalLM:
    """Load an HF Qwen3-Next directory (single or sharded safetensors, either expert layout, with `mtp.*`)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected an HF model directory with config.json)")
    config = Qwen3NextConfig.from_pretrained(path)
    index = _TensorIndex(path)
    available = index.names()
    if config.num_nextn_predict_layers > 0 and not any(n.startswith("mtp.") for n in available):
        config.num_nextn_predict_layers = 0  # a checkpoint without MTP weights (e.g. saved by transformers)
    dtype = parse_dtype(dtype, config.torch_dtype if config.torch_dtype in DTYPES else "bfloat16")
    with torch.device("meta"):
        model = Qwen3NextForCausalLM(config)
    model = model.to_empty(device=device).to(dtype)
    # recompute non-persistent buffers destroyed by to_empty
    from .ops.rope import rope_inv_freq

    inv_freq, _ = rope_inv_freq(config.rope, config.rotary_dim, config.max_position_embeddings)
    model.rope_inv_freq = inv_freq.to(device)

    params = dict(model.named_parameters())
    tied = config.tie_word_embeddings
    names = [n for n in params if not (tied and n == "lm_head.weight")]
    plan, used = _plan_sources(names, available)
    missing = [n for n in names if n not in plan]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing from the checkpoint, e.g. "
                              f"{', '.join(missing[:5])}")
    extra = sorted(available - used)
    if extra and strict:
        raise CheckpointError(f"{path}: {len(extra)} unexpected tensor(s) in the checkpoint, e.g. "
                              f"{', '.join(f'{n} ({index.files[n].name})' for n in extra[:5])}")

    converters: list[tuple[str, Callable]] = [(".linear_attn.in_proj_qkvz.weight", qkvz_from_hf),
                                              (".linear_attn.in_proj_ba.weight", ba_from_hf)]
    with torch.no_grad():
        for name in names:
            param = params[name]
            sources = plan[name]
            if len(sources) == 1 and len(sources[0]) == 1 and sources[0][0] == name:
                t = _checked(index, name, tuple(param.shape))
                for suffix, fn in converters:
                    if name.endswith(suffix):
                        t = fn(t, config)
                param.copy_(t)
                continue
            # stacked experts from per-expert tensors
            if len(sources) != param.shape[0]:
                raise CheckpointError(f"{path}: {name} needs {param.shape[0]} experts, the checkpoint has "
                                      f"{len(sources)}")
            for e, names_e in enumerate(sources):
                if len(names_e) == 2:
                    half = param.shape[1] // 2
                    param[e, :half].copy_(_checked(index, names_e[0], (half, param.shape[2])))
                    param[e, half:].copy_(_checked(index, names_e[1], (half, param.shape[2])))
                else:
                    param[e].copy_(_checked(index, names_e[0], tuple(param.shape[1:])))
    model.eval()
    return model


def _checked(index: _TensorIndex, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if name not in index.files:
        raise CheckpointError(f"{index.path}: tensor {name!r} missing from the checkpoint")
    got = tuple(index.shape(name))
    if got != shape:
        raise CheckpointError(f"{index.files[name]}: tensor {name!r} has shape {list(got)}, the config implies "
                              f"{list(shape)}")
    return index.get(name)


# ---- writing --------------------------------------------------------------------------------------------------------
def hf_tensors(model: Qwen3NextForCausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights under official HF names and layouts (per-expert tensors, interleaved projections)."""
    config = model.config
    for name, p in model.named_parameters():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        t = p.detach()
        if name.endswith(".linear_attn.in_proj_qkvz.weight"):
            yield name, qkvz_to_hf(t, config)
        elif name.endswith(".linear_attn.in_proj_ba.weight"):
            yield name, ba_to_hf(t, config)
        elif name.endswith(".mlp.experts.gate_up_proj"):
            prefix = name[: -len(".gate_up_proj")]
            half = t.shape[1] // 2
            for e in range(t.shape[0]):
                yield f"{prefix}.{e}.gate_proj.weight", t[e, :half]
                yield f"{prefix}.{e}.up_proj.weight", t[e, half:]
        elif name.endswith(".mlp.experts.down_proj"):
            prefix = name[: -len(".down_proj")]
            for e in range(t.shape[0]):
                yield f"{prefix}.{e}.down_proj.weight", t[e]
        else:
            yield name, t


def save_model(model: Qwen3NextForCausalLM, path: str | Path, max_shard_bytes: int = 2 * 1024**3) -> None:
    """Write config.json and (sharded) safetensors in the official HF layout."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    d = config.to_dict()
    d["torch_dtype"] = {v: k for k, v in DTYPES.items() if k in ("float32", "bfloat16", "float16")}[model.dtype]
    (path / "config.json").write_text(json.dumps(d, indent=2) + "\n", encoding="utf-8")
    for old in path.glob("model*.safetensors"):
        old.unlink()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in hf_tensors(model):
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    index_file = path / "model.safetensors.index.json"
    if len(shards) == 1:
        _save(shards[0], path / "model.safetensors")
        if index_file.exists():
            index_file.unlink()
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _save(shard, path / fname)
        for n, t in shard.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    index_file.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _save(tensors: dict[str, torch.Tensor], file: Path) -> None:
    # safetensors refuses tensors that share storage (expert slices of one parameter): give each its own.
    owned = {n: t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t
             for n, t in tensors.items()}
    save_file(owned, str(file), metadata={"format": "pt"})
