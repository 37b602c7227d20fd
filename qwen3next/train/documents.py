"""The document layout of training text files: every document is followed by a line holding `<|endoftext|>`.

`join_documents` writes that layout (the demo corpus and the synthetic chat data use it); `split_documents` reads
it back, either leniently (the trainer, which also takes plain files without separators) or strictly (a file that
must be exactly what `join_documents` wrote).
"""

from __future__ import annotations

from collections.abc import Iterable

# The token that ends every document, in the files and in the packed token streams alike.
DOC_SEPARATOR = "<|endoftext|>"


def join_documents(documents: Iterable[str]) -> str:
    """Serialize documents as ``doc + "<|endoftext|>\\n"`` each; every document is made to end with a newline."""
    parts = []
    for doc in documents:
        if DOC_SEPARATOR in doc:
            raise ValueError(f"documents must not contain {DOC_SEPARATOR!r}")
        doc = doc.strip("\n") + "\n"
        parts.append(doc + DOC_SEPARATOR + "\n")
    return "".join(parts)


def split_documents(text: str, strict: bool = False) -> list[str]:
    """The documents of a file.

    Lenient (default): the pieces between `<|endoftext|>` separators (one newline after each separator is part of
    the separator line); a file without separators is one document. Blank pieces are dropped.

    Strict: the inverse of `join_documents`, each document ending with a newline. The text must be empty or end
    with the line ``<|endoftext|>``; only a separator followed by a newline ends a document, and every document is
    kept, blank or not.
    """
    if strict:
        sep = DOC_SEPARATOR + "\n"
        if text and not text.endswith(sep):
            raise ValueError(f"text must end with the document terminator {sep!r}")
        return text.split(sep)[:-1]
    docs = []
    for i, piece in enumerate(text.split(DOC_SEPARATOR)):
        if i > 0 and piece.startswith("\n"):
            piece = piece[1:]
        if piece.strip():
            docs.append(piece)
    return docs
