"""The decode step compiled ahead of time with AOTInductor: one native call per step, no Python between kernels.

`torch.compile`'s decode step (engine/compiled.py) pays, on every step, dynamo's guard evaluation (~1,000 guards on
the model's modules and the step's metadata) and inductor's Python wrapper (one Python call per kernel, custom op and
buffer). On the small models this project runs on CPUs that is a large share of a step: `small` at int8, 1 thread,
a ~5 ms step spent ~0.5 ms in guards and ~0.8 ms in the wrapper (profiler). AOTInductor compiles the same graph
(same inductor kernels, same native `qwen3next::linear` / `qwen3next::moe` ops) into a shared library whose C++
wrapper runs the whole step. Measured on `small` int8, 1 thread, batch 1 after 512 tokens, in one process with
interleaved rounds: 4.2 ms per decode step (with lm_head and argmax) vs 5.9 ms through torch.compile.

How it is built:
- `torch.export` traces `_StepModule`: embedding -> decoder stack -> final norm, for one new token per sequence.
  Its inputs are the step's tokens, context lengths, slots, padded block tables, `arange(L)` (its length carries
  the number of keys) and the cache pools themselves, which the step updates in place (exported as input
  mutations); positions, the K/V rows written and read, the mask and RoPE are derived inside the graph. The batch
  size (1..`MAX_BATCH`), the context length, the block-table width and the pool sizes are dynamic dimensions: one
  library serves every engine of the model and every context length.
- The weights are NOT copied into the library (`package_constants_in_so=False`): after loading, the model's own
  tensors are handed over with `load_constants(..., user_managed=True)`, so the step reads them where they are.
- The package is cached on disk (`~/.cache/qwen3next/aot`, or `$QWEN3NEXT_AOT_CACHE`), keyed by what the code
  depends on: the torch version, the CPU's vector ISA (the kernels are compiled for it), this package's
  model/ops/kernels/quant sources and this module, the fast-path switches, the config, the block size, and the
  names, shapes and dtypes of the weights and pools (not their values, not the pools' sizes). Compiling takes
  ~30-90 s on 2 cores; loading a cached package ~0.1 s.

Batches of more than `MAX_BATCH` sequences keep the torch.compile path: the native kernels' row limits (ops/linear.py)
would flip inside the range and one library would need several graphs; for the same reason only fp32 models with the
native kernels take it (bf16 activations and the torch paths switch ops within 1..8 rows). Verification steps and
the MTP head also stay on torch.compile. The twin is the eager step (`model.hidden_states`); tests/test_aot_step.py
compares them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from .. import kernels
from ..model.batch import BatchInfo, ForwardContext, check_tables_hold, decode_batch
from ..model.cache import HybridCache
from ..model.qwen3_next import Qwen3NextForCausalLM
from ..ops.dispatch import fast_decode, switch_state
from ..ops.rope import rope_cos_sin

log = logging.getLogger(__name__)

MAX_BATCH = 8  # sequences per step; see the module docstring
PACKAGE_VERSION = 1  # bump when the exported signature changes


class AOTStepError(RuntimeError):
    """The ahead-of-time decode step could not be built here (export or compile failed, no compiler...)."""


class _Pools:
    """The cache pools a traced step reads and writes: the same keys as `HybridCache`'s k, v and state."""

    def __init__(self, k: dict[str, torch.Tensor], v: dict[str, torch.Tensor],
                 state: dict[str, dict[str, torch.Tensor]]):
        self.k, self.v, self.state = k, v, state


def pool_names(cache: HybridCache, model: Qwen3NextForCausalLM) -> tuple[list[str], list[tuple[str, str]]]:
    """The K/V keys and (layer key, state name) pairs the decoder stack uses, in a fixed order (no MTP keys)."""
    layers = {str(i) for i in range(len(model.model.layers))}
    kv_keys = sorted((k for k in cache.k if k in layers), key=int)
    state_keys = [(k, n) for k in sorted(cache.state, key=int) if k in layers for n in sorted(cache.state[k])]
    return kv_keys, state_keys


def pool_tensors(cache: HybridCache, kv_keys: list[str], state_keys: list[tuple[str, str]]) -> list[torch.Tensor]:
    """The pools in the step's input order: K of each attention layer, then V, then each DeltaNet state."""
    return [cache.k[k] for k in kv_keys] + [cache.v[k] for k in kv_keys] + [cache.state[k][n] for k, n in state_keys]


class _StepModule(nn.Module):
    """The traced step. Besides the tokens it takes only what changes per step in its plainest form (context
    lengths, slots, padded block tables, and `key_pos` = arange(L) whose length carries the number of keys) and
    derives positions, the K/V rows written and read, the mask and RoPE inside the graph: one fused kernel instead
    of ~25 small eager ops per step (`BatchInfo.prepare` + `rope_cos_sin`, ~0.35 ms on `small`)."""

    def __init__(self, model: Qwen3NextForCausalLM, kv_keys: list[str], state_keys: list[tuple[str, str]],
                 block_size: int):
        super().__init__()
        self.model = model.model
        self.register_buffer("rope_inv_freq", model.rope_inv_freq, persistent=False)
        self.rope_scale, self.dtype = model.rope_scale, model.dtype
        self.kv_keys, self.state_keys, self.block_size = kv_keys, state_keys, block_size

    def forward(self, tokens: torch.Tensor, context_lens: torch.Tensor, slots: torch.Tensor,
                block_tables: torch.Tensor, key_pos: torch.Tensor, *pools: torch.Tensor) -> torch.Tensor:
        bs, nb = self.block_size, block_tables.shape[1]
        # token p of sequence b sits at row block_tables[b, p // bs] * bs + p % bs (model/layout.py: paged_row)
        rows = block_tables[:, (key_pos // bs).clamp(max=nb - 1)] * bs + key_pos % bs  # [B, L]
        valid = key_pos[None, :] <= context_lens[:, None]  # the context and the new token (at position ctx)
        write_rows = block_tables.gather(1, (context_lens // bs)[:, None]).squeeze(1) * bs + context_lens % bs
        batch = decode_batch(context_lens, slots, write_rows, torch.where(valid, rows, 0), valid[:, None, None, :],
                             context_lens + 1)
        cos, sin = rope_cos_sin(context_lens, self.rope_inv_freq, self.rope_scale, self.dtype)
        n = len(self.kv_keys)
        k = dict(zip(self.kv_keys, pools[:n]))
        v = dict(zip(self.kv_keys, pools[n:2 * n]))
        state: dict[str, dict[str, torch.Tensor]] = {}
        for (key, name), pool in zip(self.state_keys, pools[2 * n:]):
            state.setdefault(key, {})[name] = pool
        ctx = ForwardContext(batch=batch, cos=cos, sin=sin, cache=_Pools(k, v, state))  # type: ignore[arg-type]
        return self.model(self.model.embed_tokens(tokens), ctx)


def _source_digest() -> str:
    """Hash of the sources the traced step runs: the model, ops, kernels and this module."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for sub in ("model", "ops", "kernels", "quant"):
        for p in sorted((root / sub).rglob("*")):
            if p.suffix in (".py", ".cpp", ".h"):
                h.update(p.relative_to(root).as_posix().encode())
                h.update(p.read_bytes())
    h.update((root / "config.py").read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()


def cache_dir() -> Path:
    env = os.environ.get("QWEN3NEXT_AOT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "qwen3next" / "aot"


def package_path(model: Qwen3NextForCausalLM, cache: HybridCache) -> Path:
    """Where the package for `model` stepping on `cache`'s pool layout is cached: named by a hash of everything the
    compiled code depends on (see the module docstring), never of the weights' values or the pools' sizes."""
    kv_keys, state_keys = pool_names(cache, model)
    module = _StepModule(model, kv_keys, state_keys, cache.block_size)
    tensors = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    # non-tensor module state the trace branches on (int4 weight layouts, group sizes, eps...)
    plain = (bool, int, float, str, dict, tuple, list, type(None))
    attrs = [(name, {k: v for k, v in vars(mod).items() if not k.startswith("_") and isinstance(v, plain)})
             for name, mod in module.named_modules()]
    pools = pool_tensors(cache, kv_keys, state_keys)
    desc = {
        "version": PACKAGE_VERSION, "torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
        "native": kernels.available(), "switches": switch_state(),
        "sources": _source_digest(), "config": model.config.to_dict(),
        "weights": [(n, list(t.shape), list(t.stride()), str(t.dtype)) for n, t in tensors], "modules": attrs,
        "parallel": torch.get_num_threads() > 1,  # inductor emits OpenMP loops only when compiling with threads
        "pools": [(str(p.dtype), list(p.shape[1:])) for p in pools], "kv": kv_keys, "state": state_keys,
        "block_size": cache.block_size,
    }
    key = hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return cache_dir() / f"step-{key}.pt2"


class AOTDecodeStep:
    """An AOTInductor-compiled decode step for `model` (batches of 1..MAX_BATCH sequences, one token each).

    Build with `AOTDecodeStep(model, cache)` (compiles, or loads a cached package); `handles(batch)` says whether a
    step can take it, `hidden_states(tokens, batch, cache)` runs it. Raises AOTStepError when export, compilation
    or loading fails.
    """

    def __init__(self, model: Qwen3NextForCausalLM, cache: HybridCache, log_fn=None):
        if model.device.type != "cpu":
            raise AOTStepError("the ahead-of-time decode step is built for CPU models only")
        if model.dtype != torch.float32 or not kernels.available():
            # bf16 activations or the torch paths switch kernels (gathered vs grouped experts...) inside 1..8 rows
            raise AOTStepError("the ahead-of-time decode step needs an fp32 model and the native kernels (got "
                               f"{model.dtype}, kernels {'on' if kernels.available() else 'off'})")
        self.model = model
        self.kv_keys, self.state_keys = pool_names(cache, model)
        self._module = _StepModule(model, self.kv_keys, self.state_keys, cache.block_size)
        self.block_size = cache.block_size
        path = package_path(model, cache)
        if not path.is_file():
            t0 = time.perf_counter()
            message = "compiling the ahead-of-time decode step (once per model shape and version; ~1 min)"
            if log_fn is not None:
                log_fn(message)
            else:  # like the kernels' build: a long silent wait at start is worse than a line on stderr
                print(f"qwen3next: {message}; QWEN3NEXT_AOT=0 skips it", file=sys.stderr, flush=True)
            self._compile(cache, path)
            log.info("AOT decode step compiled in %.1f s: %s", time.perf_counter() - t0, path)
        try:
            self._runner = torch._inductor.aoti_load_package(str(path))
            names = dict(self._module.named_parameters(remove_duplicate=False))
            names.update(self._module.named_buffers(remove_duplicate=False))
            wanted = self._runner.get_constant_fqns()
            missing = [n for n in wanted if n not in names]
            if missing:
                raise AOTStepError(f"the cached package {path} wants weights the model lacks: {missing[:3]}")
            self._runner.load_constants({n: names[n] for n in wanted}, check_full_update=True, user_managed=True)
        except AOTStepError:
            raise
        except Exception as e:  # a corrupt or foreign package: rebuild next time (not for a full disk and the like)
            if not isinstance(e, OSError):
                path.unlink(missing_ok=True)
            raise AOTStepError(f"loading the ahead-of-time decode step failed ({type(e).__name__}: {e})") from e

    def _compile(self, cache: HybridCache, path: Path) -> None:
        from torch.export import Dim

        B = 2  # an example step on a small cache of the same layout (the trace only reads shapes)
        example_cache = HybridCache(cache.config, num_slots=B, num_blocks=2 * B, block_size=cache.block_size,
                                    dtype=cache.dtype, device=cache.device, state_dtype=cache.state_dtype,
                                    layout=cache.layout)
        batch = BatchInfo([1] * B, [2] * B, list(range(B)), [[2 * i, 2 * i + 1] for i in range(B)])
        example = self._inputs(torch.zeros(B, dtype=torch.long), batch, example_cache)
        b = Dim("batch", min=1, max=MAX_BATCH)
        n = len(self.kv_keys)
        pools = tuple([{0: Dim("kv_rows", min=2)}] * (2 * n) + [{0: Dim("slots", min=2)}] * len(self.state_keys))
        dynamic = [{0: b}, {0: b}, {0: b}, {0: b, 1: Dim("blocks", min=1)}, {0: Dim("keys", min=2)}, pools]
        import torch._inductor.config as inductor_config

        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)  # torch's own
                with torch.no_grad():
                    ep = torch.export.export(self._module, tuple(example), dynamic_shapes=dynamic, strict=False)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}-{threading.get_ident()}.pt2")
                with inductor_config.patch({"aot_inductor.package_constants_in_so": False}):
                    torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp))
            tmp.replace(path)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
            raise AOTStepError(f"the ahead-of-time decode step failed to build ({type(e).__name__}: {first})") from e

    def _inputs(self, tokens: torch.Tensor, batch: BatchInfo, cache: HybridCache) -> list[torch.Tensor]:
        ctx_lens, tables = batch.context_lens, batch.block_tables
        width = max(len(t) for t in tables)
        device = tokens.device
        return [tokens, torch.tensor(ctx_lens, dtype=torch.long, device=device),
                torch.tensor(batch.slots, dtype=torch.long, device=device),
                torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long, device=device),
                torch.arange(max(ctx_lens) + 1, device=device), *pool_tensors(cache, self.kv_keys, self.state_keys)]

    @staticmethod
    def handles(batch: BatchInfo) -> bool:
        """Whether a forward over `batch` can take this step: a decode step of at most MAX_BATCH sequences."""
        return (fast_decode() and batch.batch_size <= MAX_BATCH and all(n == 1 for n in batch.seq_lens)
                and batch.context_lens is not None and batch.slots is not None and batch.block_tables is not None
                and not batch.capture_states and not batch.snapshots)

    def hidden_states(self, tokens: torch.Tensor, batch: BatchInfo, cache: HybridCache) -> torch.Tensor:
        """Flat tokens [B] of a decode step `batch` (not prepared: only its context lengths, slots and block
        tables are read) -> final normed hidden states [B, D]; `cache`'s K/V rows and DeltaNet states are updated
        in place."""
        check_tables_hold(batch.block_tables, [c + 1 for c in batch.context_lens], self.block_size)
        for table, slot in zip(batch.block_tables, batch.slots):
            if not 0 <= slot < cache.num_slots or not all(0 <= i < cache.num_blocks for i in table):
                raise ValueError(f"slot {slot} or block table {table} outside the cache's {cache.num_slots} slots "
                                 f"and {cache.num_blocks} blocks")
        return self._runner(*self._inputs(tokens, batch, cache))
