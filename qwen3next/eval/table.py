"""Plain-text tables of the evaluation reports: columns left-aligned to their widest cell, two spaces apart."""

from __future__ import annotations


def format_columns(header: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a table: `header`, then `rows` (each as long as the header)."""
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    return ["  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in (header, *rows)]
