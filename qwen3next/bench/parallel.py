"""`qwen3next bench --tensor-parallel-size N`: one process against N tensor-parallel ranks on this machine.

1. Load: the peak resident memory (VmHWM) of every rank while loading the model on N ranks, against one process
   loading it whole; each configuration in a fresh subprocess (peak memory only grows within a process).
2. Decode: one engine on 1 rank and one on N ranks, both alive; per batch size an untimed warmup round, then
   `--repeat` interleaved rounds (1 rank, then N). Greedy, EOS ignored, `--decode-tokens` per request after a
   `--prompt-len` random-token prompt; the clock starts once every request has its first token. Reported: tok/s
   and ms per step of both (medians), and on the N-rank engine the time rank 0 spends in collectives per step
   (waiting for the other ranks included) and the all-reduces per step.
Each rank runs `--threads` torch threads (default 1): N ranks use N cores.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..engine.llm import Engine
from ..engine.sampling import SamplingParams
from . import measure


@dataclass
class ParallelBenchOptions:
    world: int = 2
    batches: list[int] = field(default_factory=lambda: [1, 8])
    prompt_len: int = 128
    decode_tokens: int = 32
    rounds: int = 3
    threads: int = 1
    dtype: str = "float32"


_LOAD = """
import json, sys, torch
torch.set_num_threads({threads})
from qwen3next.engine.llm import Engine
from qwen3next.parallel.engine import peak_rss
e = Engine({model!r}, dtype={dtype!r}, max_memory="64MiB", max_model_len=256, tensor_parallel_size={world},
           skip_tokenizer_init=True)
if e.tp is None:
    stats = [dict(rank=0, peak_rss=peak_rss())]
else:
    stats = e.tp.stats()
e.close()
print(json.dumps(stats))
"""


def load_peak_rss(model: str, world: int, dtype: str, threads: int) -> list[int]:
    """Peak resident bytes of every rank while a fresh process (and its workers) loads `model` on `world` ranks."""
    code = _LOAD.format(model=model, dtype=dtype, world=world, threads=threads)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    if r.returncode:
        raise RuntimeError(f"loading on {world} rank(s) failed: {r.stderr.strip().splitlines()[-1:]}")
    return [s["peak_rss"] for s in json.loads(r.stdout.strip().splitlines()[-1])]


def _run(engine: Engine, prompts: list[list[int]], tokens: int) -> tuple[float, int, int, float, int]:
    """(seconds, tokens, steps, rank 0's collective seconds, all-reduces) of the timed window of one batch."""
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    reqs = [engine.add_request(p, params) for p in prompts]
    while any(not r.samples[0].out.token_ids for r in reqs):
        engine.step()
    comm = engine.tp.comm if engine.tp is not None else None
    before = sum(len(r.samples[0].out.token_ids) for r in reqs)
    steps, comm_s, reduces = engine.stats["steps"], comm.seconds if comm else 0.0, comm.num_all_reduce if comm else 0
    t0 = time.perf_counter()
    while engine.step():
        pass
    seconds = time.perf_counter() - t0
    return (seconds, sum(len(r.samples[0].out.token_ids) for r in reqs) - before, engine.stats["steps"] - steps,
            (comm.seconds - comm_s) if comm else 0.0, (comm.num_all_reduce - reduces) if comm else 0)


def bench_parallel(opts: ParallelBenchOptions, model_dir: str, vocab_size: int, seed: int,
                   log: Callable[[str], None]) -> dict:
    torch.set_num_threads(opts.threads)
    rss = {}
    for world in (1, opts.world):
        rss[world] = load_peak_rss(model_dir, world, opts.dtype, opts.threads)
        log(f"load peak RSS on {world} rank(s): {[f'{b / 2**20:.0f} MiB' for b in rss[world]]}")
    max_len = opts.prompt_len + opts.decode_tokens + 8
    engines = {w: Engine(model_dir, dtype=opts.dtype, max_num_seqs=max(opts.batches), max_model_len=max_len,
                         tensor_parallel_size=w, skip_tokenizer_init=True, enable_prefix_caching=False)
               for w in (1, opts.world)}
    try:
        rows = []
        for batch in opts.batches:
            prompts = [row.tolist() for row in measure.random_prompts(vocab_size, batch, opts.prompt_len, seed + 5)]
            runs: dict[int, list] = {w: [] for w in engines}
            for r in range(opts.rounds + 1):
                for w, engine in engines.items():
                    run = _run(engine, prompts, opts.decode_tokens)
                    if r:
                        runs[w].append(run)
            one, many = runs[1], runs[opts.world]
            row = {"batch": batch,
                   "tok_s_1": statistics.median(t / s for s, t, *_ in one),
                   f"tok_s_{opts.world}": statistics.median(t / s for s, t, *_ in many),
                   "step_ms_1": statistics.median(1e3 * s / n for s, _, n, *_ in one),
                   f"step_ms_{opts.world}": statistics.median(1e3 * s / n for s, _, n, *_ in many),
                   "comm_us_per_step": statistics.median(1e6 * c / n for _, _, n, c, _ in many),
                   "all_reduces_per_step": statistics.median(k / n for _, _, n, _, k in many)}
            row["speedup"] = row[f"tok_s_{opts.world}"] / row["tok_s_1"]
            log(f"tp batch {batch}: {row['tok_s_1']:.1f} tok/s on 1 rank, {row[f'tok_s_{opts.world}']:.1f} on "
                f"{opts.world} (x{row['speedup']:.2f}); collectives {row['comm_us_per_step']:.0f} us per step")
            rows.append(row)
        stats = engines[opts.world].tp.stats()
    finally:
        for engine in engines.values():
            engine.close()
    return {"world": opts.world, "load_peak_rss": {str(w): v for w, v in rss.items()}, "decode": rows,
            "rank_stats_end": stats}


def format_section(section: dict, aligned: Callable[[list[list[str]], int], list[str]]) -> list[str]:
    w = section["world"]
    one, many = section["load_peak_rss"]["1"], section["load_peak_rss"][str(w)]
    lines = [f"tensor parallelism: 1 rank vs {w} ranks (1 process per rank; collectives through shared memory)",
             f"  load peak RSS: 1 rank {one[0] / 2**20:.0f} MiB; {w} ranks "
             + ", ".join(f"rank {r} {b / 2**20:.0f} MiB" for r, b in enumerate(many))
             + f" (x{max(many) / one[0]:.2f} of 1 rank)"]
    table = [["batch", "1 rank tok/s", f"{w} ranks tok/s", "speedup", "1 rank ms/step", f"{w} ranks ms/step",
              "collectives us/step", "all-reduces/step"]]
    for r in section["decode"]:
        table.append([str(r["batch"]), f"{r['tok_s_1']:.1f}", f"{r[f'tok_s_{w}']:.1f}", f"{r['speedup']:.2f}",
                      f"{r['step_ms_1']:.2f}", f"{r[f'step_ms_{w}']:.2f}", f"{r['comm_us_per_step']:.0f}",
                      f"{r['all_reduces_per_step']:.0f}"])
    return lines + ["  " + line for line in aligned(table, 1)]


def save_random_model(model, directory: str | None = None) -> str:
    """A random preset model written to a directory (ranks load their shares from files)."""
    d = directory or tempfile.mkdtemp(prefix="qwen3next-tp-")
    model.save_pretrained(d)
    return d
