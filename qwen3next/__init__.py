"""qwen3next: a fast, hackable pure-PyTorch implementation of the Qwen3-Next hybrid LLM."""

from .config import Qwen3NextConfig
from .model.qwen3_next import Qwen3NextForCausalLM

__all__ = ["Qwen3NextConfig", "Qwen3NextForCausalLM"]
__version__ = "0.1.0"
