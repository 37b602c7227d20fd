"""All-reduce and broadcast through shared memory, for ranks on one machine.

gloo goes through loopback TCP: on the 2-core VMs this project runs on, one gloo all-reduce of a [1, 512] fp32
tensor takes ~1.1-1.6 ms and a barrier ~0.3 ms (bench --tensor-parallel-size), while a decode step of the `small`
preset computes for ~13 ms and needs 17 all-reduces. Here every rank owns two slots of a shared buffer (rank 0's
anonymous memory file, `os.memfd_create`, mapped by every rank through /proc/<pid>/fd with `torch.from_file`: no
name that could outlive a killed process) and a sequence counter:
- all-reduce: write your tensor into your slot for this operation's parity, publish the operation's number, wait
  until every rank has published it, then add all slots in rank order. Every rank computes the same sum in the same
  order: the results are bitwise identical everywhere, as a collective's must be. Two slots per rank make the next
  operation safe to start: a rank that publishes operation n + 1 has finished reading operation n - 1's slots.
- broadcast: the source writes the bytes (a tensor's, or a pickle) and publishes; the others copy them out. The
  next operation's wait (every rank publishes every operation) keeps the source from overwriting them too early.
Waiting spins for a while, then yields, then sleeps in naps that lengthen as the wait goes on (an idle engine's
workers wait for the next step without burning a core). x86's store order (TSO) makes a published number imply the
slot's bytes are visible; other architectures would need fences, so this is used on x86-64 only, gloo elsewhere
(`available`).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

SPIN = 2_000  # polls (a few microseconds each) before yielding the core
LONG_WAIT = 0.002  # seconds of yielding before napping
# Naps between polls, by how long the wait has lasted: short while a peer is busy with its part of a step, longer
# once the engine is idle (a worker waiting for the next step), so an idle worker wakes ~200 times a second instead
# of thousands; the first step after a long idle spell then starts up to one long nap (5 ms) late.
NAPS = ((0.1, 0.0002), (1.0, 0.001), (float("inf"), 0.005))  # (waited less than s, nap s)
CHECK_EVERY = 0.25  # seconds between calls of `check` (is a peer gone?) during a long wait


def available() -> bool:
    return platform.machine() in ("x86_64", "AMD64") and hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")


class ShmChannel:
    """Collectives over a shared buffer among the ranks of `group`, all on this machine. Tensors up to `slot_bytes`
    (larger ones: the caller falls back to gloo)."""

    def __init__(self, group: dist.ProcessGroup | None, world: int, rank: int, slot_bytes: int = 4 << 20):
        self.world, self.rank, self.slot_bytes = world, rank, slot_bytes
        self.check: Callable[[], None] | None = None  # called while a wait lasts: raises when a peer is gone
        self.header = 64 * world  # one int64 counter per rank, each on its own cache line
        size = self.header + 2 * world * slot_bytes
        # An anonymous memory file of rank 0, opened by the others through /proc: nothing is left behind in
        # /dev/shm whenever a process dies (a named file there would leak if rank 0 died before unlinking it).
        fd = None
        if rank == 0:
            fd = os.memfd_create("qwen3next-tp")
            os.ftruncate(fd, size)
        box = [f"/proc/{os.getpid()}/fd/{fd}" if rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=group)
        self.buf = torch.from_file(box[0], shared=True, size=size, dtype=torch.uint8)
        dist.barrier(group=group)  # everyone has it mapped: rank 0's descriptor can go
        if fd is not None:
            os.close(fd)
        self.counters = self.buf[: self.header].view(torch.int64)[::8]  # [world], 64 bytes apart
        self.seq = 0

    def _slot(self, rank: int, parity: int, nbytes: int) -> torch.Tensor:
        start = self.header + (2 * rank + parity) * self.slot_bytes
        return self.buf[start:start + nbytes]

    def _publish_and_wait(self) -> None:
        seq = self.seq
        self.counters[self.rank] = seq
        polls, t0, checked = 0, None, 0.0
        while bool((self.counters < seq).any()):
            polls += 1
            if polls < SPIN:
                continue
            if t0 is None:
                t0 = time.perf_counter()
            waited = time.perf_counter() - t0
            if waited < LONG_WAIT:
                os.sched_yield()
                continue
            time.sleep(next(nap for limit, nap in NAPS if waited < limit))
            if self.check is not None and waited - checked >= CHECK_EVERY:
                checked = waited
                self.check()

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.slot_bytes

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of `t` (contiguous), in place, added in rank order on every rank."""
        self.seq += 1
        parity, flat = self.seq & 1, t.view(-1)
        nbytes = flat.numel() * flat.element_size()
        self._slot(self.rank, parity, nbytes).view(t.dtype).copy_(flat)
        self._publish_and_wait()
        out = self._slot(0, parity, nbytes).view(t.dtype).clone()
        for r in range(1, self.world):
            out += self._slot(r, parity, nbytes).view(t.dtype)
        flat.copy_(out)
        return t

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `t` (contiguous, the same shape on all ranks), in rank order."""
        self.seq += 1
        parity, flat = self.seq & 1, t.reshape(-1)
        nbytes = flat.numel() * flat.element_size()
        self._slot(self.rank, parity, nbytes).view(t.dtype).copy_(flat)
        self._publish_and_wait()
        return [self._slot(r, parity, nbytes).view(t.dtype).clone().view(t.shape) for r in range(self.world)]

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank `src`'s `t` (contiguous) on every rank, in place."""
        self.seq += 1
        parity, flat = self.seq & 1, t.view(-1)
        nbytes = flat.numel() * flat.element_size()
        if self.rank == src:
            self._slot(src, parity, nbytes).view(t.dtype).copy_(flat)
        self._publish_and_wait()
        if self.rank != src:
            flat.copy_(self._slot(src, parity, nbytes).view(t.dtype))
        return t

    def broadcast_bytes(self, data: bytes | None, src: int = 0) -> bytes:
        """`src`'s bytes (at most slot_bytes - 8) on every rank; the others pass None."""
        self.seq += 1
        parity = self.seq & 1
        slot = self._slot(src, parity, self.slot_bytes)
        if self.rank == src:
            if len(data) + 8 > self.slot_bytes:
                raise ValueError(f"broadcast_bytes: {len(data)} bytes exceed the slot ({self.slot_bytes - 8})")
            slot[:8].view(torch.int64)[0] = len(data)
            slot[8:8 + len(data)].copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        self._publish_and_wait()
        if self.rank == src:
            return data
        n = int(slot[:8].view(torch.int64)[0])
        return bytes(slot[8:8 + n].numpy())
