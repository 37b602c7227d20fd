"""The CPU settings of a training run: denormal flushing, the thread count, and whether bf16 autocast is fast here."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch


def configure_cpu(threads: int | None) -> None:
    """Flush denormals to zero and use `threads` threads (default: every core this process may run on)."""
    # Tiny activations and gradients in the denormal range made training steps 5-7x slower on x86 CPUs.
    torch.set_flush_denormal(True)
    if threads is not None:
        torch.set_num_threads(threads)
    else:
        torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())


def cpu_has_fast_bf16() -> bool | None:
    """Whether the CPU has native bf16 matmul units (AVX512-BF16 or AMX); None when unknown (not Linux)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


def warn_if_bf16_is_emulated() -> None:
    """Warn (stderr) when this CPU is known to lack native bf16 units, where bf16 autocast is much slower."""
    if cpu_has_fast_bf16() is False:
        print("warning: this CPU has no AVX512-BF16/AMX, so bf16 autocast matmuls are emulated (measured ~30x slower "
              "than fp32 on an AVX2 EPYC); consider dropping --bf16", file=sys.stderr)
