"""`qwen3next serve` options, kept free of heavy imports so the CLI starts fast."""

from __future__ import annotations

import argparse

from .. import DEFAULT_MODEL
from ..argtypes import (
    add_enforce_eager_arg,
    add_hf_overrides_arg,
    add_kv_cache_dtype_arg,
    add_prefix_caching_args,
    add_quantize_arg,
    add_scheduler_steps_arg,
    add_speculative_arg,
    add_tensor_parallel_arg,
)
from ..argtypes import port as _port
from ..argtypes import positive_int as _positive_int

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """The options of `qwen3next serve`."""
    parser.add_argument("--model", default=str(DEFAULT_MODEL),
                        help="HF model directory (config.json, safetensors, tokenizer files); default: the embedded "
                             "demo model")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=_port, default=8000)
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on /v1/* (default: $QWEN3NEXT_API_KEY; none if "
                             "unset)")
    parser.add_argument("--served-model-name", default=None,
                        help="the model name clients send (default: the model directory's name)")
    parser.add_argument("--max-memory", default=None,
                        help="cache budget (KV blocks + DeltaNet state slots), e.g. 2GiB; default: a quarter of the "
                             "available memory, at most 8 GiB")
    parser.add_argument("--max-num-seqs", type=_positive_int, default=16, help="sequences decoded together")
    parser.add_argument("--max-model-len", type=_positive_int, default=None,
                        help="context length (prompt + completion); default: the model's, at most 8192; up to "
                             "original_max_position_embeddings x factor with YaRN (--hf-overrides)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    add_quantize_arg(parser)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step before serving (faster steps; about a minute of "
                             "compiling at start; needs a C++ compiler)")
    add_enforce_eager_arg(parser)
    add_scheduler_steps_arg(parser)
    add_kv_cache_dtype_arg(parser)
    add_speculative_arg(parser)
    add_hf_overrides_arg(parser)
    add_prefix_caching_args(parser)
    add_tensor_parallel_arg(parser)
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--max-body-bytes", type=_positive_int, default=DEFAULT_MAX_BODY_BYTES,
                        help="largest accepted request body")
    parser.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info")


