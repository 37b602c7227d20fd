"""Run the commands that run a model on tcmalloc (or jemalloc) when the system has one.

torch allocates a decode step's intermediate tensors anew every step (AOTInductor's programs and the native kernels
too), and glibc's malloc spends several per cent of a small model's step in `malloc` / `free` / `malloc_consolidate`;
tcmalloc's per-thread caches make those calls cheap (the demo model's compiled int4 decode ~1.09x, README "Speed").
An allocator can only be chosen before the process starts, so `qwen3next generate | chat | serve | bench | eval |
train` re-execute themselves once with it in `LD_PRELOAD` (what torch's and vLLM's CPU launchers set up by hand).
`QWEN3NEXT_MALLOC=system` keeps the system's malloc; an `LD_PRELOAD` that already names an allocator is left alone.
Torch-free: this runs before anything heavy is imported.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

ENV = "QWEN3NEXT_MALLOC"  # "auto" (default): the first allocator found; "system": none; set to the name once chosen
# (allocator, its library file names), in order of preference
ALLOCATORS = (("tcmalloc", ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")), ("jemalloc", ("libjemalloc.so.2",)))
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
RELAUNCH_COMMANDS = ("generate", "chat", "serve", "bench", "eval", "train")


def find_allocator(dirs: tuple[str, ...] = LIB_DIRS) -> tuple[str, str] | None:
    """(name, library path) of the first allocator of ALLOCATORS installed in `dirs`, or None."""
    for name, files in ALLOCATORS:
        for d in dirs:
            for f in files:
                path = os.path.join(d, f)
                if os.path.isfile(path):
                    return name, path
    return None


def relaunch_env(environ: Mapping[str, str], dirs: tuple[str, ...] = LIB_DIRS) -> dict[str, str] | None:
    """The environment to re-run this command in with an allocator preloaded, or None to run it as it is: on Linux,
    with QWEN3NEXT_MALLOC unset or "auto", no allocator in LD_PRELOAD yet, and one installed."""
    if environ.get(ENV, "auto") != "auto" or not sys.platform.startswith("linux"):
        return None
    preload = environ.get("LD_PRELOAD", "")
    if "malloc" in preload:  # tcmalloc, jemalloc, mimalloc...: chosen already
        return None
    found = find_allocator(dirs)
    if found is None:
        return None
    name, path = found
    env = dict(environ)
    env["LD_PRELOAD"] = f"{path}:{preload}" if preload else path
    env[ENV] = name  # the relaunched process does not relaunch again
    # tcmalloc reports every allocation over 1 GiB on stderr (loading a big checkpoint makes many): only past 1 TiB
    env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
    return env


def relaunch_with_allocator(command: str | None) -> None:
    """Re-execute this `qwen3next COMMAND ...` process (`python -m qwen3next.cli` with the same arguments) with an
    allocator preloaded when `relaunch_env` finds one; returns (and the command runs here) otherwise, or if the
    exec fails."""
    if command not in RELAUNCH_COMMANDS:
        return
    env = relaunch_env(os.environ)
    if env is None:
        return
    if getattr(sys.modules.get("__main__"), "__spec__", None) is None:
        # Run as the installed script, which does not import from the current directory: neither does `python -m`
        # here (Python 3.11+; a directory with another `qwen3next` in it would otherwise be run instead).
        env.setdefault("PYTHONSAFEPATH", "1")
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", "qwen3next.cli", *sys.argv[1:]], env)
    except OSError:
        return
