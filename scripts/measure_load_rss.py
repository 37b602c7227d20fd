"""Peak resident memory of `Qwen3NextForCausalLM.from_pretrained` versus the checkpoint size.

Builds a random model of a few hundred MB, saves it (bf16 and fp32, single file and sharded), then loads each copy
in a FRESH Python process and reports that process's peak RSS (`ru_maxrss`) against its RSS right after importing
torch and qwen3next. A streaming loader needs about one model's worth of memory above that baseline; a loader that
materializes the checkpoint and the model side by side needs about two.

Linux carries `ru_maxrss` over fork and exec, so a child forked from a process that holds a big model would report
the parent's size: this driver therefore never imports torch itself and builds the model in a subprocess too.

Usage: python scripts/measure_load_rss.py [--dir DIR] [--hidden 1024] [--layers 8] [--experts 64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, resource, sys
import torch
import qwen3next
from qwen3next import Qwen3NextForCausalLM

def status_mib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(key)

torch.set_num_threads(1)
base = status_mib("VmRSS")
model = Qwen3NextForCausalLM.from_pretrained(sys.argv[1], dtype=sys.argv[2])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"base": base, "peak": peak, "hwm": status_mib("VmHWM"), "model": nbytes / 2**20}))
"""

BUILD = """
import sys
import torch
from qwen3next import Qwen3NextConfig, Qwen3NextForCausalLM

torch.set_num_threads(1)
root, hidden, layers, experts = sys.argv[1], *map(int, sys.argv[2:5])
config = Qwen3NextConfig.from_dict({
    "vocab_size": 32000, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": 8,
    "num_key_value_heads": 2, "head_dim": 128, "linear_num_key_heads": 8, "linear_num_value_heads": 16,
    "linear_key_head_dim": 64, "linear_value_head_dim": 64, "num_experts": experts, "num_experts_per_tok": 4,
    "moe_intermediate_size": 128, "shared_expert_intermediate_size": 256, "intermediate_size": 2048,
    "max_position_embeddings": 4096, "num_nextn_predict_layers": 1,
})
with torch.device("meta"):
    model = Qwen3NextForCausalLM(config)
model = model.to_empty(device="cpu")
model.init_weights(torch.Generator().manual_seed(0))
model.save_pretrained(f"{root}/fp32")
model = model.to(torch.bfloat16)
model.save_pretrained(f"{root}/bf16")
model.save_pretrained(f"{root}/bf16-sharded", max_shard_bytes=64 * 2**20)
print(sum(p.numel() for p in model.parameters()))
"""


def checkpoint_mib(d: Path) -> float:
    return sum(f.stat().st_size for f in d.glob("*.safetensors")) / 2**20


def measure(d: Path, dtype: str, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(d), dtype], check=True, capture_output=True, text=True,
                         env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=None, help="where to write the checkpoints (default: a temp dir)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=64)
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        out = subprocess.run([sys.executable, "-c", BUILD, tmp, str(args.hidden), str(args.layers), str(args.experts)],
                             check=True, capture_output=True, text=True, env=env)
        n_params = int(out.stdout.split()[-1])
        print(f"model: {n_params / 1e6:.1f} M parameters (hidden {args.hidden}, {args.layers} layers, "
              f"{args.experts} experts, with MTP)")
        header = (f"{'checkpoint':<14} {'load as':<9} {'ckpt MiB':>9} {'model MiB':>10} {'base MiB':>9} "
                  f"{'peak MiB':>9} {'peak-base':>10} {'/model':>7} {'VmHWM':>7}")
        print(header)
        print("-" * len(header))
        for name, dtype in [("bf16", "bfloat16"), ("bf16-sharded", "bfloat16"), ("fp32", "float32"),
                            ("fp32", "bfloat16")]:
            r = measure(root / name, dtype, env)
            extra = r["peak"] - r["base"]
            print(f"{name:<14} {dtype:<9} {checkpoint_mib(root / name):>9.0f} {r['model']:>10.0f} {r['base']:>9.0f} "
                  f"{r['peak']:>9.0f} {extra:>10.0f} {extra / r['model']:>7.2f} {r['hwm']:>7.0f}")


if __name__ == "__main__":
    main()
