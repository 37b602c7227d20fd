"""argparse value types shared by the command-line entry points (clear messages, exit code 2 on bad input)."""

from __future__ import annotations

import argparse
import json

# `--quantize` / `quantize=` values -> bits (bf16: bf16-stored weights, fp32 compute; none: every weight in --dtype,
# where the engine would otherwise keep a bf16 checkpoint's weights in bf16), for checkpoint.quantize_bits
QUANTIZE_BITS = {"int8": 8, "int4": 4, "bf16": 16, "none": None}
QUANTIZE_CHOICES = tuple(QUANTIZE_BITS)


def _number(s: str, cast, what: str):
    try:
        return cast(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None


def positive_int(s: str) -> int:
    v = _number(s, int, "a positive integer")
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def non_negative_float(s: str) -> float:
    v = _number(s, float, "a number")
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {v}")
    return v


def port(s: str) -> int:
    v = _number(s, int, "a port number")
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port in [0, 65535], got {v}")
    return v


def speculative_config(s: str):
    """`--speculative-config JSON` (vLLM's flag) -> SpeculativeConfig."""
    from .engine.speculative import SpeculativeConfig

    try:
        return SpeculativeConfig.parse(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_speculative_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--speculative-config", type=speculative_config, default=None, metavar="JSON",
                        help='speculative decoding with the model\'s MTP head, e.g. \'{"method": "mtp", '
                             '"num_speculative_tokens": 2}\' (1-4 drafts per step; "adaptive": false keeps the '
                             'draft length fixed instead of tuning it to the measured speed); exact: the output is '
                             'distributed as without it, token for token for greedy and seeded requests')


def add_quantize_arg(parser: argparse.ArgumentParser) -> None:
    """`--quantize` of the commands that run the engine (generate, chat, serve)."""
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                        help="weight-only quantization at load (bf16: bf16-stored weights, fp32 compute; the default "
                             "for a bf16 checkpoint on a CPU, exact there; none: every weight in --dtype)")


def add_enforce_eager_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--enforce-eager", action="store_true",
                        help="on a CUDA GPU: run decode steps eagerly, not as CUDA graphs (no effect on a CPU)")


def add_scheduler_steps_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-scheduler-steps", type=positive_int, default=None, metavar="N",
                        help="multi-step decoding: up to N greedy decode steps in a row per schedule, runs kept to "
                             "~20 ms (default 8; 1: one step per schedule)")


KV_CACHE_DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")  # model/cache.py's KV_CACHE_DTYPES and "auto"


def add_kv_cache_dtype_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPE_CHOICES, default="auto",
                        help="dtype of the attention K/V cache (auto: the activation dtype, exact; bfloat16 / float16: "
                             "half the bytes of fp32, keys and values rounded once when stored)")


# The engine's KV block size (`Engine(block_size=...)`'s default; no command-line option changes it): snapshot
# intervals are whole blocks.
ENGINE_BLOCK_SIZE = 64


def prefix_snapshot_slots(s: str) -> int:
    v = _number(s, int, "an integer >= 0")
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v} (to turn prefix caching off, use "
                                         f"--no-enable-prefix-caching)")
    return v


def prefix_snapshot_interval(s: str) -> int:
    v = _number(s, int, f"an integer >= 0 (a multiple of {ENGINE_BLOCK_SIZE})")
    if v < 0 or v % ENGINE_BLOCK_SIZE:
        raise argparse.ArgumentTypeError(f"expected 0 (no interval snapshots) or a positive multiple of the KV block "
                                         f"size {ENGINE_BLOCK_SIZE}, got {v}")
    return v


def add_prefix_caching_args(parser: argparse.ArgumentParser) -> None:
    """`--enable-prefix-caching / --no-enable-prefix-caching` (vLLM's flags; on by default), `--prefix-snapshot-slots
    N`, `--prefix-snapshot-interval N`: `args.enable_prefix_caching`, `args.prefix_snapshot_slots`,
    `args.prefix_snapshot_interval` (None: automatic). Check them after parsing with `check_prefix_caching_args`."""
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse the cached KV blocks and DeltaNet state snapshots of earlier requests' prompt "
                             "prefixes (a shared system prompt, the earlier turns of a conversation): those prompt "
                             "tokens are not computed again; the output is as without it, up to float rounding "
                             "(default: on)")
    parser.add_argument("--prefix-snapshot-slots", type=prefix_snapshot_slots, default=None, metavar="N",
                        help="DeltaNet state slots added for prefix-cache snapshots, taken from the cache budget "
                             "(--max-memory); a hybrid model resumes a cached prefix only where a snapshot of its "
                             "recurrent state was taken, and one costs as much as a sequence's state (`qwen3next info` "
                             "prints its size); snapshots also use the sequence slots no request needs (0: only "
                             "those); default: four per sequence (--max-num-seqs) from the budget beyond "
                             "--max-num-seqs sequences of --max-model-len, at most a quarter of it")
    parser.add_argument("--prefix-snapshot-interval", type=prefix_snapshot_interval, default=None, metavar="N",
                        help="also snapshot long prompts every N tokens (a multiple of the KV block size "
                             f"{ENGINE_BLOCK_SIZE}; 0: never) so that requests sharing only a long prefix of them "
                             "resume part way (snapshots are always taken near each prompt's end, at each finished "
                             "sequence's end and after each chat turn); default: chosen from the memory budget")


def check_prefix_caching_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A usage error (exit 2) when a snapshot option comes with --no-enable-prefix-caching: it would do nothing."""
    if getattr(args, "enable_prefix_caching", True):
        return
    for flag in ("--prefix-snapshot-slots", "--prefix-snapshot-interval"):
        if getattr(args, flag.lstrip("-").replace("-", "_"), None) is not None:
            parser.error(f"argument {flag}: has no effect with --no-enable-prefix-caching")


def hf_overrides(s: str) -> dict:
    """`--hf-overrides JSON` (vLLM's flag name; merge rule: `config.apply_hf_overrides`) -> a dict of config.json
    keys, checked against the keys the config knows."""
    from .config import check_hf_overrides

    try:
        value = json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg} at character {e.pos}): {s!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object of config.json keys, e.g. "
                                         f"'{HF_OVERRIDES_EXAMPLE}', got {s!r}")
    try:
        check_hf_overrides(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("hf_overrides: ")) from None
    return value


HF_OVERRIDES_EXAMPLE = ('{"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": '
                        '262144}}')


def add_hf_overrides_arg(parser: argparse.ArgumentParser) -> None:
    """`--hf-overrides JSON`: `args.hf_overrides` is the parsed object, or None."""
    parser.add_argument("--hf-overrides", type=hf_overrides, default=None, metavar="JSON",
                        help="change config.json values at load (vLLM's flag name; our rule: objects merge key by "
                             "key, where vLLM replaces a top-level object such as rope_scaling whole), e.g. YaRN for "
                             f"contexts beyond the native length: '{HF_OVERRIDES_EXAMPLE}' (either rope spelling, "
                             "rope_scaling or rope_parameters; --max-model-len may then go up to "
                             "original_max_position_embeddings x factor)")


def check_output_paths(args: argparse.Namespace, *flags: str) -> None:
    """Fail before a long run, not after it, when an output file of these flags (e.g. "--json", "--plot") cannot be
    written: its directory must exist."""
    from pathlib import Path

    for flag in flags:
        path = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if path is not None and not Path(path).resolve().parent.is_dir():
            raise ValueError(f"{flag}: the directory of {path} does not exist")


def add_tensor_parallel_arg(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """`--tensor-parallel-size N` (vLLM's flag): `args.tensor_parallel_size`."""
    parser.add_argument("--tensor-parallel-size", "-tp", type=positive_int, default=1, metavar="N",
                        help=help or "split the model and its cache over N processes on this machine (gloo; "
                                     "--threads torch threads each); default 1")
