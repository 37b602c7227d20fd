"""The collectives a sharded model needs, over one torch.distributed process group (gloo on CPU, NCCL on CUDA)."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist


class TPComm:
    """All-reduce and vocabulary all-gather among the ranks of `group` (None: the default group)."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.num_all_reduce = 0  # counted, for the bench and the tests (one per sublayer)
        self.seconds = 0.0  # spent in collectives (waiting for the other ranks included)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, in place."""
        self.num_all_reduce += 1
        if self.world > 1:
            t0 = time.perf_counter()
            dist.all_reduce(t, group=self.group)
            self.seconds += time.perf_counter() - t0
        return t

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank `src`'s tensor on every rank, in place."""
        if self.world > 1:
            t0 = time.perf_counter()
            dist.broadcast(t, src=src, group=self.group)
            self.seconds += time.perf_counter() - t0
        return t

    def all_gather_last(self, t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Rank r's [..., sizes[r]] pieces concatenated along the last dim, on every rank."""
        if self.world == 1:
            return t
        width = max(sizes)
        if t.shape[-1] < width:
            t = torch.nn.functional.pad(t, (0, width - t.shape[-1]))
        parts = [torch.empty_like(t) for _ in range(self.world)]
        t0 = time.perf_counter()
        dist.all_gather(parts, t.contiguous(), group=self.group)
        self.seconds += time.perf_counter() - t0
        return torch.cat([p[..., :n] for p, n in zip(parts, sizes)], dim=-1)
