"""qwen3next: a hackable pure-PyTorch Qwen3-Next implementation."""
