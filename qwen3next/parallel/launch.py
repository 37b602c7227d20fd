"""Start N ranks on this machine: one process each, joined in a torch.distributed group over loopback TCP (gloo on
CPU, NCCL on CUDA). torchrun does the same across machines; a function run here only sees an initialised group."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world: int, port: int, backend: str, threads: int, args: tuple) -> None:
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def run_local(fn: Callable, world: int, *args, backend: str = "gloo", threads: int = 1) -> None:
    """Run `fn(rank, *args)` on `world` local ranks (spawned processes, `threads` torch threads each) and wait; a
    rank's exception is raised here. `fn` must be importable (a module-level function)."""
    mp.start_processes(_entry, args=(fn, world, free_port(), backend, threads, args), nprocs=world,
                       start_method="spawn", join=True)
