"""`python -m qwen3next.server`: the same as `qwen3next serve`."""

from __future__ import annotations

import argparse
import sys

from .app import add_serve_args, run_serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen3next.server",
                                     description="OpenAI-compatible HTTP server for a qwen3next model")
    add_serve_args(parser)
    args = parser.parse_args(argv)
    try:
        return run_serve(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"qwen3next serve: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
