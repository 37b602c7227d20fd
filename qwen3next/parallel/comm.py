"""The collectives a sharded model needs, over one torch.distributed process group (gloo on CPU, NCCL on CUDA)."""

from __future__ import annotations

import pickle
import socket
import time

import torch
import torch.distributed as dist

from .shm import ShmChannel
from .shm import available as shm_available


class TPComm:
    """All-reduce, broadcasts and the vocabulary all-gather among the ranks of `group` (None: the default group):
    through shared memory when every rank is on this machine (parallel/shm.py; `shm=False`: never), else the
    group's backend."""

    def __init__(self, group: dist.ProcessGroup | None = None, shm: bool = True):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.shm = None
        if shm and self.world > 1 and shm_available():
            hosts = [None] * self.world
            dist.all_gather_object(hosts, socket.gethostname(), group=group)
            if len(set(hosts)) == 1:
                self.shm = ShmChannel(group, self.world, self.rank)
        self.num_all_reduce = 0  # counted, for the bench and the tests (one per sublayer)
        self.seconds = 0.0  # spent in collectives (waiting for the other ranks included)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, in place."""
        self.num_all_reduce += 1
        if self.world > 1:
            t0 = time.perf_counter()
            if self._shm_fits(t):
                self.shm.all_reduce(t)
            else:
                dist.all_reduce(t, group=self.group)
            self.seconds += time.perf_counter() - t0
        return t

    def _shm_fits(self, t: torch.Tensor) -> bool:
        return (self.shm is not None and t.is_contiguous() and t.device.type == "cpu"
                and self.shm.fits(t.numel() * t.element_size()))

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank `src`'s tensor on every rank, in place."""
        if self.world > 1:
            t0 = time.perf_counter()
            if self._shm_fits(t):
                self.shm.broadcast(t, src)
            else:
                dist.broadcast(t, src=src, group=self.group)
            self.seconds += time.perf_counter() - t0
        return t

    def broadcast_object(self, obj=None, src: int = 0):
        """Rank `src`'s picklable `obj` on every rank (the others pass None)."""
        if self.world == 1:
            return obj
        if self.shm is not None:
            if self.rank == src:
                data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
                payload = b"\0" + data if len(data) + 9 <= self.shm.slot_bytes else b"\1"
                self.shm.broadcast_bytes(payload, src)
                if payload[0] == 0:
                    return obj
            else:
                got = self.shm.broadcast_bytes(None, src)
                if got[0] == 0:
                    return pickle.loads(got[1:])
        box = [obj]  # too large for the shared slot, or no shared memory
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def all_gather_last(self, t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Rank r's [..., sizes[r]] pieces concatenated along the last dim, on every rank."""
        if self.world == 1:
            return t
        width = max(sizes)
        if t.shape[-1] < width:
            t = torch.nn.functional.pad(t, (0, width - t.shape[-1]))
        t0 = time.perf_counter()
        t = t.contiguous()
        if self._shm_fits(t):
            parts = self.shm.all_gather(t)
        else:
            parts = [torch.empty_like(t) for _ in range(self.world)]
            dist.all_gather(parts, t, group=self.group)
        self.seconds += time.perf_counter() - t0
        return torch.cat([p[..., :n] for p, n in zip(parts, sizes)], dim=-1)
