"""OSIS markup (the XML of SWORD Bible modules) -> plain text: footnotes dropped, markup stripped, one book at a time.

Paragraph, line-group, list and title boundaries become paragraph breaks; poetry lines and list items become lines;
chapters get a heading line. Notes, book titles, section headings, verse numbers and editorial divs (front matter,
introductions, glossary) are not kept; Psalm superscriptions are, being part of the canonical text.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

_TAG = re.compile(r"<[^>]*>|[^<]+")
_ATTR = re.compile(r'([\w:-]+)="([^"]*)"')
_WHITESPACE = re.compile(r"\s+")
_WORD_TAG = re.compile(r"</?w(?:\s[^>]*)?>")
# Milestoned divs whose content is editorial matter, not scripture.
_SKIPPED_DIVS = ("front", "introduction", "glossary", "preface", "titlePage", "colophon")


def strip_osis(markup: str) -> str:
    """Plain text of an OSIS fragment: ``<note>`` elements (footnotes, cross references) are dropped whole,
    every other tag is removed keeping its text, entities are decoded and whitespace collapsed."""
    out = ""
    note_depth = 0
    after_note = False
    for token in _TAG.findall(markup):
        if token.startswith("<"):
            name = token[1:].lstrip("/").split(None, 1)[0].rstrip("/>")
            if name == "note" and not token.endswith("/>"):
                note_depth += -1 if token.startswith("</") else 1
                after_note = True
        elif note_depth == 0:
            out += _note_gap(out, token) if after_note else ""
            out += token
            after_note = False
    return _WHITESPACE.sub(" ", html.unescape(out)).strip()


def _note_gap(left: str, right: str) -> str:
    # The module often has no space around a footnote ("God<note>…</note>created"): restore it between words.
    return " " if (left[-1:].isalnum() or left[-1:] in ",;:.!?”’)") and right[:1].isalnum() else ""


@dataclass
class BibleBook:
    """One book being extracted: its blocks (paragraphs, stanzas, headings) hold lines of raw text."""

    osis_id: str
    title: str = ""
    short_name: str = ""
    blocks: list[list[str]] = field(default_factory=lambda: [[""]])  # paragraphs -> lines -> raw text
    chapter_blocks: list[int] = field(default_factory=list)  # indices of chapter-heading blocks

    def new_block(self) -> None:
        if self.blocks[-1] != [""]:
            self.blocks.append([""])

    def new_line(self) -> None:
        if self.blocks[-1][-1]:
            self.blocks[-1].append("")

    def text(self) -> str:
        """The book as plain text: title, then chapters and paragraphs separated by blank lines."""
        drop = set(self.chapter_blocks) if len(self.chapter_blocks) == 1 else set()  # one-chapter books
        paras = [self.title or self.short_name or self.osis_id]
        for i, block in enumerate(self.blocks):
            lines = [_WHITESPACE.sub(" ", html.unescape(line)).strip() for line in block]
            lines = [line for line in lines if line]
            if lines and i not in drop:
                paras.append("\n".join(lines))
        return "\n\n".join(paras) + "\n"



def osis_books(entries: Iterable[str]) -> list[BibleBook]:
    """Split a stream of OSIS verse-slot texts (as from ``read_ztext_entries``) into books of plain text.

    Books start at ``<div type="book" sID osisID>``. Paragraph, line-group, list and title boundaries become
    paragraph breaks, poetry ``<l>`` and list items become lines, chapters get a heading (``Genesis 1``, or the
    module's chapter label such as ``Psalm 23``). Notes, book titles, verse numbers and editorial divs
    (front matter, introductions, glossary) are dropped.
    """
    parser = _OsisParser()
    for entry in entries:
        # Strong's-number word wrappers are most of the tags: remove them first. The space keeps words of
        # adjacent slots apart.
        for token in _TAG.findall(_WORD_TAG.sub("", entry) + " "):
            if token.startswith("<"):
                parser.tag(token)
            else:
                parser.text(token)
    return parser.books


class _OsisParser:
    """The state of ``osis_books`` between tokens: the books so far and the elements whose text is dropped."""

    def __init__(self) -> None:
        self.books: list[BibleBook] = []
        self.book: BibleBook | None = None
        self.note_depth = 0
        self.after_note = False
        self.hidden_titles: list[bool] = []  # open <title> elements: is its text dropped?
        self.skipped_ids: set[str] = set()  # open editorial divs (milestoned: sID ... eID)

    def text(self, token: str) -> None:
        book = self.book
        if book is not None and not (self.note_depth or self.skipped_ids or any(self.hidden_titles)):
            line = book.blocks[-1][-1]
            book.blocks[-1][-1] = line + (_note_gap(line, token) if self.after_note else "") + token
            self.after_note = False

    def tag(self, token: str) -> None:
        closing, self_closing = token.startswith("</"), token.endswith("/>")
        name = token[1:].lstrip("/").split(None, 1)[0].rstrip("/>")
        attrs = dict(_ATTR.findall(token))
        kind = attrs.get("type", "")
        if name == "note":
            self.note_depth += 0 if self_closing else (-1 if closing else 1)
            self.after_note = True
        elif self.note_depth or self._in_skipped_div(name, kind, attrs):
            return
        elif name == "div" and kind == "book":
            if "sID" in attrs or not (closing or self_closing):
                self.book = BibleBook(attrs.get("osisID", "unknown"))
                self.books.append(self.book)
            else:
                self.book = None
        elif self.book is not None:
            self._book_tag(self.book, name, kind, attrs, closing, self_closing)

    def _in_skipped_div(self, name: str, kind: str, attrs: dict[str, str]) -> bool:
        """Track editorial divs; True when this tag opens or closes one, or lies inside one."""
        if name == "div" and kind in _SKIPPED_DIVS:
            if "sID" in attrs:
                self.skipped_ids.add(attrs["sID"])
            elif "eID" in attrs:
                self.skipped_ids.discard(attrs["eID"])
            return True
        if name == "div" and "eID" in attrs and attrs["eID"] in self.skipped_ids:
            self.skipped_ids.discard(attrs["eID"])
            return True
        return bool(self.skipped_ids)

    def _book_tag(self, book: BibleBook, name: str, kind: str, attrs: dict[str, str], closing: bool,
                  self_closing: bool) -> None:
        if name == "title":
            # Psalm superscriptions are canonical text; book titles and section headings are not kept.
            if closing and self.hidden_titles:
                self.hidden_titles.pop()
            elif not self_closing:
                self.hidden_titles.append(kind != "psalm")
            book.new_block()
        elif name == "milestone":
            if kind == "x-usfm-toc1" and not book.title:
                book.title = attrs.get("n", "")
            elif kind == "x-usfm-toc2" and not book.short_name:
                book.short_name = attrs.get("n", "")
            elif kind == "x-chapterLabel" and book.chapter_blocks:
                book.blocks[book.chapter_blocks[-1]] = [attrs.get("n", "")]
        elif name == "chapter" and "sID" in attrs:
            book.new_block()
            number = attrs.get("n") or attrs.get("osisID", "").rsplit(".", 1)[-1]
            book.blocks[-1] = [f"{book.short_name or book.osis_id} {number}"]
            book.chapter_blocks.append(len(book.blocks) - 1)
            book.blocks.append([""])
        elif name in ("p", "lg", "list", "speaker") or (name == "div" and kind == "x-p") or name == "lb":
            book.new_block()
        elif name in ("l", "item"):
            book.new_line()
