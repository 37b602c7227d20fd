"""Jane Austen's six novels from the Debian package ``r-cran-janeaustenr``, as clean text.

The package stores each novel as an R character vector (one hard-wrapped Project Gutenberg line per element) in an
R lazy-load database, read here with ``rdata``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from .rdata import STRSXP, RObject, read_lazyload_db

# (R variable, output name), in publication order.
AUSTEN_NOVELS = (
    ("sensesensibility", "sense-and-sensibility"),
    ("prideprejudice", "pride-and-prejudice"),
    ("mansfieldpark", "mansfield-park"),
    ("emma", "emma"),
    ("northangerabbey", "northanger-abbey"),
    ("persuasion", "persuasion"),
)
_ITALIC = re.compile(r"_([^_]+)_")
_SPACES = re.compile(r"[ \t]+")


def _continues_line(prev: str, line: str) -> bool:
    # Inside indented blocks (letters, verse) a line continues the previous one when it starts in lowercase,
    # or follows a title abbreviation ("Mrs." / "Jennings"), or is a pronoun "I" after an unpunctuated word.
    if line[0].islower() or prev.endswith((" Mr.", " Mrs.", " Dr.")):
        return True
    return prev[-1].isalpha() and (line.startswith("I ") or line.startswith("I'"))


def unwrap_paragraphs(lines: Sequence[str]) -> list[str]:
    """Join hard-wrapped lines into paragraphs (blank lines separate paragraphs).

    Flush-left lines are wrapped prose and are joined with single spaces. Indented lines (verse, letters,
    centred marks) start a new line inside the paragraph, unless they look like the continuation of a wrapped
    line (a lowercase start, mostly). Runs of spaces collapse to one.
    """
    paragraphs: list[str] = []
    current: list[str] = []  # lines of the paragraph being built

    def flush() -> None:
        if current:
            paragraphs.append("\n".join(current))
            current.clear()

    for raw in lines:
        stripped = _SPACES.sub(" ", raw).strip()
        if not stripped:
            flush()
        elif not current:
            current.append(stripped)
        elif raw[:1].isspace() and not _continues_line(current[-1], stripped):
            current.append(stripped)
        else:
            current[-1] = current[-1] + " " + stripped
    flush()
    return paragraphs


def clean_austen(lines: Sequence[str]) -> str:
    """One novel's lines -> clean text: paragraphs one per line, a blank line between them.

    Gutenberg ``_italic_`` markers are removed, as are the modern editorial notes the package carries
    (bracketed remarks about editions, and a trailing "A NOTE ON THE TEXT").
    """
    out = []
    for para in unwrap_paragraphs(lines):
        if para.startswith("A NOTE ON THE TEXT"):
            break
        if para.startswith("[") and para.endswith("]") and "edition" in para.lower():
            continue
        out.append(_ITALIC.sub(r"\1", para))
    return "\n\n".join(out) + "\n"


def read_austen(package_root: Path) -> dict[str, str]:
    """Clean text of the six novels from an unpacked ``r-cran-janeaustenr``, keyed by output name."""
    data_dir = Path(package_root) / "usr/lib/R/site-library/janeaustenr/data"
    db = read_lazyload_db(data_dir / "Rdata.rdb", data_dir / "Rdata.rdx")
    novels = {}
    for variable, name in AUSTEN_NOVELS:
        obj = db[variable]
        if not isinstance(obj, RObject) or obj.sexptype != STRSXP:
            raise ValueError(f"janeaustenr: {variable} is not a character vector")
        novels[name] = clean_austen([line or "" for line in obj.value])
    return novels
