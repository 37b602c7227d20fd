"""The decode step compiled ahead of time with AOTInductor: one native call per step, no Python between kernels.

`torch.compile`'s decode step (engine/compiled.py) pays, on every step, dynamo's guard evaluation (~1,000 guards on
the model's modules and the step's metadata) and inductor's Python wrapper (one Python call per kernel, custom op and
buffer). On the small models this project runs on CPUs that is a large share of a step: `small` at int8, 1 thread,
a ~5 ms step spent ~0.5 ms in guards and ~0.8 ms in the wrapper (profiler). AOTInductor compiles the same graph
(same inductor kernels, same native `qwen3next::linear` / `qwen3next::moe` ops) into a shared library whose C++
wrapper runs the whole step. Measured on `small` int8, 1 thread, batch 1 after 512 tokens, in one process with
interleaved rounds: 4.2 ms per decode step (with lm_head and argmax) vs 5.9 ms through torch.compile.

How it is built:
- `torch.export` traces `_StepModule`: embedding -> decoder stack -> final norm -> LM head -> argmax, for one new
  token per sequence. It returns the hidden states, the logits and their argmax: every row of a decode step is
  sampled, and the runner's plain greedy rows take that argmax without the sampler (on the demo model, bf16
  weights, 1 thread: a decode token 1.23 -> 1.16 ms, the LM head's Python call and the sampler's batch building
  gone). Its inputs are the step's tokens, context lengths, slots, padded block tables, `arange(L)` (its length
  carries the number of keys) and the cache pools themselves, which the step updates in place (exported as input
  mutations); positions, the K/V rows written and read, the mask and RoPE are derived inside the graph. The batch
  size (1..`MAX_BATCH`), the context length, the block-table width and the pool sizes are dynamic dimensions: one
  library serves every engine of the model and every context length.
- The weights are NOT copied into the library (`package_constants_in_so=False`): after loading, the model's own
  tensors are handed over with `load_constants(..., user_managed=True)`, so the step reads them where they are.
- The package is cached on disk (`~/.cache/qwen3next/aot`, or `$QWEN3NEXT_AOT_CACHE`), keyed by what the code
  depends on: the torch version, the CPU's vector ISA (the kernels are compiled for it), this package's
  model/ops/kernels/quant sources, this module and the draft vocabulary's (engine/draft_vocab.py), the fast-path
  switches, the config, the block size, and the names, shapes and dtypes of the weights and pools (not their values,
  not the pools' sizes). Compiling takes ~30-90 s on 2 cores; loading a cached package ~0.1 s.

Batches of more than `MAX_BATCH` sequences keep the torch.compile path: the native kernels' row limits (ops/linear.py)
would flip inside the range and one library would need several graphs; for the same reason only fp32 models with the
native kernels take it (bf16 activations and the torch paths switch ops within 1..8 rows). The twin is the eager step
(`model.hidden_states`); tests/test_aot_step.py compares them.

Speculative decoding (MTP) has two more programs of the same kind, for k drafts (T = k + 1 tokens per sequence, up to
`MAX_BATCH` rows: 1..MAX_BATCH // T sequences):
- `AOTVerifyStep` (`_VerifyModule`): the verification forward with every DeltaNet state captured after every token
  and nothing committed -> the hidden states and the captured states. Attention reads K/V rows given per query (each
  new token sees the context and the new tokens up to itself: `model.batch.indexed_batch`), through the decode
  attention kernel, so no mask is built.
- `AOTDraftStep` (`_DraftModule`): after sampling, one call commits each sequence's state after its last kept token,
  runs the MTP head over the verified positions (writing its K/V) and drafts k tokens greedily.
Their twins are the eager verification (`capture_states`), `ForwardContext.commit_captured` and `model.mtp_hidden`.
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
from collections.abc import Callable
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from torch import nn

from .. import kernels
from ..model.batch import BatchInfo, ForwardContext, check_tables_hold, indexed_batch
from ..model.cache import HybridCache
from ..model.qwen3_next import Qwen3NextForCausalLM
from ..ops.dispatch import fast_decode, switch_state
from ..ops.rope import rope_cos_sin

log = logging.getLogger(__name__)

MAX_BATCH = 8  # sequences per step; see the module docstring
PACKAGE_VERSION = 3  # bump when the exported signature changes


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


def _key_rows(block_tables: torch.Tensor, key_pos: torch.Tensor, block_size: int) -> torch.Tensor:
    """The pool row of every key position `key_pos` [L] of each sequence's block table [B, W] -> [B, L] (positions
    past a table read its last block; they are never keys)."""
    # token p of sequence b sits at row block_tables[b, p // bs] * bs + p % bs (model/layout.py: paged_row)
    nb = block_tables.shape[1]
    return block_tables[:, (key_pos // block_size).clamp(max=nb - 1)] * block_size + key_pos % block_size


def _query_batch(first: torch.Tensor, slots: torch.Tensor, block_tables: torch.Tensor, key_pos: torch.Tensor,
                 T: int, block_size: int, capture_states: bool = False) -> tuple[BatchInfo, torch.Tensor]:
    """A prepared batch of T new tokens per sequence at positions first[b] .. first[b] + T - 1 (`indexed_batch`):
    rows written, rows read per query (its keys: every position up to its own) -> (batch, positions [B * T])."""
    rows = _key_rows(block_tables, key_pos, block_size)  # [B, L]
    pos = first[:, None] + torch.arange(T, device=first.device)  # [B, T]
    write_rows = rows.gather(1, pos).reshape(-1)
    valid = key_pos[None, None, :] <= pos[:, :, None]  # [B, T, L]
    read_rows = torch.where(valid, rows[:, None, :], 0).reshape(-1, key_pos.shape[0])
    positions = pos.reshape(-1)
    return indexed_batch(positions, slots, write_rows, read_rows, positions + 1, T, capture_states), positions


class _TracedBase(nn.Module):
    """What the traced programs share: the model, RoPE, and the cache pools they take as inputs (`kv_keys`: K then V
    pools of those attention layers, `state_keys`: DeltaNet state pools), wrapped as a cache for the layers."""

    def __init__(self, model: Qwen3NextForCausalLM, kv_keys: list[str], state_keys: list[tuple[str, str]],
                 block_size: int):
        super().__init__()
        self.model = model.model
        self.register_buffer("rope_inv_freq", model.rope_inv_freq, persistent=False)
        self.rope_scale, self.dtype = model.rope_scale, model.dtype
        self.kv_keys, self.state_keys, self.block_size = kv_keys, state_keys, block_size
        self.lm_head = model.lm_head

    def _logits(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The LM head's fp32 logits of `hidden` and their argmax: every row of a decode step or a verification is
        sampled, and plain greedy rows take the argmax as it is."""
        logits = self.lm_head(hidden).float()
        return logits, logits.argmax(-1)

    def _context(self, batch: BatchInfo, positions: torch.Tensor, pools: tuple[torch.Tensor, ...]) -> ForwardContext:
        cos, sin = rope_cos_sin(positions, self.rope_inv_freq, self.rope_scale, self.dtype)
        n = len(self.kv_keys)
        k = dict(zip(self.kv_keys, pools[:n]))
        v = dict(zip(self.kv_keys, pools[n:2 * n]))
        state: dict[str, dict[str, torch.Tensor]] = {}
        for (key, name), pool in zip(self.state_keys, pools[2 * n:]):
            state.setdefault(key, {})[name] = pool
        return ForwardContext(batch=batch, cos=cos, sin=sin, cache=_Pools(k, v, state))  # type: ignore[arg-type]


class _StepModule(_TracedBase):
    """The traced decode step -> (final normed hidden states [B, D], their logits [B, V] in fp32, the logits'
    argmax [B]). Besides the
    tokens it takes only what changes per step in its plainest form (context lengths, slots, padded block tables, and
    `key_pos` = arange(L) whose length carries the number of keys) and derives positions, the K/V rows written and
    read and RoPE inside the graph: one fused kernel instead of ~25 small eager ops per step (`BatchInfo.prepare` +
    `rope_cos_sin`, ~0.35 ms on `small`). The LM head and the argmax run inside too (`_logits`)."""

    def forward(self, tokens: torch.Tensor, context_lens: torch.Tensor, slots: torch.Tensor,
                block_tables: torch.Tensor, key_pos: torch.Tensor, *pools: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch, positions = _query_batch(context_lens, slots, block_tables, key_pos, 1, self.block_size)
        hidden = self.model(self.model.embed_tokens(tokens), self._context(batch, positions, pools))
        return hidden, *self._logits(hidden)


class _VerifyModule(_TracedBase):
    """The traced speculative verification: T tokens per sequence (the last emitted one and T - 1 drafts) at
    positions context_lens .. context_lens + T - 1, every DeltaNet state after every token captured and nothing
    committed -> (final normed hidden states [B * T, D], their logits [B * T, V] in fp32 (every verified position
    is sampled) and the logits' argmax [B * T], then the captured states in `state_keys` order, each
    [B, T, *state shape])."""

    def __init__(self, model: Qwen3NextForCausalLM, kv_keys: list[str], state_keys: list[tuple[str, str]],
                 block_size: int, T: int):
        super().__init__(model, kv_keys, state_keys, block_size)
        self.T = T

    def forward(self, tokens: torch.Tensor, context_lens: torch.Tensor, slots: torch.Tensor,
                block_tables: torch.Tensor, key_pos: torch.Tensor, *pools: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch, positions = _query_batch(context_lens, slots, block_tables, key_pos, self.T, self.block_size,
                                        capture_states=True)
        ctx = self._context(batch, positions, pools)
        hidden = self.model(self.model.embed_tokens(tokens), ctx)
        # contiguous: the captured states are views (transposed, unfolded) that the program's outputs do not keep
        return (hidden, *self._logits(hidden), *(ctx.captured[key].contiguous() for key in self.state_keys))


class _DraftModule(_TracedBase):
    """The traced step after a verification's sampling: commit the DeltaNet states of each sequence's last kept
    token, write the MTP head's K/V at the verified positions (main hidden state at t, the token at t + 1: the next
    draft, or the emitted bonus token at the last kept position), then K greedy drafts from the last kept position
    (the head's whole forward there, then on its own hidden state and its last draft, one position further each
    time) -> drafts [B, K].

    Inputs: the verification's hidden states [B * T, D] and tokens [B * T], bonus [B] (the token sampled after the
    accepted drafts), keep [B] (1 + accepted drafts), context lengths, slots, padded block tables (holding
    positions up to context + keep - 1 + K - 1), key_pos = arange(L) (L past that too), the captured states, then
    the pools (MTP K, MTP V, DeltaNet states)."""

    def __init__(self, model: Qwen3NextForCausalLM, kv_keys: list[str], state_keys: list[tuple[str, str]],
                 block_size: int, T: int, K: int, draft_head: nn.Module | None = None,
                 draft_mtp: nn.Module | None = None):
        super().__init__(model, kv_keys, state_keys, block_size)
        # the drafts' MTP layer and logits: the engine's (runner.make_draft_mtp / make_draft_head), the model's own
        # by default
        self.mtp = draft_mtp if draft_mtp is not None else model.mtp
        self.lm_head = draft_head if draft_head is not None else model.lm_head
        self.T, self.K = T, K

    def forward(self, hidden: torch.Tensor, tokens: torch.Tensor, bonus: torch.Tensor, keep: torch.Tensor,
                context_lens: torch.Tensor, slots: torch.Tensor, block_tables: torch.Tensor, key_pos: torch.Tensor,
                *rest: torch.Tensor) -> torch.Tensor:
        T, D = self.T, hidden.shape[-1]
        captured, pools = rest[:len(self.state_keys)], rest[len(self.state_keys):]
        state_pools = pools[2 * len(self.kv_keys):]
        B = slots.shape[0]
        seqs, last = torch.arange(B, device=slots.device), keep - 1
        for states, pool in zip(captured, state_pools):  # commit the state after each sequence's last kept token
            pool.index_copy_(0, slots, states[seqs, last].to(pool.dtype))
        nxt = torch.cat([tokens.view(B, T)[:, 1:], tokens.new_zeros(B, 1)], dim=1)
        nxt = nxt.scatter(1, last[:, None], bonus[:, None]).reshape(-1)
        batch, positions = _query_batch(context_lens, slots, block_tables, key_pos, T, self.block_size)
        embeds = self.model.embed_tokens(nxt)
        # the head's K/V at every verified position; its whole forward only at each last kept one (the others'
        # outputs would be dropped: on the demo model the T = 3 forward's experts cost more than the K/V)
        self.mtp.write_kv(hidden, embeds, self._context(batch, positions, pools))
        batch, positions = _query_batch(context_lens + last, slots, block_tables, key_pos, 1, self.block_size)
        h = self.mtp(hidden.view(B, T, D)[seqs, last], embeds.view(B, T, D)[seqs, last],
                     self._context(batch, positions, pools))  # [B, D] at each last kept position
        draft = self.lm_head(h).argmax(-1)
        drafts = [draft]
        for j in range(1, self.K):
            batch, positions = _query_batch(context_lens + last + j, slots, block_tables, key_pos, 1, self.block_size)
            h = self.mtp(h, self.model.embed_tokens(draft), self._context(batch, positions, pools))
            draft = self.lm_head(h).argmax(-1)
            drafts.append(draft)
        return torch.stack(drafts, dim=1)


def _source_digest() -> str:
    """Hash of the sources the traced programs run: the model, ops, kernels, quant, the config, the draft
    vocabulary's head and this module."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for sub in ("model", "ops", "kernels", "quant"):
        for p in sorted((root / sub).rglob("*")):
            if p.suffix in (".py", ".cpp", ".h"):
                h.update(p.relative_to(root).as_posix().encode())
                h.update(p.read_bytes())
    h.update((root / "config.py").read_bytes())
    h.update((root / "engine" / "draft_vocab.py").read_bytes())  # the drafting program may trace DraftVocabHead
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()


def cache_dir() -> Path:
    env = os.environ.get("QWEN3NEXT_AOT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "qwen3next" / "aot"


def _programs(model: Qwen3NextForCausalLM, cache: HybridCache, kind: str, T: int = 1, K: int = 0,
              draft_head: nn.Module | None = None,
              draft_mtp: nn.Module | None = None) -> tuple[nn.Module, list[str], list[tuple[str, str]]]:
    """The module traced for program `kind` ("step", "verify" or "draft") and the pools it takes (K/V keys, state
    keys); `draft_head` / `draft_mtp`: the drafting program's logits module and MTP layer (default the model's)."""
    kv_keys, state_keys = pool_names(cache, model)
    if kind == "step":
        return _StepModule(model, kv_keys, state_keys, cache.block_size), kv_keys, state_keys
    if kind == "verify":
        return _VerifyModule(model, kv_keys, state_keys, cache.block_size, T), kv_keys, state_keys
    mtp_keys = ["mtp0"]
    return (_DraftModule(model, mtp_keys, state_keys, cache.block_size, T, K, draft_head, draft_mtp), mtp_keys,
            state_keys)


def package_path(model: Qwen3NextForCausalLM, cache: HybridCache, kind: str = "step", T: int = 1,
                 K: int = 0, draft_head: nn.Module | None = None, draft_mtp: nn.Module | None = None) -> Path:
    """Where the package of program `kind` for `model` stepping on `cache`'s pool layout is cached: named by a hash
    of everything the compiled code depends on (see the module docstring), never of the weights' values or the pools'
    sizes."""
    module, kv_keys, state_keys = _programs(model, cache, kind, T, K, draft_head, draft_mtp)
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
        "block_size": cache.block_size, "kind": kind, "T": T, "K": K,
    }
    key = hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:24]
    prefix = "step" if kind == "step" else f"{kind}{T}-{K}" if kind == "draft" else f"{kind}{T}"
    return cache_dir() / f"{prefix}-{key}.pt2"


def _check_step(batch: BatchInfo, cache: HybridCache, totals: list[int]) -> None:
    """ValueError unless `batch`'s slots and blocks lie in `cache` and its tables hold `totals` tokens."""
    check_tables_hold(batch.block_tables, totals, cache.block_size)
    for table, slot in zip(batch.block_tables, batch.slots):
        if not 0 <= slot < cache.num_slots or not all(0 <= i < cache.num_blocks for i in table):
            raise ValueError(f"slot {slot} or block table {table} outside the cache's {cache.num_slots} slots "
                             f"and {cache.num_blocks} blocks")


def _tables(batch: BatchInfo, device: torch.device) -> list[torch.Tensor]:
    """Context lengths, slots and padded block tables of `batch` as the programs' inputs."""
    tables = batch.block_tables
    width = max(len(t) for t in tables)
    return [torch.tensor(batch.context_lens, dtype=torch.long, device=device),
            torch.tensor(batch.slots, dtype=torch.long, device=device),
            torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long, device=device)]


class _AOTProgram:
    """One AOTInductor program for `model` on `cache`'s pool layout: compiled (or loaded from the disk cache) at
    construction; AOTStepError when export, compilation or loading fails."""

    kind, what = "step", "decode step"

    def __init__(self, model: Qwen3NextForCausalLM, cache: HybridCache, log_fn=None, T: int = 1, K: int = 0,
                 draft_head: nn.Module | None = None, draft_mtp: nn.Module | None = None):
        if model.device.type != "cpu":
            raise AOTStepError(f"the ahead-of-time {self.what} is built for CPU models only")
        if model.dtype != torch.float32 or not kernels.available():
            # bf16 activations or the torch paths switch kernels (gathered vs grouped experts...) inside 1..8 rows
            raise AOTStepError(f"the ahead-of-time {self.what} needs an fp32 model and the native kernels (got "
                               f"{model.dtype}, kernels {'on' if kernels.available() else 'off'})")
        self.model, self.T, self.K = model, T, K
        self._module, self.kv_keys, self.state_keys = _programs(model, cache, self.kind, T, K, draft_head, draft_mtp)
        self.block_size = cache.block_size
        path = package_path(model, cache, self.kind, T, K, draft_head, draft_mtp)
        if not path.is_file():
            t0 = time.perf_counter()
            message = f"compiling the ahead-of-time {self.what} (once per model shape and version; ~1 min)"
            if log_fn is not None:
                log_fn(message)
            else:  # like the kernels' build: a long silent wait at start is worse than a line on stderr
                print(f"qwen3next: {message}; QWEN3NEXT_AOT=0 skips it", file=sys.stderr, flush=True)
            self._compile(cache, path)
            log.info("AOT %s compiled in %.1f s: %s", self.what, time.perf_counter() - t0, path)
        try:
            self._runner = torch._inductor.aoti_load_package(str(path))
            names = dict(self._module.named_parameters(remove_duplicate=False))
            names.update(self._module.named_buffers(remove_duplicate=False))
            wanted = self._runner.get_constant_fqns()
            missing = [n for n in wanted if n not in names]
            if missing:
                raise AOTStepError(f"the cached package {path} wants weights the model lacks: {missing[:3]}")
            self._runner.load_constants({n: names[n] for n in wanted}, check_full_update=True, user_managed=True)
            self._run = _direct_call(self._runner)
        except AOTStepError:
            raise
        except Exception as e:  # a corrupt or foreign package: rebuild next time (not for a full disk and the like)
            if not isinstance(e, OSError):
                path.unlink(missing_ok=True)
            raise AOTStepError(f"loading the ahead-of-time {self.what} failed ({type(e).__name__}: {e})") from e

    def _example(self, cache: HybridCache) -> tuple[list[torch.Tensor], list]:
        """Example inputs on a small cache of `cache`'s layout (the trace only reads shapes), and their dynamic
        dimensions."""
        raise NotImplementedError

    def _compile(self, cache: HybridCache, path: Path) -> None:
        import torch._inductor.config as inductor_config

        try:
            example, dynamic = self._example(cache)
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
            raise AOTStepError(f"the ahead-of-time {self.what} failed to build ({type(e).__name__}: {first})") from e

    def _example_cache(self, cache: HybridCache, B: int, blocks_per_seq: int) -> HybridCache:
        B = max(B, 2)  # the pools' sizes are dynamic dimensions of at least 2
        return HybridCache(cache.config, num_slots=B, num_blocks=blocks_per_seq * B, block_size=cache.block_size,
                           dtype=cache.dtype, device=cache.device, state_dtype=cache.state_dtype, layout=cache.layout,
                           kv_dtype=cache.kv_dtype)

    def _multi_token_example(self, cache: HybridCache, positions: int) -> tuple[HybridCache, BatchInfo, dict | None,
                                                                               dict | None, dict]:
        """For the speculative programs: an example batch of 2 sequences (1 when only 1 fits) feeding T tokens after
        2 cached ones, on a small cache of `cache`'s layout whose tables hold `positions` more per sequence, and the
        dynamic dimensions of a per-sequence input, a per-row input (T rows per sequence) and the block tables. With
        room for one sequence only (max_verify_batch(T) == 1: k = 4) the batch dimensions are static (None)."""
        from torch.export import Dim

        T = self.T
        B = min(2, max_verify_batch(T))
        example_cache = self._example_cache(cache, B, 2 + -(-positions // cache.block_size))
        nb = example_cache.num_blocks // B
        batch = BatchInfo([T] * B, [2] * B, list(range(B)), [list(range(nb * i, nb * (i + 1))) for i in range(B)])
        blocks = Dim("blocks", min=1)
        if max_verify_batch(T) == 1:
            return example_cache, batch, None, None, {1: blocks}
        b = Dim("batch", min=1, max=max_verify_batch(T))
        return example_cache, batch, {0: b}, {0: T * b}, {0: b, 1: blocks}

    def _pool_dims(self) -> tuple:
        from torch.export import Dim

        n = len(self.kv_keys)
        return tuple([{0: Dim("kv_rows", min=2)}] * (2 * n) + [{0: Dim("slots", min=2)}] * len(self.state_keys))

    def _pools(self, cache: HybridCache) -> list[torch.Tensor]:
        return pool_tensors(cache, self.kv_keys, self.state_keys)


class AOTDecodeStep(_AOTProgram):
    """An AOTInductor-compiled decode step for `model` (batches of 1..MAX_BATCH sequences, one token each).

    Build with `AOTDecodeStep(model, cache)` (compiles, or loads a cached package); `handles(batch)` says whether a
    step can take it, `run(tokens, batch, cache)` runs it. Raises AOTStepError when export, compilation or loading
    fails.
    """

    def _example(self, cache: HybridCache) -> tuple[list[torch.Tensor], list]:
        from torch.export import Dim

        B = 2
        example_cache = self._example_cache(cache, B, 2)
        batch = BatchInfo([1] * B, [2] * B, list(range(B)), [[2 * i, 2 * i + 1] for i in range(B)])
        example = self._inputs(torch.zeros(B, dtype=torch.long), batch, example_cache)
        b = Dim("batch", min=1, max=MAX_BATCH)
        dynamic = [{0: b}, {0: b}, {0: b}, {0: b, 1: Dim("blocks", min=1)}, {0: Dim("keys", min=2)}, self._pool_dims()]
        return example, dynamic

    def _inputs(self, tokens: torch.Tensor, batch: BatchInfo, cache: HybridCache) -> list[torch.Tensor]:
        return [tokens, *_tables(batch, tokens.device), torch.arange(max(batch.context_lens) + 1, device=tokens.device),
                *self._pools(cache)]

    @staticmethod
    def handles(batch: BatchInfo) -> bool:
        """Whether a forward over `batch` can take this step: a decode step of at most MAX_BATCH sequences."""
        return (fast_decode() and batch.batch_size <= MAX_BATCH and all(n == 1 for n in batch.seq_lens)
                and batch.context_lens is not None and batch.slots is not None and batch.block_tables is not None
                and not batch.capture_states and not batch.snapshots)

    def run(self, tokens: torch.Tensor, batch: BatchInfo,
            cache: HybridCache) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flat tokens [B] of a decode step `batch` (not prepared: only its context lengths, slots and block
        tables are read) -> (final normed hidden states [B, D], logits [B, V] fp32, their argmax [B]); `cache`'s
        K/V rows and DeltaNet states are updated in place."""
        _check_step(batch, cache, [c + 1 for c in batch.context_lens])
        hidden, logits, argmax = self._run(*self._inputs(tokens, batch, cache))
        return hidden, logits, argmax

    def run_steps(self, tokens: torch.Tensor, batch: BatchInfo, cache: HybridCache, n: int,
                  keep_hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`n` decode steps in a row from flat tokens [B] of a decode step `batch` (its block tables hold n more
        tokens), each feeding the argmax the one before computed -> (those argmaxes [n, B], with `keep_hidden` the
        steps' final normed hidden states [n, B, D], else None). The inputs are built once and advanced as tensors:
        between two steps there is one call and one add."""
        _check_step(batch, cache, [c + n for c in batch.context_lens])
        context_lens, slots, tables = _tables(batch, tokens.device)
        first = max(batch.context_lens) + 1
        key_pos = torch.arange(first + n - 1, device=tokens.device)
        pools = self._pools(cache)
        picked, hidden = [], []
        for i in range(n):
            if i:
                context_lens = context_lens + 1
            h, _, tokens = self._run(tokens, context_lens, slots, tables, key_pos[:first + i], *pools)
            picked.append(tokens)
            if keep_hidden:
                hidden.append(h)
        return torch.stack(picked), torch.stack(hidden) if keep_hidden else None


def _direct_call(package) -> Callable[..., object]:
    """A loaded package's call without the per-call work of its `__call__` (parsing both tree specs from JSON and
    walking the inputs as a pytree: ~0.1 ms, an eighth of a demo-model step). Our programs take tensors only, as
    positional arguments, so the flat input list is the argument list; the output tree is rebuilt from the spec
    parsed once. Checked against the package's own flattening on the first call; where they differ, every call goes
    through the package's `__call__`."""
    in_spec_json, out_spec_json = package.loader.get_call_spec()
    in_spec, out_spec = pytree.treespec_loads(in_spec_json), pytree.treespec_loads(out_spec_json)
    boxed_run = package.loader.boxed_run
    direct: bool | None = None  # None: not checked yet

    def call(*inputs: torch.Tensor):
        nonlocal direct
        if direct is None:
            flat, spec = pytree.tree_flatten((inputs, {}))
            direct = spec == in_spec and len(flat) == len(inputs) and all(a is b for a, b in zip(flat, inputs))
        if not direct:
            return package(*inputs)
        return pytree.tree_unflatten(boxed_run(list(inputs)), out_spec)

    return call


def max_verify_batch(T: int) -> int:
    """The most sequences a verification (or drafting) program of T tokens per sequence serves: MAX_BATCH rows."""
    return MAX_BATCH // T


class AOTVerifyStep(_AOTProgram):
    """An AOTInductor-compiled speculative verification of T tokens per sequence (1..max_verify_batch(T)
    sequences): `run(tokens, batch, cache)` -> (hidden states [B * T, D], the captured DeltaNet states in
    `state_keys` order, [B, T, ...] each, logits [B * T, V] fp32 and their argmax [B * T]); the K/V of all T
    positions are written, no state is committed."""

    kind, what = "verify", "speculative verification"

    def _example(self, cache: HybridCache) -> tuple[list[torch.Tensor], list]:
        from torch.export import Dim

        example_cache, batch, per_seq, per_row, tables = self._multi_token_example(cache, self.T)
        example = self._inputs(torch.zeros(batch.num_tokens, dtype=torch.long), batch, example_cache)
        dynamic = [per_row, per_seq, per_seq, tables, {0: Dim("keys", min=self.T + 1)}, self._pool_dims()]
        return example, dynamic

    def _inputs(self, tokens: torch.Tensor, batch: BatchInfo, cache: HybridCache) -> list[torch.Tensor]:
        return [tokens, *_tables(batch, tokens.device),
                torch.arange(max(batch.context_lens) + self.T, device=tokens.device), *self._pools(cache)]

    def handles(self, batch: BatchInfo) -> bool:
        return (fast_decode() and batch.capture_states and not batch.snapshots
                and 1 <= batch.batch_size <= max_verify_batch(self.T) and all(n == self.T for n in batch.seq_lens)
                and batch.context_lens is not None and batch.slots is not None and batch.block_tables is not None)

    def run(self, tokens: torch.Tensor, batch: BatchInfo,
            cache: HybridCache) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor]:
        _check_step(batch, cache, [c + self.T for c in batch.context_lens])
        hidden, logits, argmax, *captured = self._run(*self._inputs(tokens, batch, cache))
        return hidden, captured, logits, argmax


def drafts_fit(batch: BatchInfo, keep: list[int], K: int, block_size: int) -> bool:
    """Whether every sequence's blocks in `batch` hold the K - 1 positions drafted after its last kept token (it
    keeps keep[b] of its verified tokens): what a drafting program (ahead-of-time or CUDA graph) writes K/V at."""
    return all(c + n - 1 + K - 1 < len(t) * block_size
               for c, n, t in zip(batch.context_lens, keep, batch.block_tables))


class AOTDraftStep(_AOTProgram):
    """An AOTInductor-compiled commit + MTP drafting after a verification of T tokens per sequence (see
    `_DraftModule`): `run(...)` -> drafts [B, K]."""

    kind, what = "draft", "MTP drafting step"

    def __init__(self, model: Qwen3NextForCausalLM, cache: HybridCache, log_fn=None, T: int = 2, K: int = 1,
                 draft_head: nn.Module | None = None, draft_mtp: nn.Module | None = None):
        if model.mtp is None or "mtp0" not in cache.k:
            raise AOTStepError("the ahead-of-time MTP drafting step needs a model with an MTP head and its K/V pools")
        super().__init__(model, cache, log_fn, T, K, draft_head, draft_mtp)

    def _example(self, cache: HybridCache) -> tuple[list[torch.Tensor], list]:
        from torch.export import Dim

        T, K = self.T, self.K
        example_cache, batch, per_seq, per_row, tables = self._multi_token_example(cache, T + K)
        B, D = batch.batch_size, self.model.config.hidden_size
        captured = [torch.zeros(B, T, *example_cache.state[k][n].shape[1:], dtype=example_cache.state[k][n].dtype)
                    for k, n in self.state_keys]
        example = self._inputs(torch.zeros(B * T, D), torch.zeros(B * T, dtype=torch.long),
                               torch.zeros(B, dtype=torch.long), torch.ones(B, dtype=torch.long), batch, captured,
                               example_cache)
        dynamic = [per_row, per_row, per_seq, per_seq, per_seq, per_seq, tables, {0: Dim("keys", min=T + K)},
                   tuple(per_seq for _ in captured) + self._pool_dims()]
        return example, dynamic

    def _inputs(self, hidden: torch.Tensor, tokens: torch.Tensor, bonus: torch.Tensor, keep: torch.Tensor,
                batch: BatchInfo, captured: list[torch.Tensor], cache: HybridCache) -> list[torch.Tensor]:
        device = tokens.device
        return [hidden, tokens, bonus, keep, *_tables(batch, device),
                torch.arange(max(batch.context_lens) + self.T + self.K - 1, device=device), *captured,
                *self._pools(cache)]

    def handles(self, batch: BatchInfo, keep: list[int]) -> bool:
        """Whether the drafts after `batch`'s verification (keeping keep[b] tokens of sequence b) fit the program
        (`drafts_fit`)."""
        return drafts_fit(batch, keep, self.K, self.block_size)

    def run(self, hidden: torch.Tensor, tokens: torch.Tensor, bonus: list[int], keep: list[int], batch: BatchInfo,
            captured: list[torch.Tensor], cache: HybridCache) -> torch.Tensor:
        device = tokens.device
        return self._run(*self._inputs(hidden, tokens, torch.tensor(bonus, dtype=torch.long, device=device),
                                          torch.tensor(keep, dtype=torch.long, device=device), batch, captured, cache))
