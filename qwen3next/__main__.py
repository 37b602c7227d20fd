"""`python -m qwen3next ...`: the same as the `qwen3next` command."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
