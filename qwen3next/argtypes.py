"""argparse value types shared by the command-line entry points (clear messages, exit code 2 on bad input)."""

from __future__ import annotations

import argparse
import json

# `--quantize` / `quantize=` values -> bits (bf16: bf16-stored weights, fp32 compute), for checkpoint.quantize_bits
QUANTIZE_BITS = {"int8": 8, "int4": 4, "bf16": 16}
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
