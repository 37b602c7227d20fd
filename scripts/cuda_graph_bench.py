"""Decode speed on a CUDA GPU through the engine: eager steps vs CUDA graphs (engine/cuda_graph.py), optionally the
torch.compile'd step with and without graphs; in one process, modes interleaved round by round, medians.

    python scripts/cuda_graph_bench.py [--rounds 3] [--modes eager graphs compiled+graphs] [--budget 300]

Models: the demo model (fp32, its tokenizer, real text) and the `small` preset with random weights in bf16 (token
ids). Each case: B requests of a ~100-token prompt, `--new-tokens` (64) new tokens each, ignore_eos; decode tok/s =
tokens emitted by the steps after every request's first token / their time; ms per step likewise. A first, untimed
round per engine captures (or compiles) what the timed rounds use. Greedy tokens of every mode are compared with
eager's (parity). Prints one line per case and a table at the end; `--budget` seconds stops adding rounds (the table
says how many).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwen3next import Qwen3NextForCausalLM  # noqa: E402
from qwen3next.engine.llm import DEFAULT_MODEL, Engine  # noqa: E402
from qwen3next.engine.sampling import SamplingParams  # noqa: E402
from qwen3next.tokenizer import Tokenizer  # noqa: E402
from qwen3next.train.presets import preset_config  # noqa: E402

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of "
        "a wife. However little known the feelings or views of such a man may be on his first entering a "
        "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
        "the rightful property of some one or other of their daughters.")
MTP = {"method": "mtp", "num_speculative_tokens": 2}  # the demo model's trained head; adaptive draft length


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def decode_run(engine: Engine, prompts: list[list[int]], new_tokens: int,
               device: str) -> tuple[float, float, list[list[int]]]:
    """-> (decode tok/s, ms per decode step, the tokens)."""
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    reqs = [engine.add_request(p, params) for p in prompts]
    while any(len(r.output().token_ids) == 0 for r in reqs):
        engine.step()
    sync(device)
    before = sum(len(r.output().token_ids) for r in reqs)
    steps, t0 = 0, time.perf_counter()
    while engine.step():
        steps += 1
    sync(device)
    dt = time.perf_counter() - t0
    emitted = sum(len(r.output().token_ids) for r in reqs) - before
    return emitted / dt, 1e3 * dt / max(steps, 1), [r.output().token_ids for r in reqs]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=["eager", "graphs"],
                    choices=["eager", "graphs", "compiled", "compiled+graphs", "eager+mtp", "graphs+mtp"],
                    help="compiled and MTP modes run on the demo model only (compiling `small` takes minutes; its "
                         "random MTP head guesses nothing)")
    ap.add_argument("--models", nargs="+", default=["demo", "small"], choices=["demo", "small"])
    ap.add_argument("--budget", type=float, default=300.0, help="seconds; no new round starts after this")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cuda", help="cuda (cpu: a dry run of this script, no graphs there)")
    args = ap.parse_args()
    start = time.perf_counter()
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "no GPU"
    print(f"torch {torch.__version__}, {gpu}; TF32 matmul {torch.backends.cuda.matmul.allow_tf32}", flush=True)
    tok = Tokenizer.from_dir(DEFAULT_MODEL)
    demo_prompt = tok.encode(TEXT)[:100]
    if "small" in args.models:
        small = Qwen3NextForCausalLM(preset_config("small"))
        small.init_weights(torch.Generator().manual_seed(0))
        small = small.to(args.device, torch.bfloat16).eval()
        gen = torch.Generator().manual_seed(0)
        small_prompt = torch.randint(0, small.config.vocab_size, (100,), generator=gen).tolist()
    every = {"eager": {"enforce_eager": True}, "graphs": {},
             "compiled": {"compile_decode": True, "enforce_eager": True}, "compiled+graphs": {"compile_decode": True},
             "eager+mtp": {"enforce_eager": True, "speculative_config": MTP}, "graphs+mtp": {"speculative_config": MTP}}
    modes = {m: every[m] for m in dict.fromkeys(["eager", *args.modes])}  # eager: the baseline and the parity
    common = {"max_memory": "4GiB", "max_num_seqs": max(args.batches), "max_model_len": 1024,
              "enable_prefix_caching": False, "device": args.device}
    cases = []  # (model name, mode, engine, prompt)
    for mode, kw in modes.items():
        t = time.perf_counter()
        if "demo" in args.models:
            cases.append(("demo fp32", mode, Engine(DEFAULT_MODEL, **common, **kw), demo_prompt))
            print(f"built demo {mode} in {time.perf_counter() - t:.1f} s", flush=True)
        if "compile_decode" not in kw and "speculative_config" not in kw and "small" in args.models:
            cases.append(("small bf16", mode, Engine(small, skip_tokenizer_init=True, **common, **kw), small_prompt))
    results: dict[tuple, list[tuple[float, float]]] = {}
    reference: dict[tuple, list[list[int]]] = {}
    parity_failures = []
    rounds = 0
    for r in range(args.rounds + 1):  # round 0 warms up (captures, compiles) and is not timed
        if r > 1 and time.perf_counter() - start > args.budget:
            break
        order = cases[r % len(cases):] + cases[:r % len(cases)]
        for name, mode, engine, prompt in order:
            for B in args.batches:
                tps, ms, toks = decode_run(engine, [prompt] * B, args.new_tokens, args.device)
                key = (name, B)
                if mode == "eager" and key not in reference:
                    reference[key] = toks
                if r == 0:
                    continue
                results.setdefault((name, mode, B), []).append((tps, ms))
                if name.startswith("demo") and key in reference and toks != reference[key]:
                    parity_failures.append(f"{name} {mode} B={B}")
                print(f"round {r} {name} {mode} B={B}: {tps:,.0f} tok/s, {ms:.2f} ms/step", flush=True)
        rounds = r
    for name, mode, engine, _ in cases:
        g = engine.runner.graphs
        if g is not None:
            print(f"{name} {mode}: {g.captures} graphs captured, {g.replays} replays, error {g.error}", flush=True)
    print(f"\n| model | B | mode | decode tok/s (median of {rounds}) | ms/step | vs eager |")
    print("|---|---|---|---|---|---|")
    for name in dict.fromkeys(c[0] for c in cases):
        for B in args.batches:
            base = statistics.median(t for t, _ in results[(name, "eager", B)])
            for mode in modes:
                runs = results.get((name, mode, B))
                if not runs:
                    continue
                tps = statistics.median(t for t, _ in runs)
                ms = statistics.median(m for _, m in runs)
                lo, hi = min(t for t, _ in runs), max(t for t, _ in runs)
                print(f"| {name} | {B} | {mode} | {tps:,.0f} ({lo:,.0f}-{hi:,.0f}) | {ms:.2f} | {tps / base:.2f}x |")
    print("parity (demo greedy tokens equal eager's): " + ("FAILED " + ", ".join(parity_failures)
                                                           if parity_failures else "ok"), flush=True)
    return 1 if parity_failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
