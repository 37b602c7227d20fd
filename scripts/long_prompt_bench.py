"""Long prompts through the engine: prefill time and peak memory (RSS) per prompt length, one fresh process each.

    YARN='{"rope_scaling": {"rope_type": "yarn", "factor": 2048, "original_max_position_embeddings": 512}}'
    python scripts/long_prompt_bench.py --preset tiny --lengths 32768 131072 262144 --threads 2 --hf-overrides "$YARN"
    YARN='{"rope_scaling": {"rope_type": "yarn", "factor": 64, "original_max_position_embeddings": 4096}}'
    python scripts/long_prompt_bench.py --model qwen3next/data/demo --lengths 32768 131072 262143 --threads 2 \
        --hf-overrides "$YARN"

Each length runs in a child process (so that the peak RSS, `ru_maxrss`, is that run's own): the engine is built for
one sequence of the prompt's length (`max_num_seqs=1`, `max_model_len` = length + 1, so a prompt may be at most the
model's context minus one token), a prompt of random token ids is submitted with `max_tokens=1`, and the engine
steps until it finishes (chunked prefill, `--chunk` tokens per step, the engine's default 512). Reported per length:
prefill seconds and tokens/s, the sequence's cache as the engine allocates it (K/V blocks + DeltaNet state slot), RSS
after the engine is built (weights + cache pools as touched so far), and the peak RSS of the whole run; the
difference is what the prefill itself needed on top (activations, and the cache pages written).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from qwen3next.argtypes import hf_overrides


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(args: argparse.Namespace) -> dict:
    import torch

    from qwen3next.bench.harness import synthetic_tokenizer
    from qwen3next.bench.measure import random_weights
    from qwen3next.engine.llm import Engine
    from qwen3next.engine.memory import config_geometry
    from qwen3next.engine.sampling import SamplingParams
    from qwen3next.train.presets import preset_config

    torch.set_num_threads(args.threads)
    overrides = args.hf_overrides
    n = args.length
    if args.preset:
        config = preset_config(args.preset, hf_overrides=overrides)
        model = random_weights(config, torch.float32, 0)
        engine = Engine(model, tokenizer=synthetic_tokenizer(config.vocab_size), max_num_seqs=1, max_model_len=n + 1,
                        prefill_chunk_size=args.chunk, max_num_batched_tokens=args.chunk)
    else:
        engine = Engine(args.model, max_num_seqs=1, max_model_len=n + 1, prefill_chunk_size=args.chunk,
                        max_num_batched_tokens=args.chunk, hf_overrides=overrides)
    config = engine.model.config
    rss_built = _current_rss_mib()
    ids = torch.randint(0, config.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    req = engine.add_request(ids, SamplingParams(max_tokens=1, temperature=0))
    t0 = time.perf_counter()
    steps = 0
    while engine.step():
        steps += 1
    seconds = time.perf_counter() - t0
    out = req.output()
    element = torch.tensor([], dtype=engine.model.dtype).element_size()
    return {"length": n, "prefill_s": seconds, "tok_s": n / seconds, "steps": steps,
            "cache_bytes": config_geometry(config, element).sequence_bytes(n),  # what the engine allocates for it
            "state_bytes": config_geometry(config, element).state_bytes_per_slot,
            "rss_built_mib": rss_built, "rss_peak_mib": _rss_mib(),
            "generated": out.outputs[0].token_ids if hasattr(out, "outputs") else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model directory")
    src.add_argument("--preset", help="a random model of this preset (tiny, demo, small)")
    p.add_argument("--lengths", type=int, nargs="+", help="prompt lengths (tokens)")
    p.add_argument("--hf-overrides", type=hf_overrides, default=None, metavar="JSON")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk (the engine's prefill_chunk_size)")
    p.add_argument("--json", default=None)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.length is not None:
        try:
            print(json.dumps(child(args)))
        except ValueError as e:  # e.g. the prompt plus its one generated token beyond the model's context
            print(f"long_prompt_bench: {args.length} tokens: {e}", file=sys.stderr)
            return 1
        return 0
    if not args.lengths or min(args.lengths) < 1:
        p.error("--lengths: expected one or more positive token counts")
    rows = []
    for n in args.lengths:
        cmd = [sys.executable, __file__, "--length", str(n), "--threads", str(args.threads), "--chunk",
               str(args.chunk)]
        cmd += ["--model", args.model] if args.model else ["--preset", args.preset]
        if args.hf_overrides:
            cmd += ["--hf-overrides", json.dumps(args.hf_overrides)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr)
            return done.returncode
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{n:>9} tokens: prefill {row['prefill_s']:8.1f} s ({row['tok_s']:7.0f} tok/s, {row['steps']} steps)  "
              f"cache {row['cache_bytes'] / 2**20:8.1f} MiB (state {row['state_bytes'] / 2**20:5.2f})  "
              f"RSS built {row['rss_built_mib']:7.0f} MiB, peak {row['rss_peak_mib']:7.0f} MiB", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"source": args.model or f"preset {args.preset}", "threads": args.threads, "chunk": args.chunk,
                       "hf_overrides": args.hf_overrides, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
