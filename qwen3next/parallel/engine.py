"""The engine over N tensor-parallel ranks on one machine: rank 0 is the caller's process (it schedules, samples and
talks to clients), ranks 1..N-1 are worker processes that only run the model.

Every rank holds its shard of the model (parallel/shard.py) and of the cache (the layers declare their local heads,
so each rank's `HybridCache` is its share). Per step, rank 0 broadcasts the scheduled batch (`wire_batch`: the
torch-free `ScheduledBatch` with each sequence reduced to what the runner reads) and every rank runs the same
`ModelRunner.execute` on it: the same forwards, hence the same collectives in the same order. Sampling happens on
rank 0 alone; its tokens are broadcast inside the step (`ModelRunner._sample`), so the accepted runs, the committed
DeltaNet states and the MTP drafts agree on every rank.

A worker that dies is noticed by a monitor thread on rank 0 within a second (`TPGroup.error`): the engine then
reports the error (the server's /health answers 503) and the next step fails instead of hanging. So does a step that
failed on rank 0 (`TPGroup.fail`): the workers may be waiting inside it, so the group is not used again. Workers are
daemon processes of rank 0, ignore Ctrl-C (rank 0 decides when they stop) and exit when its group closes or
disappears: no zombies. A worker that dies before it joins the group fails the start at once, not after the
rendezvous timeout.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import os
import resource
import signal
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..checkpoint import load_model, parse_dtype
from ..config import Qwen3NextConfig
from ..engine.memory import CachePlan
from ..engine.scheduler import ScheduledBatch
from ..model.qwen3_next import Qwen3NextForCausalLM
from .comm import TPComm
from .plan import TPPlan, split_range
from .shard import gather_logits

TIMEOUT = datetime.timedelta(minutes=30)  # a collective waits this long (a long prefill on a slow rank) before failing


STATS = "stats"  # the message that asks every rank for `rank_stats`
JOINED = "qwen3next/joined"  # the rendezvous counter of spawned workers (TCPStore key)


def rank_threads(world: int) -> int:
    """torch threads for each rank of `world`: the current setting, but at most this machine's usable CPUs divided
    among the ranks running on it (torchrun's LOCAL_WORLD_SIZE, or all of them): N ranks with every core's worth of
    threads each would oversubscribe the cores, and a rank that waits for a descheduled thread stalls the others at
    the next collective."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cpus // local_ranks(world)))


def local_ranks(world: int) -> int:
    """How many of the `world` ranks run on this machine: all of them when rank 0 spawns them, torchrun's
    LOCAL_WORLD_SIZE under torchrun."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world)) if launched_by_torchrun() else world)


def peak_rss() -> int:
    """This process's peak resident memory in bytes: VmHWM of its address space (getrusage's ru_maxrss would carry
    the peak of the process it was forked from over the exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rank_stats(comm: TPComm) -> dict:
    """This process's peak resident memory (bytes) and its time in collectives."""
    return {"rank": comm.rank, "peak_rss": peak_rss(), "comm_seconds": comm.seconds,
            "num_all_reduce": comm.num_all_reduce}


@dataclass(frozen=True)
class ShardSpec:
    """How every rank loads its shard: the model directory and the load options."""

    model: str
    dtype: str | None
    quantize: str | None
    hf_overrides: dict | None
    world: int
    threads: int
    kv_cache_dtype: str | torch.dtype | None = None  # the engine's `kv_cache_dtype` (None / "auto": activations')


def load_shard(spec: ShardSpec, comm: TPComm) -> Qwen3NextForCausalLM:
    """This rank's shard: its share of the checkpoint, loaded layer by layer (only its experts and vocabulary rows read;
    peak: the share + one layer's non-expert part), then quantized when asked."""
    plan = TPPlan(Qwen3NextConfig.from_pretrained(spec.model, spec.hf_overrides), comm.world, comm.rank)
    model = load_model(spec.model, dtype=parse_dtype(spec.dtype), hf_overrides=spec.hf_overrides,
                       shard=(plan, comm))
    if spec.quantize is not None:
        from ..checkpoint import quantize_bits
        from ..quant import quantize_model

        bits = quantize_bits(spec.quantize)
        quantize_model(model, bits, row_absmax=full_row_absmax(model, comm) if bits == 8 else None)
        V = model.config.vocab_size
        gather_logits(model, comm, [b - a for a, b in (split_range(V, comm.world, r) for r in range(comm.world))])
    return model


def full_row_absmax(model: Qwen3NextForCausalLM, comm: TPComm) -> dict[str, torch.Tensor]:
    """Per row-parallel Linear of this shard (o_proj, out_proj, the MLPs' down_proj: each rank holds part of every
    row), the largest |w| of each whole row: the maximum over the ranks, in one all-reduce. int8's per-row scales
    then equal one rank's, and so does the quantized model (int4's groups of 64 inputs already match wherever the
    split falls on a multiple of 64, as in the 80B at 2, 4 and 8 ranks)."""
    names = [n for n, m in model.named_modules() if getattr(m, "tp_partial_rows", False)]
    if comm.world == 1 or not names:
        return {}
    parts = [model.get_submodule(n).weight.detach().abs().amax(-1).float() for n in names]
    flat = torch.cat(parts)
    dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=comm.group)
    return dict(zip(names, flat.split([p.numel() for p in parts])))


@dataclass
class _SeqView:
    """What the runner reads of a sequence on a worker (no token history, no grammar: rank 0 samples and drafts
    constrained sequences, the workers take its tokens)."""

    request_id: str
    block_table: list[int]
    slot: int | None
    params: object
    sample_index: int
    draft_token_ids: list[int]
    constrained: bool
    grammar: None = None


def wire_batch(batch: ScheduledBatch) -> ScheduledBatch:
    """A copy of `batch` to send to the workers: each entry's sequence replaced by a `_SeqView`, so the message
    does not grow with the sequences' histories."""
    out = copy.copy(batch)
    views = {}
    entries = []
    for e in batch.entries:
        s = e.seq
        view = views.get(id(s))
        if view is None:
            params = dataclasses.replace(s.params, structured_outputs=None) if s.params.structured_outputs else s.params
            view = views[id(s)] = _SeqView(s.request_id, list(s.block_table), s.slot, params, s.sample_index,
                                           list(s.draft_token_ids), s.constrained)
        entries.append(dataclasses.replace(e, seq=view, restore=None))
    out.entries = entries
    return out


def _exit_if_orphaned(parent: int) -> None:
    """A worker whose rank 0 is gone (its parent changed) leaves instead of waiting forever."""
    if os.getppid() != parent:
        raise SystemExit("tensor-parallel rank 0 exited")


def launched_by_torchrun() -> bool:
    """This process is one of the ranks torchrun started (RANK / WORLD_SIZE / MASTER_ADDR in the environment)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def torchrun_rank(world: int) -> int:
    """This torchrun rank; its WORLD_SIZE must be the tensor-parallel size."""
    size = int(os.environ["WORLD_SIZE"])
    if size != world:
        raise ValueError(f"tensor_parallel_size: {world}, but torchrun started {size} processes (WORLD_SIZE); give "
                         f"--nnodes x --nproc-per-node = --tensor-parallel-size")
    return int(os.environ["RANK"])


def run_torchrun_worker(spec: ShardSpec, num_speculative_tokens: int) -> None:
    """A rank > 0 under torchrun: join the group and run the model for rank 0 until it closes the group."""
    _worker(torchrun_rank(spec.world), spec, None, num_speculative_tokens)


def _worker(rank: int, spec: ShardSpec, port: int | None, num_speculative_tokens: int) -> None:
    """A worker rank: spawned by rank 0 (`port`: rank 0's TCPStore on loopback), or started by torchrun (None: the
    environment's rendezvous)."""
    torch.set_num_threads(spec.threads)
    if port is None:
        dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=spec.world, timeout=TIMEOUT)
    else:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal reaches the whole process group
        store = dist.TCPStore("127.0.0.1", port, spec.world, is_master=False, timeout=TIMEOUT)
        store.add(JOINED, 1)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=spec.world, timeout=TIMEOUT)
    try:
        from ..engine.runner import ModelRunner
        from ..model.cache import resolve_kv_cache_dtype

        comm = TPComm()
        parent = os.getppid()
        if comm.shm is not None and port is not None:
            comm.shm.check = lambda: _exit_if_orphaned(parent)
        model = load_shard(spec, comm)
        plan = comm.broadcast_object(None)  # rank 0's cache plan: the same pools everywhere
        if plan is None:  # rank 0 gave up while setting up (its error is reported there)
            return
        runner = ModelRunner(model, plan, num_speculative_tokens=num_speculative_tokens, tp=comm,
                             kv_cache_dtype=resolve_kv_cache_dtype(spec.kv_cache_dtype, model.dtype))
        while True:
            msg = comm.broadcast_object(None)
            if msg is None:
                break
            if isinstance(msg, str) and msg == STATS:
                dist.gather_object(rank_stats(comm), None, dst=0)
                continue
            runner.execute(msg)
    finally:
        dist.destroy_process_group()


class TPGroup:
    """Rank 0's side: starts the workers, joins the group, broadcasts steps, watches the workers."""

    def __init__(self, spec: ShardSpec, num_speculative_tokens: int):
        if dist.is_initialized():
            raise ValueError("tensor_parallel_size: this process already belongs to a torch.distributed group; run "
                             "one tensor-parallel engine per process")
        self.spec = spec
        self._error: str | None = None
        self._closed = False
        self.workers = []
        try:
            if launched_by_torchrun():  # the other ranks are torchrun's, maybe on other machines
                if torchrun_rank(spec.world) != 0:
                    raise ValueError("tensor_parallel_size: only torchrun's rank 0 builds the engine; the others run "
                                     "parallel.engine.run_torchrun_worker (the CLI does this)")
                dist.init_process_group("gloo", init_method="env://", rank=0, world_size=spec.world, timeout=TIMEOUT)
            else:
                self._spawn(spec, num_speculative_tokens)
            self.comm = TPComm()
        except BaseException:
            self._kill()
            if dist.is_initialized():
                dist.destroy_process_group()
            raise
        if self.comm.shm is not None:  # a wait on a dead worker ends with its error
            self.comm.shm.check = self._check_peers
        self._monitor = threading.Thread(target=self._watch, name="qwen3next-tp-monitor", daemon=True)
        self._monitor.start()

    def _spawn(self, spec: ShardSpec, num_speculative_tokens: int) -> None:
        """Start ranks 1..N-1 as processes of this one and join them over a TCPStore on loopback. Until every worker
        has reached the store, their liveness is polled: one that dies while starting (an import error, the memory
        limit) fails the start now instead of leaving rank 0 in the rendezvous for its whole timeout."""
        store = dist.TCPStore("127.0.0.1", 0, spec.world, is_master=True, timeout=TIMEOUT, wait_for_workers=False)
        ctx = mp.get_context("spawn")
        self.workers = [ctx.Process(target=_worker, args=(r, spec, store.port, num_speculative_tokens), daemon=True,
                                    name=f"qwen3next-tp{r}") for r in range(1, spec.world)]
        for p in self.workers:
            p.start()
        deadline = time.monotonic() + TIMEOUT.total_seconds()
        while store.add(JOINED, 0) < spec.world - 1:
            dead = self._dead_worker()
            if dead is not None:
                raise RuntimeError(f"tensor-parallel worker rank {dead[0]} exited while starting (exit code "
                                   f"{dead[1]}); its error is printed above")
            if time.monotonic() > deadline:
                raise RuntimeError(f"tensor-parallel workers did not start within {TIMEOUT}")
            time.sleep(0.02)
        dist.init_process_group("gloo", store=store, rank=0, world_size=spec.world, timeout=TIMEOUT)

    def load(self) -> Qwen3NextForCausalLM:
        try:
            return load_shard(self.spec, self.comm)
        except BaseException as e:  # the workers may still be loading: stop them rather than wait for them
            self.fail(f"rank 0 failed to load its shard: {e!r}")
            self.close()
            raise

    def start(self, plan: CachePlan) -> None:
        self.comm.broadcast_object(plan)

    def step(self, batch: ScheduledBatch) -> None:
        self._check()
        self.comm.broadcast_object(wire_batch(batch))

    def _check(self) -> None:
        self._check_error()
        if self._closed:
            raise RuntimeError("the tensor-parallel group is closed")

    def _check_error(self) -> None:
        if self._error is not None:
            raise RuntimeError(self._error)

    def _check_peers(self) -> None:
        """During a long wait on the other ranks: raise when the group is broken or a local worker is gone (polled
        here too, not only by the monitor, which stops when `close` starts)."""
        self._check_error()
        if self._note_dead_worker():
            self._check_error()

    def _dead_worker(self) -> tuple[int, int | None] | None:
        """(rank, exit code) of the first local worker that is gone, or None."""
        return next(((r, p.exitcode) for r, p in enumerate(self.workers, start=1) if not p.is_alive()), None)

    def _note_dead_worker(self) -> bool:
        """Record a gone local worker as the group's error (if it has none yet); whether one is gone."""
        dead = self._dead_worker()
        if dead is not None:
            self._set_error(f"tensor-parallel worker rank {dead[0]} exited (exit code {dead[1]})")
        return dead is not None

    def _set_error(self, reason: str) -> None:
        if self._error is None:  # the first cause stays
            self._error = reason

    def fail(self, reason: str) -> None:
        """Mark the group broken (a step failed on rank 0, and the workers may be waiting inside it): later steps
        raise `reason`, and `close` stops the workers without a goodbye message they could not receive."""
        self._set_error(reason)

    def stats(self) -> list[dict]:
        """`rank_stats` of every rank, rank 0 first (between steps)."""
        self._check()
        self.comm.broadcast_object(STATS)
        out = [None] * self.spec.world
        dist.gather_object(rank_stats(self.comm), out, dst=0)
        return out

    @property
    def error(self) -> str | None:
        """Why the group is broken (a worker died, a step failed), or None."""
        return self._error

    def _watch(self) -> None:
        while not self._closed:  # workers leaving at close are no error
            if self._dead_worker() is not None and not self._closed:
                self._note_dead_worker()
                return
            threading.Event().wait(0.25)

    def close(self) -> None:
        """Stop the workers: a healthy group tells them to leave and waits for them; a broken one (a worker dead, a
        step failed) kills the local workers at once, since they may be waiting for a rank that will not answer.
        Under torchrun, the remote ranks of a broken group end when this process exits (torchrun stops a job whose
        rank failed)."""
        if self._closed:
            return
        self._closed = True
        try:  # Ctrl-C while closing still kills the workers and ends the group (`finally`)
            if self._error is None:
                try:
                    self.comm.broadcast_object(None)  # its wait polls the workers' liveness (`_check_peers`)
                except Exception as e:  # a worker died meanwhile: the others are killed below
                    self._set_error(f"closing: {e!r}")
            if self._error is None:
                for p in self.workers:
                    p.join(timeout=10)
        finally:
            self._kill()
            if dist.is_initialized():
                dist.destroy_process_group()

    def _kill(self) -> None:
        for p in self.workers:
            if p.pid is None:  # never started (starting an earlier one failed)
                continue
            if p.is_alive():
                p.kill()
            p.join(timeout=5)
