"""HF checkpoint directory <-> model.

Loading reads the safetensors files tensor by tensor (plain reads, no memory map) into parameters allocated once in
the target dtype, so peak memory stays near one copy of the model. All layout adaptation happens here, once, so the
model code only ever sees its own layout:

| checkpoint (HF)                                            | model parameter                          |
|------------------------------------------------------------|------------------------------------------|
| `*.mlp.experts.{e}.{gate,up}_proj.weight` (official)        | `*.mlp.experts.gate_up_proj[e]` [2I, D]  |
| `*.mlp.experts.{e}.down_proj.weight` (official)             | `*.mlp.experts.down_proj[e]` [D, I]      |
| `*.mlp.experts.gate_up_proj` / `down_proj` (transformers v5) | same names, copied as is                 |
| `*.linear_attn.in_proj_qkvz.weight` per-group [q|k|v..|z..] | rows reordered to [all q|all k|all v|all z] |
| `*.linear_attn.in_proj_ba.weight` per-group [b..|a..]       | rows reordered to [all b|all a]          |
| `mtp.*`                                                    | the MTP head (absent: no MTP head)       |
| FP8: `X.weight` float8_e4m3fn + `X.weight_scale_inv` blocks | `X.weight` dequantized to the dtype      |

Saving writes the official layout (per-expert names, interleaved projections) that transformers loads.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors.torch import save_file
from torch import nn

from .argtypes import QUANTIZE_BITS
from .config import Qwen3NextConfig
from .model.moe import Experts, SparseMoE
from .model.qwen3_next import Qwen3NextForCausalLM
from .progress import progress

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


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
# safetensors: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then the data.
# We read it with plain file reads instead of a memory map: touched pages of a mapped file count as resident memory
# until it is unmapped, which would double the peak while loading a single-file checkpoint.
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_MAX_HEADER = 100 * 1024**2  # the format's own limit


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def _read_header(file: Path) -> dict[str, _Entry]:
    """Tensor name -> location for one safetensors file, checked against the file's size."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{file}: not a safetensors file (only {size} bytes)")
            n = int.from_bytes(head, "little")
            if n < 2 or n > min(size - 8, _MAX_HEADER):
                raise CheckpointError(f"{file}: not a safetensors file or its header is corrupt (header length field "
                                      f"{n}, file size {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (expected a JSON object)")
    base = 8 + n
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = info["dtype"], tuple(int(x) for x in info["shape"]), info["data_offsets"]
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: tensor {name!r} has a malformed header entry {info!r}") from None
        if dtype_name not in _ST_DTYPES:
            raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {dtype_name!r}")
        dtype = _ST_DTYPES[dtype_name]
        nbytes = math.prod(shape) * dtype.itemsize
        if begin < 0 or end - begin != nbytes or any(x < 0 for x in shape):
            raise CheckpointError(f"{file}: tensor {name!r} has inconsistent header (shape {list(shape)} {dtype_name} "
                                  f"is {nbytes} bytes, data_offsets {[begin, end]})")
        if base + end > size:
            raise CheckpointError(f"{file}: tensor {name!r} ends at byte {base + end} but the file has only {size} "
                                  f"bytes; the file is truncated")
        entries[name] = _Entry(file, dtype, shape, base + begin, base + end)
    return entries


class _TensorIndex:
    """name -> location over a directory's safetensors files (index-driven when an index exists)."""

    def __init__(self, path: Path):
        self.path = path
        self._handles: dict[Path, BinaryIO] = {}
        self.entries: dict[str, _Entry] = {}
        # FP8 weights, dequantized as they are read: weight name -> (its `weight_scale_inv`, block size); _setup_fp8
        self.fp8: dict[str, tuple[str, tuple[int, int]]] = {}
        index_file = path / "model.safetensors.index.json"
        if index_file.exists():
            try:
                weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_file}: not a valid safetensors index ({type(e).__name__}: {e})"
                                      ) from None
            by_file: dict[str, list[str]] = {}
            for name, fname in weight_map.items():
                by_file.setdefault(fname, []).append(name)
            for fname, names in sorted(by_file.items()):
                f = path / fname
                if not f.is_file():
                    raise CheckpointError(f"{f}: missing, but {index_file.name} maps {len(names)} tensor(s) to it, "
                                          f"e.g. {names[0]!r}")
                entries = _read_header(f)
                for name in names:
                    if name not in entries:
                        raise CheckpointError(f"{f}: has no tensor {name!r}, which {index_file.name} maps to it")
                    self.entries[name] = entries[name]
        else:
            shards = sorted(path.glob("*.safetensors"))
            if not shards:
                raise CheckpointError(f"{path}: no model.safetensors, model.safetensors.index.json or *.safetensors "
                                      f"files")
            for f in shards:
                for name, entry in _read_header(f).items():
                    if name in self.entries:
                        raise CheckpointError(f"{f}: tensor {name!r} is also in {self.entries[name].file.name}")
                    self.entries[name] = entry

    def names(self) -> set[str]:
        return set(self.entries)

    def file(self, name: str) -> Path:
        return self.entries[name].file

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Copy tensor `name` into `out` (same shape; any dtype/device), converting (and dequantizing) as needed."""
        e = self.entries[name]
        if tuple(out.shape) != e.shape:
            raise CheckpointError(f"{e.file}: tensor {name!r} has shape {list(e.shape)}, the config implies "
                                  f"{list(out.shape)}")
        if name in self.fp8:
            out.copy_(self.read(name))
            return
        self._copy_into(e, name, out)

    def read_rows_into(self, name: str, rows: slice, out: torch.Tensor) -> None:
        """Copy rows [start, stop) of tensor `name` (its first dimension) into `out`, reading only their bytes (a
        rank's experts of a packed [E, ...] tensor)."""
        e = self.entries[name]
        shape = (rows.stop - rows.start, *e.shape[1:])
        if tuple(out.shape) != shape or not 0 <= rows.start <= rows.stop <= (e.shape[0] if e.shape else 0):
            raise CheckpointError(f"{e.file}: tensor {name!r} has shape {list(e.shape)}, the config implies rows "
                                  f"{rows.start}:{rows.stop} of shape {list(out.shape)}")
        if name in self.fp8:
            out.copy_(self.read(name)[rows])
            return
        row_bytes = math.prod(e.shape[1:]) * e.dtype.itemsize
        self._copy_into(replace(e, shape=shape, start=e.start + rows.start * row_bytes,
                                end=e.start + rows.stop * row_bytes), name, out)

    def _copy_into(self, e: _Entry, name: str, out: torch.Tensor) -> None:
        """The bytes of entry `e` (of tensor `name`) into `out` of its shape: read in place when `out` is a
        contiguous CPU tensor of the stored dtype, else through a buffer and converted."""
        direct = out.device.type == "cpu" and out.dtype == e.dtype and out.is_contiguous()
        buf = out if direct else torch.empty(e.shape, dtype=e.dtype)
        self._fill(e, name, buf)
        if not direct:
            out.copy_(buf)

    def read(self, name: str) -> torch.Tensor:
        """Tensor `name` as stored; an FP8 weight (see `fp8`) comes dequantized, in float32."""
        if name in self.fp8:
            scale, block = self.fp8[name]
            return dequantize_fp8(self._read_raw(name), self._read_raw(scale), block)
        return self._read_raw(name)

    def _read_raw(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        t = torch.empty(e.shape, dtype=e.dtype)
        self._fill(e, name, t)
        return t

    def _fill(self, e: _Entry, name: str, t: torch.Tensor) -> None:
        if e.end == e.start:
            return
        view = memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())
        try:
            f = self._handles.get(e.file)
            if f is None:
                f = self._handles[e.file] = open(e.file, "rb", buffering=0)  # noqa: SIM115 (close())
            f.seek(e.start)
            done = 0
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    raise CheckpointError(f"{e.file}: tensor {name!r} is cut short at byte {e.start + done}; the file "
                                          f"is truncated")
                done += n
        except OSError as err:
            raise CheckpointError(f"{e.file}: tensor {name!r} cannot be read ({err.strerror or err})") from None

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()


_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_PACKED = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
# Parameters whose rows the checkpoint interleaves per key-head group ([q|k|v..|z..] and [b..|a..] for each group);
# the model keeps them grouped by kind ([all q|all k|all v|all z], [all b|all a]).
_CONVERTERS: dict[str, Callable[[torch.Tensor, Qwen3NextConfig], torch.Tensor]] = {
    ".linear_attn.in_proj_qkvz.weight": qkvz_from_hf, ".linear_attn.in_proj_ba.weight": ba_from_hf}

# One piece of a parameter: (index into the parameter, or None for all of it, or a slice: the whole parameter is
# those rows of the checkpoint tensor; checkpoint tensor name).
_Piece = tuple[tuple | slice | None, str]


def _plan(params: dict[str, torch.Tensor], available: set[str],
          expert_ranges: dict[str, tuple[int, int]] | None = None,
          row_ranges: dict[str, tuple[int, int]] | None = None) -> dict[str, list[_Piece]]:
    """For each parameter, the checkpoint tensors it is assembled from (official per-expert or packed experts).
    Tensor parallelism: `expert_ranges`, the experts [e0, e1) that the `...mlp.experts` module of that name holds,
    its row e being checkpoint expert e0 + e; `row_ranges`, parameters that are rows [r0, r1) of the checkpoint
    tensor of the same name (the rank's vocabulary rows of the embedding and the LM head)."""
    expert_ranges, row_ranges = expert_ranges or {}, row_ranges or {}
    per_expert_prefixes = {m.group(1) for m in map(_EXPERT.match, available) if m}
    plan: dict[str, list[_Piece]] = {}
    for name, p in params.items():
        m = _PACKED.match(name)
        e0, e1 = expert_ranges.get(m.group(1), (0, None)) if m else (0, None)
        if name in row_ranges and name in available:
            plan[name] = [(slice(*row_ranges[name]), name)]
        elif name in available:
            plan[name] = [(None if e1 is None else slice(e0, e1), name)]
        elif not m or m.group(1) not in per_expert_prefixes:
            plan[name] = [(None, name)]
        elif m.group(2) == "gate_up_proj":
            half = p.shape[1] // 2
            plan[name] = [piece for e in range(p.shape[0]) for piece in
                          (((e, slice(0, half)), f"{m.group(1)}.{e0 + e}.gate_proj.weight"),
                           ((e, slice(half, None)), f"{m.group(1)}.{e0 + e}.up_proj.weight"))]
        else:
            plan[name] = [((e,), f"{m.group(1)}.{e0 + e}.down_proj.weight") for e in range(p.shape[0])]
    return plan


def _other_ranks_experts(available: set[str], expert_ranges: dict[str, tuple[int, int]]) -> set[str]:
    """The per-expert tensors of the experts a tensor-parallel rank does not hold (not read, not unexpected)."""
    out = set()
    for name in available:
        m = _EXPERT.match(name)
        if m and m.group(1) in expert_ranges:
            e0, e1 = expert_ranges[m.group(1)]
            if not e0 <= int(m.group(2)) < e1:
                out.add(name)
    return out


def load_model(path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu",
               strict: bool = True, quantize: str | None = None,
               hf_overrides: dict | None = None, shard=None) -> Qwen3NextForCausalLM:
    """Load an HF Qwen3-Next directory (single or sharded safetensors, either expert layout, with `mtp.*`).

    Parameters are allocated once in `dtype` (default: the config's `torch_dtype`) and filled tensor by tensor, so
    peak memory is about one copy of the model. A checkpoint without `mtp.*` tensors (e.g. saved by transformers)
    loads without the MTP head. With `strict`, tensors the model does not use are an error.
    An FP8 checkpoint (the official `*-FP8` layout: float8_e4m3fn weights with block-wise `weight_scale_inv`)
    loads as a float model, each weight dequantized as it is read (`dequantize_fp8`).
    A directory written by `qwen3next quantize` loads into the quantized modules (quant/); `quantize` ("int8" or
    "int4", group size 64) quantizes a float or FP8 checkpoint while loading, module by module (peak memory: the
    quantized model + one module's float weights), exactly as `quant.quantize_model` after loading would; "bf16"
    keeps the big weights in bf16 storage with fp32 compute (`quant.quantize.store_bf16`; needs dtype float32).
    `hf_overrides` changes config.json's values before the model is built (`Qwen3NextConfig.from_pretrained`), e.g.
    YaRN rope scaling for long contexts. `shard` (a `parallel.plan.TPPlan`, `parallel.comm.TPComm` or None pair):
    load only one tensor-parallel rank's share, layer by layer, reading only its routed experts and vocabulary rows
    (peak: the share + one layer's non-expert part).
    """
    bits = quantize_bits(quantize)
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected an HF model directory with config.json)")
    try:
        config = Qwen3NextConfig.from_pretrained(path, hf_overrides)
    except (OSError, ValueError) as e:
        raise CheckpointError(str(e)) from None
    index = _TensorIndex(path)
    try:
        model = _load(index, config, dtype, device, strict, bits, shard)
    finally:
        index.close()
    if bits is not None:
        model = _quantize_loaded(model, bits)  # int8/int4 happened while loading; checks a quantized dir's bits
    return model


def stored_matrix_dtypes(path: str | Path) -> set[torch.dtype]:
    """The dtypes the tensors of two or more dimensions of an HF model directory are stored in (headers only)."""
    index = _TensorIndex(Path(path))
    try:
        return {e.dtype for e in index.entries.values() if len(e.shape) >= 2}
    finally:
        index.close()


def quantize_bits(quantize: str | None) -> int | None:
    """Bits of a `quantize` option: None or "none" (no quantization), "int8", "int4" or "bf16" (16: bf16-stored
    weights, fp32 compute); anything else is a ValueError."""
    if quantize is not None and quantize not in QUANTIZE_BITS:
        raise ValueError(f"quantize: expected None, 'none', 'int8', 'int4' or 'bf16', got {quantize!r}")
    return None if quantize is None else QUANTIZE_BITS[quantize]


# ---- quantized checkpoints (quant/): hooks ---------------------------------------------------------------------------
def _quantize_loaded(model: Qwen3NextForCausalLM, bits: int) -> Qwen3NextForCausalLM:
    from .quant.quantize import is_quantized_config, quantize_model

    qc = model.config.quantization_config
    if is_quantized_config(qc):
        if qc["bits"] != bits:
            asked = "bf16 storage" if bits == 16 else f"int{bits}"
            raise ValueError(f"quantize: the checkpoint is already quantized to int{qc['bits']}, not {asked}")
        return model
    return quantize_model(model, bits)


def _swap_in_quantized(model: Qwen3NextForCausalLM, available: set[str]) -> list[str]:
    """On the meta model: swap in the quantized modules a `qwen3next quantize` directory holds; their tensors."""
    from .quant.quantize import is_quantized_config, swap_in_quantized

    qc = model.config.quantization_config
    if qc is None:
        return []
    if not is_quantized_config(qc):
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise CheckpointError(f"quantization_config.quant_method: {method!r} is not supported (only 'fp8' block-wise "
                              f"checkpoints such as Qwen3-Next-80B-A3B-Instruct-FP8, and the 'qwen3next' int8/int4 "
                              f"format written by `qwen3next quantize`)")
    return swap_in_quantized(model, available)


def _load(index: _TensorIndex, config: Qwen3NextConfig, dtype: torch.dtype | str | None,
          device: torch.device | str, strict: bool, bits: int | None = None, shard=None) -> Qwen3NextForCausalLM:
    path = index.path
    available = index.names()
    if config.num_nextn_predict_layers > 0 and not any(n.startswith("mtp.") for n in available):
        config.num_nextn_predict_layers = 0  # a checkpoint without MTP weights (e.g. saved by transformers)
    dtype = parse_dtype(dtype, config.torch_dtype if config.torch_dtype in DTYPES else "bfloat16")
    config.torch_dtype = _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))  # describes the loaded model
    # Build on meta and cast there, so the real allocation happens once, in the target dtype.
    with torch.device("meta"):
        model = Qwen3NextForCausalLM(config)
    fp8_scales = _setup_fp8(index, model) if is_fp8_config(config.quantization_config) else []  # dequantized on read
    quantized_sources = _swap_in_quantized(model, available)
    if not fp8_scales:
        _check_no_fp8(index)
    model = model.to(dtype)
    # Quantizing while loading (int8/int4 of a float or FP8 checkpoint): the float modules to quantize are taken out
    # of the model before allocation and loaded one at a time, so peak memory is the quantized model + one module.
    pending: dict[str, nn.Module] = {}
    if bits in (8, 4) and config.quantization_config is None:
        from .quant.quantize import swap_in_empty_quantized

        pending = swap_in_empty_quantized(model, bits)
    # Tensor parallelism (parallel/): the decoder layers, the embedding and the LM head are taken out too and loaded
    # one at a time, each cut to this rank's share at once; their routed experts are cut before allocation, so only
    # the rank's experts are read, and the embedding and LM head to its vocabulary rows: peak memory is the rank's
    # shard + one layer's non-expert part.
    parts = _take_out_parts(model, shard, pending or quantized_sources) if shard is not None else {}
    expert_ranges, row_ranges = _cut_before_loading(parts, shard[0], config) if shard is not None else ({}, {})
    model = model.to_empty(device=device)
    if config.tie_word_embeddings and not parts:  # to_empty unties shared parameters
        model.lm_head.weight = model.model.embed_tokens.weight

    params = {n: p for n, p in model.named_parameters() if not (config.tie_word_embeddings and n == "lm_head.weight")}
    deferred = {f"{m}.{n}": p for m, module in (*pending.items(), *parts.items()) for n, p in module.named_parameters()
                if not (config.tie_word_embeddings and m == "lm_head")}  # meta
    plan = _plan({**params, **deferred}, available, expert_ranges, row_ranges)
    needed = [src for pieces in plan.values() for _, src in pieces] + quantized_sources + fp8_scales
    missing = [src for src in needed if src not in available]
    if missing:
        files = sorted({e.file.name for e in index.entries.values()})
        where = ", ".join(files) if len(files) <= 3 else f"{len(files)} files"
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing from the checkpoint ({where}): "
                              f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}")
    # a tied checkpoint may still carry lm_head.weight (a copy of the embedding): accept and ignore it
    extra = sorted(available - set(needed) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
                   - _other_ranks_experts(available, expert_ranges))
    if extra and strict:
        raise CheckpointError(f"{path}: {len(extra)} unexpected tensor(s) in the checkpoint: "
                              f"{', '.join(f'{n} ({index.file(n).name})' for n in extra[:5])}"
                              f"{', ...' if len(extra) > 5 else ''}")
    reads = len(needed) - len(fp8_scales)  # a scale is read with its weight
    desc = "Loading weights" + (f", quantizing to int{bits}" if pending else "")
    with torch.no_grad(), progress(total=reads, desc=desc, unit="tensor") as bar:
        for name, param in params.items():
            _fill(index, config, name, param, plan[name], bar)
        for part_name in list(parts):
            part = parts.pop(part_name)
            if not (part_name == "lm_head" and config.tie_word_embeddings):  # a tied head is the embedding's
                part = part.to_empty(device=device)
                for n, param in part.named_parameters():
                    _fill(index, config, f"{part_name}.{n}", param, plan[f"{part_name}.{n}"], bar)
            _shard_part(model, part_name, part, shard)
            del part
        if pending:
            from .quant.quantize import fill_quantized

            for module_name in list(pending):
                module = pending.pop(module_name).to_empty(device=device)  # this module's float weights only
                for n, param in module.named_parameters():
                    _fill(index, config, f"{module_name}.{n}", param, plan[f"{module_name}.{n}"], bar)
                fill_quantized(model.get_submodule(module_name), module)
                del module
        if quantized_sources:
            from .quant.quantize import read_quantized

            def read(name: str) -> torch.Tensor:
                bar.update()
                return index.read(name)

            read_quantized(model, read)
    model.eval()
    return model


def _take_out_parts(model: Qwen3NextForCausalLM, shard, other_work) -> dict[str, nn.Module]:
    """The (meta, full) parts a tensor-parallel rank loads one at a time, replaced in `model` by placeholders."""
    if other_work:
        raise CheckpointError("tensor parallelism: load a float or FP8 checkpoint (each rank quantizes its shard "
                              "after loading, with --quantize), not a quantized one")
    names = [f"model.layers.{i}" for i in range(len(model.model.layers))]
    names += [f"mtp.layers.{i}" for i in range(len(model.mtp.layers))] if model.mtp is not None else []
    names += ["model.embed_tokens", "lm_head"]  # the embedding first: a tied head is cut from it
    parts = {}
    for name in names:
        parent, _, child = name.rpartition(".")
        parts[name] = model.get_submodule(name)
        setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
    return parts


def _cut_before_loading(parts: dict[str, nn.Module], plan, config: Qwen3NextConfig
                        ) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]]]:
    """Cut the taken-out (meta) parts whose share is a range of rows before anything is allocated, so that only
    those rows are read: each layer's routed experts to the rank's experts, the embedding and an untied LM head to
    the rank's vocabulary rows. Returns the `...mlp.experts` names with their expert ranges, and the parameters that
    are row ranges of their checkpoint tensor."""
    from .parallel.shard import keep_local_experts

    expert_ranges, row_ranges = {}, {}
    v0, v1 = plan.vocab()
    for name, part in list(parts.items()):
        moe = getattr(part, "mlp", None)
        if isinstance(moe, SparseMoE):
            keep_local_experts(moe, plan)
            expert_ranges[f"{name}.mlp.experts"] = moe.local_experts
        elif name == "model.embed_tokens":
            with torch.device("meta"):
                parts[name] = type(part)(v1 - v0, part.embedding_dim, dtype=part.weight.dtype)
            row_ranges[f"{name}.weight"] = (v0, v1)
        elif name == "lm_head" and not config.tie_word_embeddings:  # a tied head is cut from the embedding
            with torch.device("meta"):
                parts[name] = type(part)(part.in_features, v1 - v0, bias=False, dtype=part.weight.dtype)
            row_ranges[f"{name}.weight"] = (v0, v1)
    return expert_ranges, row_ranges


def _shard_part(model: Qwen3NextForCausalLM, name: str, part: nn.Module, shard) -> None:
    """Put a loaded full part back into `model`, cut to the rank's share (parallel/shard.py)."""
    from .parallel.shard import shard_embedding, shard_layer, shard_lm_head

    plan, comm = shard
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, part)
    if name == "model.embed_tokens":
        shard_embedding(model, plan, comm)
    elif name == "lm_head":
        shard_lm_head(model, plan, comm)
        model.tp_plan = plan
    else:
        shard_layer(part, plan, comm)


def _fill(index: _TensorIndex, config: Qwen3NextConfig, name: str, param: torch.Tensor, pieces: list[_Piece],
          bar) -> None:
    """Read parameter `name` from its checkpoint pieces (converting interleaved layouts), ticking `bar` per read."""
    convert = next((fn for suffix, fn in _CONVERTERS.items() if name.endswith(suffix)), None)
    for idx, src in pieces:
        if convert is not None:
            t = index.read(src)
            if tuple(t.shape) != tuple(param.shape):
                raise CheckpointError(f"{index.file(src)}: tensor {src!r} has shape {list(t.shape)}, the config "
                                      f"implies {list(param.shape)}")
            param.copy_(convert(t, config))
        elif isinstance(idx, slice):
            index.read_rows_into(src, idx, param)
        else:
            index.read_into(src, param if idx is None else param[idx])
        bar.update()


# ---- FP8 checkpoints (the official Qwen3-Next-*-FP8 layout) ----------------------------------------------------------
# config.json: "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
# "weight_block_size": [128, 128], "modules_to_not_convert": [...]}. Each converted Linear's `X.weight` is stored as
# float8_e4m3fn [N, K] beside a float32 `X.weight_scale_inv` [ceil(N/bm), ceil(K/bn)]: the weight is
# fp8 · scale_inv of its (bm x bn) block, the blocks at the bottom and right edges partial. Everything else (norms,
# embeddings, lm_head, router and shared-expert gates, in_proj_ba, mtp.fc in the official list) stays bf16. We load
# it as a float model: each weight dequantized in fp32 as it is read, then cast to the target dtype (what
# transformers' `dequantize=True` computes; activations are never quantized, so "dynamic" needs nothing at run time).
_SCALE_SUFFIX = "_scale_inv"
_FP8_DTYPES = {torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e5m2: "float8_e5m2"}


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Block-wise FP8 -> float32: weight [N, K] (float8) times scale_inv [ceil(N/bm), ceil(K/bn)], each element by
    the scale of its (bm x bn) block; edge blocks may be partial. Temporaries: the result and one row of scales."""
    bm, bn = block
    N, K = weight.shape
    out = weight.float()
    s = scale_inv.float().repeat_interleave(bn, dim=1)[:, :K]  # [ceil(N/bm), K]: a scale per column, per block row
    full = N // bm
    if full:
        out[: full * bm].view(full, bm, K).mul_(s[:full, None, :])
    if full * bm < N:
        out[full * bm:].mul_(s[full])
    return out


def is_fp8_config(quantization_config: dict | None) -> bool:
    return isinstance(quantization_config, dict) and quantization_config.get("quant_method") == "fp8"


def _fp8_block_size(qc: dict, where: str) -> tuple[int, int]:
    """The block size of a supported FP8 quantization_config; a CheckpointError naming the key otherwise."""
    unsupported = {"fmt": ("e4m3", "float8_e4m3fn weights"),
                   "activation_scheme": ("dynamic", "the weights are dequantized at load; a 'static' checkpoint's "
                                                    "activation scales have no place in a float model"),
                   "scale_fmt": ("float", "float32 weight_scale_inv"), "expert_dtype": ("fp8", "fp8 experts")}
    for key, (only, what) in unsupported.items():
        value = qc.get(key, only)
        if not isinstance(value, str) or value.lower() != only:
            raise CheckpointError(f"{where}.{key}: {value!r} is not supported (only {only!r}: {what})")
    block = qc.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise CheckpointError(f"{where}.weight_block_size: expected two positive integers such as [128, 128], got "
                              f"{block!r} (per-tensor FP8 scales are not supported)")
    skip = qc.get("modules_to_not_convert")
    if skip is not None and not (isinstance(skip, list) and all(isinstance(m, str) for m in skip)):
        raise CheckpointError(f"{where}.modules_to_not_convert: expected a list of module names, got {skip!r}")
    return int(block[0]), int(block[1])


def _kept_in_high_precision(module: str, patterns: list[str]) -> bool:
    """transformers' reading of modules_to_not_convert: a pattern names a module, or a prefix of one up to a dot
    ('layers.1' covers 'layers.1.mlp', not 'layers.11'), as a plain name or a regex, or ends the module's name."""
    for p in patterns:
        if module == p or module.startswith(p + ".") or module.endswith(p):
            return True
        try:
            if re.match(rf"(?:{p})(?:\.|$)", module):
                return True
        except re.error:
            pass
    return False


def _fp8_converted_weights(model: Qwen3NextForCausalLM, skip: list[str] | None) -> Iterator[tuple[str, list[str]]]:
    """(module, its checkpoint weight names) for each module an FP8 config converts: every Linear and routed-expert
    stack the config does not keep in high precision. The router `mlp.gate` is no Linear in transformers and is
    never converted; without a list, transformers keeps lm_head (the output embedding)."""
    patterns = ["lm_head"] if skip is None else skip
    for name, module in model.named_modules():
        if _kept_in_high_precision(name, patterns) or name.endswith(".mlp.gate"):
            continue
        if isinstance(module, nn.Linear):
            yield name, [f"{name}.weight"]
        elif isinstance(module, Experts):
            per_expert = [f"{name}.{e}.{p}.weight" for e in range(module.gate_up_proj.shape[0])
                          for p in ("gate_proj", "up_proj", "down_proj")]
            yield name, per_expert + [f"{name}.gate_up_proj", f"{name}.down_proj"]  # either layout


def _setup_fp8(index: _TensorIndex, model: Qwen3NextForCausalLM) -> list[str]:
    """On the meta model of an FP8 checkpoint: check the config and the tensors, register every FP8 weight with its
    scale on `index` (read() then dequantizes it), and turn the config into a float model's. Returns the scales'
    names (read with their weights)."""
    qc = model.config.quantization_config
    where = f"{index.path / 'config.json'}: quantization_config"
    block = _fp8_block_size(qc, where)
    entries = index.entries
    scales = sorted(n for n in entries if n.endswith(".weight" + _SCALE_SUFFIX))
    for scale in scales:
        name, es = scale.removesuffix(_SCALE_SUFFIX), entries[scale]
        ew = entries.get(name)
        if ew is None:
            raise CheckpointError(f"{es.file}: tensor {scale!r} scales a weight {name!r} that the checkpoint lacks")
        if ew.dtype != torch.float8_e4m3fn or len(ew.shape) != 2:
            raise CheckpointError(f"{ew.file}: tensor {name!r} has a block scale {scale!r}, so it should be a "
                                  f"float8_e4m3fn matrix, but it is {str(ew.dtype).removeprefix('torch.')} "
                                  f"{list(ew.shape)}")
        expected = (-(-ew.shape[0] // block[0]), -(-ew.shape[1] // block[1]))
        if es.shape != expected:
            raise CheckpointError(f"{es.file}: tensor {scale!r} has shape {list(es.shape)}; weight {name!r} "
                                  f"{list(ew.shape)} in blocks of {block[0]}x{block[1]} (weight_block_size) needs "
                                  f"{list(expected)}")
        if not es.dtype.is_floating_point or es.dtype in _FP8_DTYPES:
            raise CheckpointError(f"{es.file}: tensor {scale!r} is {str(es.dtype).removeprefix('torch.')}; block "
                                  f"scales are float32")
        index.fp8[name] = (scale, block)
    for name, e in entries.items():
        if e.dtype in _FP8_DTYPES and name not in index.fp8:
            raise CheckpointError(f"{e.file}: tensor {name!r} is stored as {_FP8_DTYPES[e.dtype]} but has no block "
                                  f"scale {name + _SCALE_SUFFIX!r}")
    for module, weights in _fp8_converted_weights(model, qc.get("modules_to_not_convert")):
        for name in weights:
            if name in entries and name not in index.fp8:
                raise CheckpointError(
                    f"{entries[name].file}: quantization_config (fp8) converts {module!r} (it is not in "
                    f"modules_to_not_convert), but the checkpoint has no {name + _SCALE_SUFFIX!r}: {name!r} is stored "
                    f"as {str(entries[name].dtype).removeprefix('torch.')}")
    model.config.quantization_config = None  # what gets loaded is a float model
    return scales


def _check_no_fp8(index: _TensorIndex) -> None:
    for name, e in index.entries.items():
        if e.dtype in _FP8_DTYPES:
            raise CheckpointError(f"{e.file}: tensor {name!r} is stored as {_FP8_DTYPES[e.dtype]}, but config.json "
                                  f"has no fp8 quantization_config (quant_method 'fp8', weight_block_size) to "
                                  f"dequantize it with")


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
    if config.quantization_config is not None:  # quantized modules hold buffers, not parameters
        from .quant.quantize import quantized_hf_tensors

        yield from quantized_hf_tensors(model)


def save_model(model: Qwen3NextForCausalLM, path: str | Path, max_shard_bytes: int = 2 * 1024**3) -> None:
    """Write config.json and (sharded) safetensors in the official HF layout."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    d = config.to_dict()
    d["torch_dtype"] = _DTYPE_NAMES[model.dtype]
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
    total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    with progress(total=total, desc="Saving weights", unit="B", unit_scale=True) as bar:
        for fname, shard in zip(names, shards):
            _save(shard, path / fname)
            bar.update(sum(t.numel() * t.element_size() for t in shard.values()))
    if len(shards) == 1:
        if index_file.exists():
            index_file.unlink()
        return
    weight_map = {n: fname for fname, shard in zip(names, shards) for n in shard}
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    index_file.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _save(tensors: dict[str, torch.Tensor], file: Path) -> None:
    # safetensors refuses tensors that share storage (expert slices of one parameter): give each its own.
    owned = {n: t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t
             for n, t in tensors.items()}
    save_file(owned, str(file), metadata={"format": "pt"})
