"""Logits drift of each weight format against fp32, measured the way llama.cpp's `llama-perplexity --kl-divergence`
measures its own formats, so the two sides compare directly.

Protocol (llama-perplexity's): the text is tokenized once and cut into chunks of `--ctx` tokens; each chunk is a fresh
sequence; the second half of each chunk is scored (the log-probabilities at positions ctx/2 .. ctx-2 for the next
token). Printed per format: perplexity, mean KL(fp32 || format) and how often the top-1 token is the fp32 model's.
`--decode` runs the scored half one token at a time through the cache (the decode paths, where the native kernels
run; int4 then rounds activations to int8 per group), otherwise whole chunks (prefill paths).

    python scripts/drift_vs_llamacpp.py --model qwen3next/data/demo [--text FILE] --ctx 128 [--decode]
    llama-perplexity -m f32.gguf -f FILE -c 128 --kl-divergence-base base.kld
    llama-perplexity -m q8_0.gguf -f FILE -c 128 --kl-divergence-base base.kld --kl-divergence
"""

from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from qwen3next.checkpoint import load_model
from qwen3next.quant import Int4Linear, Int8Linear, QuantizedExperts
from qwen3next.quant.quantize import INT4_MIX, quantize_model
from qwen3next.tokenizer import Tokenizer

# 2,462 demo-tokenizer tokens the demo model itself sampled (temperature 0.8, four Austen-style openings): fixed text
# that both sides score; the numbers in the README come from it
DEFAULT_TEXT = Path(__file__).with_name("drift_text.txt")

FORMATS = {"bf16": {"bits": 16}, "int8": {"bits": 8}, "int4": {"bits": 4, "group_size": 64},
           "int4-g32": {"bits": 4, "group_size": 32},
           "int4-g32c": {"bits": 4, "group_size": 32, "scale_format": "coded8"},
           "int4-mix": INT4_MIX}  # what `qwen3next quantize --bits 4` writes


def bytes_per_token(model) -> float:
    """Bytes of the quantized matrices one decoded token reads: every quantized Linear outside the MTP head (lm_head
    included) and, of the routed experts, the share a token uses (num_experts_per_tok / num_experts)."""
    share = model.config.num_experts_per_tok / model.config.num_experts
    total = 0.0
    for name, m in model.named_modules():
        if name.startswith("mtp"):  # the MTP head drafts; plain decoding does not read it
            continue
        if isinstance(m, (Int8Linear, Int4Linear)):
            total += sum(b.numel() * b.element_size() for b in m.buffers())
        elif isinstance(m, QuantizedExperts):
            total += share * sum(b.numel() * b.element_size() for b in m.buffers())
    return total


@torch.no_grad()
def chunk_logprobs(model, chunk: list[int], decode: bool) -> torch.Tensor:
    """Log-probabilities [len(chunk), vocab] (decode: the first half prefilled, then one token per step)."""
    x = torch.tensor([chunk])
    if not decode:
        return F.log_softmax(model(x)[0].float(), -1)
    half = len(chunk) // 2
    cache = model.new_cache(1, len(chunk) + 1)
    rows = [model(x[:, :half], cache)[0]] + [model(x[:, t:t + 1], cache)[0] for t in range(half, len(chunk))]
    return F.log_softmax(torch.cat(rows).float(), -1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen3next/data/demo")
    p.add_argument("--text", default=str(DEFAULT_TEXT),
                   help="a UTF-8 text file (the same one given to llama-perplexity -f)")
    p.add_argument("--ctx", type=int, default=128, help="tokens per chunk (llama-perplexity -c)")
    p.add_argument("--decode", action="store_true", help="score through one-token decode steps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--formats", nargs="+", choices=list(FORMATS), default=list(FORMATS))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ids = Tokenizer.from_dir(args.model).encode(open(args.text, encoding="utf-8").read())
    chunks = [ids[i * args.ctx:(i + 1) * args.ctx] for i in range(len(ids) // args.ctx)]
    if not chunks:
        raise SystemExit(f"text: {len(ids)} tokens, fewer than one chunk of --ctx {args.ctx}")
    fp32 = load_model(args.model, dtype=torch.float32).eval()
    base = [chunk_logprobs(fp32, c, args.decode) for c in chunks]
    first = args.ctx // 2
    print(f"{len(ids)} tokens, {len(chunks)} chunks of {args.ctx}, {'decode' if args.decode else 'prefill'} paths")
    for name in ("fp32", *args.formats):
        model = fp32 if name == "fp32" else quantize_model(copy.deepcopy(fp32), **FORMATS[name])
        nll = kl = same = n = 0.0
        for chunk, b in zip(chunks, base):
            lp = b if name == "fp32" else chunk_logprobs(model, chunk, args.decode)
            pos = torch.arange(first, args.ctx - 1)
            nll -= lp[pos, torch.tensor(chunk)[pos + 1]].sum().item()
            kl += (b[pos].exp() * (b[pos] - lp[pos])).sum().item()
            same += (b[pos].argmax(-1) == lp[pos].argmax(-1)).sum().item()
            n += len(pos)
        size = "" if name in ("fp32", "bf16") else f"  {bytes_per_token(model) / 1e6:.2f} MB per token"
        print(f"{name:9s} PPL {math.exp(nll / n):.4f}  mean KLD {kl / n:.6f}  same top-1 {100 * same / n:.2f}%  "
              f"({int(n)} positions){size}")


if __name__ == "__main__":
    main()
