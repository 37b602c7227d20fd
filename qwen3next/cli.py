"""`qwen3next` command line. Subcommands import what they need lazily so `--help` stays fast."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_MODEL = Path(__file__).parent / "data" / "demo"


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="HF model directory (config.json, safetensors, tokenizer files); default: the embedded "
                        "demo model")


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _non_negative_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {v}")
    return v


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n}"


def _fmt_count(n: int) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{suffix} ({n:,})"
    return str(n)


def cmd_info(args: argparse.Namespace) -> int:
    from .config import Qwen3NextConfig

    config = Qwen3NextConfig.from_pretrained(args.model)
    counts = config.parameter_counts()
    pattern = "".join("A" if t == "full_attention" else "L" for t in config.layer_types)
    moe = "".join("M" if config.is_moe_layer(i) else "D" for i in range(config.num_hidden_layers))
    kv = config.kv_bytes_per_token(2)
    state = config.state_bytes_per_sequence(2, 4)
    rows = [
        ("model", args.model),
        ("parameters (total, main model)", _fmt_count(counts["total"])),
        ("parameters (MTP head)", _fmt_count(counts["mtp"])),
        ("parameters active per token", _fmt_count(counts["active"]) + "  (lm_head counted, embedding not)"),
        ("layers", f"{config.num_hidden_layers}: {pattern}  (L = Gated DeltaNet, A = gated attention)"),
        ("feed-forward", f"{moe}  (M = MoE {config.num_experts} experts top-{config.num_experts_per_tok}"
                         f" + shared, D = dense MLP)"),
        ("attention", f"{config.num_attention_heads} q / {config.num_key_value_heads} kv heads x {config.head_dim},"
                      f" rotary dim {config.rotary_dim}, rope {config.rope.rope_type} theta {config.rope.theta:g}"),
        ("deltanet", f"{config.linear_num_key_heads} qk / {config.linear_num_value_heads} v heads, "
                     f"dims {config.linear_key_head_dim}/{config.linear_value_head_dim}, conv {config.linear_conv_kernel_dim}"),
        ("KV cache per token (bf16)", _fmt_bytes(kv) + f"  ({len(config.attention_layers)} attention layers)"),
        ("DeltaNet state per sequence", _fmt_bytes(state) + "  (bf16 conv + fp32 recurrent, any length)"),
        ("one sequence at full context", _fmt_bytes(state + kv * config.max_position_embeddings)
         + f"  ({config.max_position_embeddings:,} tokens)"),
        ("vocab", f"{config.vocab_size:,}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load_model
    from .model.generate import generate_tokens
    from .tokenizer import IncrementalDetokenizer, Tokenizer

    torch.set_num_threads(args.threads)
    tok = Tokenizer.from_dir(args.model)
    model = load_model(args.model, dtype=args.dtype)
    for prompt in args.prompt:
        if args.chat:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
            ids = tok.encode(text)
        else:
            ids = tok.encode(prompt)
            sys.stdout.write(prompt)
        detok = IncrementalDetokenizer(tok, skip_special_tokens=True)
        stops = tuple(tok.eos_token_ids)
        for t in generate_tokens(model, ids, args.max_tokens, args.temperature, args.seed, stops):
            if t in stops:
                break
            sys.stdout.write(detok.push(t))
            sys.stdout.flush()
        sys.stdout.write(detok.flush() + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen3next", description="Qwen3-Next in pure PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="parameter counts, layer pattern and memory needs, from config.json alone")
    _model_arg(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="generate text from a prompt")
    _model_arg(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for several prompts)")
    p.add_argument("--max-tokens", type=_positive_int, default=64)
    p.add_argument("--temperature", type=_non_negative_float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as a user turn")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--threads", type=_positive_int, default=2)
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    model = getattr(args, "model", None)
    if model is not None and not Path(model).is_dir():
        parser.error(f"--model: {model} is not a directory"
                     + (" (the embedded demo model is missing from this install)" if model == str(DEFAULT_MODEL)
                        else ""))
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"qwen3next {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
