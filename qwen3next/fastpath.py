"""The switch for the inference fast paths (the decode step of DeltaNet, attention and the MoE).

They run only without autograd; each has the plain code it replaces as its reference twin, and the tests compare the
two. `QWEN3NEXT_FAST_DECODE=0` in the environment (or `set_fast_decode(False)`) runs the plain code everywhere.
"""

from __future__ import annotations

import os

import torch

_enabled = os.environ.get("QWEN3NEXT_FAST_DECODE", "1") != "0"


def fast_decode() -> bool:
    """True where a fast path may run: enabled, and no autograd graph is being recorded."""
    return _enabled and not torch.is_grad_enabled()


def set_fast_decode(enabled: bool) -> bool:
    """Turn the fast paths on or off; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


class CompileDecodeError(RuntimeError):
    """torch.compile of the decode step failed on this machine (no C++ compiler, unsupported op, ...)."""
