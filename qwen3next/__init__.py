"""qwen3next: a fast, hackable pure-PyTorch implementation of the Qwen3-Next hybrid LLM.

Top-level names are imported lazily so that light modules (tokenizer, corpus tools) don't pay for torch.
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"
DEFAULT_MODEL = Path(__file__).resolve().parent / "data" / "demo"  # the embedded demo model
__all__ = ["LLM", "Qwen3NextConfig", "Qwen3NextForCausalLM", "SamplingParams"]

_LAZY = {
    "Qwen3NextConfig": ("qwen3next.config", "Qwen3NextConfig"),
    "Qwen3NextForCausalLM": ("qwen3next.model.qwen3_next", "Qwen3NextForCausalLM"),
    "LLM": ("qwen3next.engine.llm", "LLM"),
    "SamplingParams": ("qwen3next.engine.sampling", "SamplingParams"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'qwen3next' has no attribute {name!r}")
