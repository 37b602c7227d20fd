"""The evaluation text: any UTF-8 file, or one of Jane Austen's novels by name (`austen:emma`).

`austen:NAME` fetches the Debian package `r-cran-janeaustenr` with `apt-get download` (a few seconds; the corpus
builder's reader, `qwen3next.train.corpus`) and returns the clean novel. Files in the corpus builder's layout
(documents ended by `<|endoftext|>` lines, e.g. `runs/corpus/austen/emma.txt` from
`python -m qwen3next.train.corpus runs/corpus --sources austen`) are read as their documents joined by blank lines,
so the separator never becomes a special token in the middle of the text.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..train.corpus import SOURCES, fetch_package
from ..train.documents import DOC_SEPARATOR, split_documents
from ..train.sources.austen import AUSTEN_NOVELS, read_austen

AUSTEN_PREFIX = "austen:"
AUSTEN_NAMES = tuple(name for _, name in AUSTEN_NOVELS)


def austen_novel(name: str) -> str:
    """One of Jane Austen's six novels (`AUSTEN_NAMES`), fetched from Debian and cleaned like the training corpus."""
    if name not in AUSTEN_NAMES:
        raise ValueError(f"--text: unknown novel {AUSTEN_PREFIX}{name}; choose one of "
                         + ", ".join(AUSTEN_PREFIX + n for n in AUSTEN_NAMES))
    with tempfile.TemporaryDirectory(prefix="qwen3next-austen-") as tmp:
        try:
            _, root = fetch_package(SOURCES["austen"].package, Path(tmp))
        except (RuntimeError, OSError) as e:  # no apt-get, no network, no such package
            raise ValueError(f"--text {AUSTEN_PREFIX}{name}: could not fetch the novel ({e}); build the corpus "
                             f"elsewhere with `python -m qwen3next.train.corpus OUT --sources austen` and pass "
                             f"OUT/austen/{name}.txt") from None
        return read_austen(root)[name]


def load_text(spec: str) -> tuple[str, str]:
    """(text, description) of `--text SPEC`: `austen:NAME` or a UTF-8 file path."""
    if spec.startswith(AUSTEN_PREFIX):
        name = spec[len(AUSTEN_PREFIX):]
        return austen_novel(name), f"Jane Austen, {name} (Debian r-cran-janeaustenr)"
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--text: {spec} is not a file (give a UTF-8 text file, or austen:NAME with NAME one of "
                         f"{', '.join(AUSTEN_NAMES)})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--text: {spec} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    if DOC_SEPARATOR in text:
        text = "\n\n".join(doc.strip("\n") for doc in split_documents(text))
    if not text.strip():
        raise ValueError(f"--text: {spec} holds no text")
    return text, str(path)
