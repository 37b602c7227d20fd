"""Throughput and time-to-first-token of `qwen3next serve` with 1 vs N concurrent streaming clients.

    python scripts/server_load.py --model DIR [--clients 1 16] [--max-tokens 32]
    python scripts/server_load.py --preset small --tokenizer TOKDIR   # random `small` model saved to a temp dir
    ... [--compile] [--quantize int8]                                 # server options to compare

Starts the real server as a subprocess on a loopback port, drives it with the official `openai` client from threads,
prints tokens/s and TTFT (median / max) per concurrency level. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_random_model(preset: str, tokenizer: Path, out: Path) -> None:
    import torch

    from qwen3next import Qwen3NextForCausalLM
    from qwen3next.train.presets import preset_config

    model = Qwen3NextForCausalLM(preset_config(preset))
    model.init_weights(torch.Generator().manual_seed(0))
    model.save_pretrained(out)
    for f in tokenizer.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(f, out / f.name)


def one_client(client, model: str, max_tokens: int, prompt: str, out: list) -> None:
    t0 = time.perf_counter()
    first, n = None, 0
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                            max_tokens=max_tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - t0
        if chunk.usage is not None:
            n = chunk.usage.completion_tokens
    out.append((first if first is not None else time.perf_counter() - t0, n, time.perf_counter() - t0))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--preset")
    ap.add_argument("--tokenizer")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="serve with --compile (compiled decode step)")
    ap.add_argument("--quantize", choices=["int8", "int4"], default=None)
    args = ap.parse_args()
    import openai

    tmp = Path(tempfile.mkdtemp())
    model_dir = Path(args.model) if args.model else tmp / "model"
    if not args.model:
        make_random_model(args.preset, Path(args.tokenizer), model_dir)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "qwen3next.cli", "serve", "--model", str(model_dir), "--port",
                               str(port), "--threads", str(args.threads), "--max-num-seqs", str(max(args.clients)),
                               "--served-model-name", "m", "--log-level", "warning",
                               *(["--compile"] if args.compile else []),
                               *(["--quantize", args.quantize] if args.quantize else [])])
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600)
        for _ in range(600):
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                time.sleep(0.5)
        one_client(client, "m", 4, "warm up", [])
        print(f"{'clients':>7} {'tok/s':>8} {'TTFT median':>12} {'TTFT max':>9} {'tokens':>7} {'wall s':>7}")
        for n in args.clients:
            results: list = []
            threads = [threading.Thread(target=one_client, args=(client, "m", args.max_tokens,
                                                                   f"Tell me a story, number {i}.", results))
                       for i in range(n)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            toks = sum(r[1] for r in results)
            ttft = [r[0] for r in results]
            print(f"{n:>7} {toks / wall:>8.1f} {statistics.median(ttft) * 1e3:>10.0f}ms {max(ttft) * 1e3:>7.0f}ms "
                  f"{toks:>7} {wall:>7.1f}", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
