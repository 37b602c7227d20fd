"""argparse value types shared by the command-line entry points (clear messages, exit code 2 on bad input)."""

from __future__ import annotations

import argparse

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
