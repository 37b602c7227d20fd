"""Progress bars for long work (loading, quantizing, saving a model): tqdm on stderr, for people at a terminal.

Quiet when stderr is not a terminal (pipes, logs, pytest, servers under a supervisor), and when the `qwen3next`
logger is set to WARNING or above: `logging.getLogger("qwen3next").setLevel(logging.WARNING)`. The bar is a no-op
object then, with the same methods, so callers never branch on it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

LOGGER = "qwen3next"


def progress_enabled() -> bool:
    """Whether a bar would be drawn now: stderr is a terminal and the `qwen3next` logger's own level is not set to
    WARNING or above (an unset level, NOTSET, shows bars)."""
    level = logging.getLogger(LOGGER).level
    if level != logging.NOTSET and level >= logging.WARNING:
        return False
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # no stderr, or a closed one
        return False


def progress(iterable: Iterable | None = None, *, total: float | None = None, desc: str | None = None,
             unit: str = "it", unit_scale: bool = False):
    """A tqdm bar on stderr (disabled, i.e. silent, unless `progress_enabled()`); usable as an iterable wrapper or,
    with `total`, as a context manager whose `update(n)` advances it."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale, unit_divisor=1024 if unit_scale
                else 1000, disable=not progress_enabled(), dynamic_ncols=True, file=sys.stderr)
