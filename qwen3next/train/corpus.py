"""Reproducible plain-text training corpus for the demo model, assembled from Debian packages.

Sources (see data/corpus/SOURCES.md):
- ``austen``: Jane Austen's six novels from ``r-cran-janeaustenr`` (an R lazy-load database, read here with a
  small reader of R's XDR serialization format, so no R and no extra Python package is needed).
- ``bible``: the public-domain World English Bible from ``sword-text-web`` (a SWORD zText module with OSIS
  markup). Notes are dropped and markup is stripped, so the output is a *derived* text and is called
  ``bible-web-derived``, never "World English Bible" (the eBible.org trademark condition for altered text).

Output layout (all UTF-8, ``\\n`` line ends, deterministic bytes):
- one directory per source (``austen/``, ``bible-web-derived/``) so a run can train on one domain, holding one
  ``.txt`` file per document group (a novel, or a group of Bible books such as ``law.txt``);
- inside a file, every document is followed by the line ``<|endoftext|>``, so ``split_documents`` (or a
  packer that tokenizes special tokens) can respect document boundaries; paragraphs are one line each,
  separated by a blank line; poetry keeps one verse line per line;
- ``manifest.json`` (package versions, licences, byte/line counts, sha256) and ``SOURCES.md``.

Run as ``python -m qwen3next.train.corpus OUT_DIR [--sources austen,bible]``.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import html
import json
import lzma
import re
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

DOC_END = "<|endoftext|>"
SOURCE_NAMES = ("austen", "bible")


# --------------------------------------------------------------------------------------------------------------
# Document files


def join_documents(documents: Iterable[str]) -> str:
    """Serialize documents as ``doc + "<|endoftext|>\\n"`` each; every document is made to end with a newline."""
    parts = []
    for doc in documents:
        if DOC_END in doc:
            raise ValueError(f"documents must not contain {DOC_END!r}")
        doc = doc.strip("\n") + "\n"
        parts.append(doc + DOC_END + "\n")
    return "".join(parts)


def split_documents(text: str) -> list[str]:
    """Inverse of ``join_documents``: the documents of a corpus file, each ending with a newline."""
    sep = DOC_END + "\n"
    if text and not text.endswith(sep):
        raise ValueError(f"text must end with the document terminator {sep!r}")
    return [doc for doc in text.split(sep)[:-1]]


# --------------------------------------------------------------------------------------------------------------
# R serialization (XDR binary format, versions 2 and 3): the subset that data packages use


@dataclass(frozen=True)
class RSymbol:
    name: str


@dataclass
class RObject:
    """An R vector: ``sexptype`` is R's type code (16 = character, 19 = list, 13 = integer, …)."""

    sexptype: int
    value: list
    attributes: dict[str, object] = field(default_factory=dict)


_NILVALUE, _REF, _SYM, _LIST, _CHAR = 254, 255, 1, 2, 9
_LGL, _INT, _REAL, _STR, _VEC, _EXPR = 10, 13, 14, 16, 19, 20
_NA_INT = -(2**31)
_UTF8_MASK, _LATIN1_MASK, _BYTES_MASK, _ASCII_MASK = 1 << 3, 1 << 2, 1 << 1, 1 << 6


class _XdrReader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.refs: list[object] = []
        self.native_encoding = "latin-1"

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError(f"R data: truncated input (need {n} bytes at offset {self.pos}, have {len(self.data)})")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def i32(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.i32()
        if n == -1:  # long vector: two more ints, upper and lower 32 bits
            hi, lo = struct.unpack(">II", self.take(8))
            n = (hi << 32) | lo
        return n

    def header(self) -> None:
        if self.take(2) != b"X\n":
            raise ValueError("R data: only the XDR binary format ('X\\n' header) is supported")
        version = self.i32()
        self.take(8)  # writer R version, minimal reader R version
        if version == 3:
            self.native_encoding = self.take(self.i32()).decode("ascii")
        elif version != 2:
            raise ValueError(f"R data: serialization version must be 2 or 3, got {version}")

    def item(self) -> object:
        flags = self.i32()
        sexptype, levels = flags & 0xFF, flags >> 12
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if sexptype == _NILVALUE:
            return None
        if sexptype == _REF:
            index = flags >> 8 or self.i32()
            return self.refs[index - 1]
        if sexptype == _SYM:
            sym = RSymbol(self.item())  # the print name, a CHARSXP
            self.refs.append(sym)
            return sym
        if sexptype == _CHAR:
            return self.charsxp(levels)
        if sexptype == _LIST:
            return self.pairlist(has_attr, has_tag)
        n = self.length()
        if sexptype in (_LGL, _INT):
            ints = struct.unpack(f">{n}i", self.take(4 * n))
            value = [None if v == _NA_INT else (bool(v) if sexptype == _LGL else v) for v in ints]
        elif sexptype == _REAL:
            value = list(struct.unpack(f">{n}d", self.take(8 * n)))
        elif sexptype in (_STR, _VEC, _EXPR):
            value = [self.item() for _ in range(n)]
        else:
            raise ValueError(f"R data: unsupported SEXP type {sexptype} at offset {self.pos - 4}")
        attributes = dict(self.item()) if has_attr else {}
        return RObject(sexptype, value, attributes)

    def charsxp(self, levels: int) -> str | None:
        n = self.i32()
        if n == -1:
            return None  # NA_character_
        raw = self.take(n)
        if levels & (_UTF8_MASK | _ASCII_MASK):
            return raw.decode("utf-8")
        if levels & _LATIN1_MASK:
            return raw.decode("latin-1")
        if levels & _BYTES_MASK:
            raise ValueError("R data: raw-bytes strings are not supported")
        return raw.decode(self.native_encoding)

    def pairlist(self, has_attr: bool, has_tag: bool) -> list[tuple[str | None, object]]:
        # Pairlists are serialized as nested cons cells; unroll them into (tag, value) pairs.
        cells = []
        while True:
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            cells.append((tag.name if isinstance(tag, RSymbol) else None, self.item()))
            flags = self.i32()
            if flags & 0xFF == _NILVALUE:
                return cells
            if flags & 0xFF != _LIST:
                raise ValueError(f"R data: pairlist tail must be a pairlist or NULL, got type {flags & 0xFF}")
            has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))


def read_r_serialized(data: bytes) -> object:
    """Decode one R object serialized in XDR format (the payload of an .rds file or a lazy-load record)."""
    reader = _XdrReader(data)
    reader.header()
    return reader.item()


def read_r_string_vector(data: bytes) -> list[str | None]:
    """Decode a serialized R character vector; ``None`` stands for ``NA``."""
    obj = read_r_serialized(data)
    if not isinstance(obj, RObject) or obj.sexptype != _STR:
        raise ValueError("data must hold a serialized R character vector (SEXP type 16)")
    return obj.value


def _decompress_lazyload_record(record: bytes, compressed: int) -> bytes:
    # Record = 4-byte big-endian uncompressed length + payload (R's lazyLoadDBfetch).
    (size,) = struct.unpack(">I", record[:4])
    if compressed == 1:
        out = zlib.decompress(record[4:])
    elif compressed in (2, 3):  # one type byte, then bzip2 ('2'), xz ('Z') or stored ('0')
        kind, payload = record[4:5], record[5:]
        out = {b"2": bz2.decompress, b"Z": lzma.decompress, b"0": bytes}[kind](payload)
    else:
        out = record[4:]
    if len(out) != size:
        raise ValueError(f"R lazy-load record: expected {size} bytes after decompression, got {len(out)}")
    return out


def read_lazyload_db(rdb_path: Path, rdx_path: Path) -> dict[str, object]:
    """Read every variable of an R lazy-load database (``Rdata.rdb`` + ``Rdata.rdx``), keyed by name."""
    raw = Path(rdx_path).read_bytes()
    index_bytes = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else _decompress_lazyload_record(raw, 1)
    index = read_r_serialized(index_bytes)
    if not isinstance(index, RObject) or index.sexptype != _VEC:
        raise ValueError(f"{rdx_path}: expected a list as lazy-load index")
    parts = dict(zip(index.attributes["names"].value, index.value, strict=True))
    compressed = parts["compressed"].value[0]
    compressed = int(compressed) if compressed is not None else 0
    variables = parts["variables"]
    db = Path(rdb_path).read_bytes()
    out = {}
    for name, pos in zip(variables.attributes["names"].value, variables.value, strict=True):
        offset, size = (int(v) for v in pos.value)
        out[name] = read_r_serialized(_decompress_lazyload_record(db[offset : offset + size], compressed))
    return out


# --------------------------------------------------------------------------------------------------------------
# Jane Austen (r-cran-janeaustenr)

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
        if not isinstance(obj, RObject) or obj.sexptype != _STR:
            raise ValueError(f"janeaustenr: {variable} is not a character vector")
        novels[name] = clean_austen([line or "" for line in obj.value])
    return novels


# --------------------------------------------------------------------------------------------------------------
# SWORD zText module + OSIS markup (sword-text-web)


def read_ztext_entries(module_dir: Path, testament: str) -> list[str]:
    """Texts of every verse slot of one testament (``"ot"`` or ``"nt"``) of a SWORD zText module, in order.

    ``{t}.bzs`` lists compressed blocks as ``<III`` (offset, compressed size, uncompressed size) records,
    ``{t}.bzz`` holds the zlib blocks and ``{t}.bzv`` the slots as ``<IIH`` (block, offset in block, size).
    Slot 0 is the module header and slot 1 the testament heading; empty slots give ``""``.
    """
    if testament not in ("ot", "nt"):
        raise ValueError(f"testament must be 'ot' or 'nt', got {testament!r}")
    module_dir = Path(module_dir)
    bzs = (module_dir / f"{testament}.bzs").read_bytes()
    bzz = (module_dir / f"{testament}.bzz").read_bytes()
    bzv = (module_dir / f"{testament}.bzv").read_bytes()
    if len(bzs) % 12 or len(bzv) % 10:
        raise ValueError(
            f"{module_dir}: index sizes {len(bzs)} (.bzs) and {len(bzv)} (.bzv) must be multiples of 12 and 10"
        )
    blocks = [struct.unpack_from("<III", bzs, i) for i in range(0, len(bzs), 12)]
    cache: dict[int, bytes] = {}
    entries = []
    for i in range(0, len(bzv), 10):
        block, offset, size = struct.unpack_from("<IIH", bzv, i)
        if size == 0:
            entries.append("")
            continue
        if block >= len(blocks):
            raise ValueError(f"{module_dir}: verse slot {i // 10} points at block {block} of {len(blocks)}")
        if block not in cache:
            start, csize, usize = blocks[block]
            cache[block] = zlib.decompress(bzz[start : start + csize])
            if len(cache[block]) != usize:
                raise ValueError(f"{module_dir}: block {block} inflates to {len(cache[block])} bytes, not {usize}")
        data = cache[block]
        if offset + size > len(data):
            raise ValueError(f"{module_dir}: verse slot {i // 10} overruns block {block}")
        entries.append(data[offset : offset + size].decode("utf-8"))
    return entries


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
    books: list[BibleBook] = []
    book: BibleBook | None = None
    note_depth = 0
    after_note = False
    hidden_titles: list[bool] = []  # open <title> elements: is its text dropped?
    skipped_ids: set[str] = set()
    for entry in entries:
        # Strong's-number word wrappers are most of the tags: remove them first. The space keeps words of
        # adjacent slots apart.
        for token in _TAG.findall(_WORD_TAG.sub("", entry) + " "):
            if not token.startswith("<"):
                if book is not None and not (note_depth or skipped_ids or any(hidden_titles)):
                    line = book.blocks[-1][-1]
                    book.blocks[-1][-1] = line + (_note_gap(line, token) if after_note else "") + token
                    after_note = False
                continue
            closing, self_closing = token.startswith("</"), token.endswith("/>")
            name = token[1:].lstrip("/").split(None, 1)[0].rstrip("/>")
            attrs = dict(_ATTR.findall(token))
            kind = attrs.get("type", "")
            if name == "note":
                note_depth += 0 if self_closing else (-1 if closing else 1)
                after_note = True
            elif note_depth:
                continue
            elif name == "div" and kind in _SKIPPED_DIVS:
                if "sID" in attrs:
                    skipped_ids.add(attrs["sID"])
                elif "eID" in attrs:
                    skipped_ids.discard(attrs["eID"])
            elif name == "div" and "eID" in attrs and attrs["eID"] in skipped_ids:
                skipped_ids.discard(attrs["eID"])
            elif skipped_ids:
                continue
            elif name == "div" and kind == "book":
                if "sID" in attrs or not (closing or self_closing):
                    book = BibleBook(attrs.get("osisID", "unknown"))
                    books.append(book)
                else:
                    book = None
            elif book is None:
                continue
            elif name == "title":
                # Psalm superscriptions are canonical text; book titles and section headings are not kept.
                if closing and hidden_titles:
                    hidden_titles.pop()
                elif not self_closing:
                    hidden_titles.append(kind != "psalm")
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
    return books


# Output groups of the Bible books (OSIS ids), in canonical order within the module.
BIBLE_GROUPS = {
    "law": "Gen Exod Lev Num Deut",
    "history": "Josh Judg Ruth 1Sam 2Sam 1Kgs 2Kgs 1Chr 2Chr Ezra Neh Esth",
    "wisdom": "Job Ps Prov Eccl Song",
    "prophets": "Isa Jer Lam Ezek Dan Hos Joel Amos Obad Jonah Mic Nah Hab Zeph Hag Zech Mal",
    "deuterocanon": "Tob Jdt EsthGr AddEsth Wis Sir Bar EpJer PrAzar Sus Bel DanGr 1Macc 2Macc 1Esd PrMan AddPs"
    " Ps151 3Macc 2Esd 4Macc",
    "gospels-acts": "Matt Mark Luke John Acts",
    "letters-revelation": "Rom 1Cor 2Cor Gal Eph Phil Col 1Thess 2Thess 1Tim 2Tim Titus Phlm Heb Jas 1Pet 2Pet"
    " 1John 2John 3John Jude Rev",
}


def _sword_conf(package_root: Path) -> dict[str, str]:
    confs = sorted((Path(package_root) / "usr/share/sword/mods.d").glob("*.conf"))
    if len(confs) != 1:
        raise ValueError(f"{package_root}: expected exactly one SWORD module .conf, found {len(confs)}")
    conf = {}
    for line in confs[0].read_text(encoding="utf-8").splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#") and key.strip() not in conf:
            conf[key.strip()] = value.strip()
    return conf


def read_bible(package_root: Path) -> dict[str, list[str]]:
    """Plain-text books of an unpacked ``sword-text-web``, grouped as in ``BIBLE_GROUPS`` (one string per book)."""
    conf = _sword_conf(package_root)
    if conf.get("ModDrv", "").lower() != "ztext" or conf.get("SourceType", "").upper() != "OSIS":
        found = f"{conf.get('ModDrv')}/{conf.get('SourceType')}"
        raise ValueError(f"SWORD module must be a zText module with OSIS markup, got {found}")
    module_dir = Path(package_root) / "usr/share/sword" / conf["DataPath"]
    entries = read_ztext_entries(module_dir, "ot") + read_ztext_entries(module_dir, "nt")
    group_of = {osis: group for group, ids in BIBLE_GROUPS.items() for osis in ids.split()}
    groups: dict[str, list[str]] = {group: [] for group in BIBLE_GROUPS}
    for book in osis_books(entries):
        groups.setdefault(group_of.get(book.osis_id, "other"), []).append(book.text())
    return {group: books for group, books in groups.items() if books}


# --------------------------------------------------------------------------------------------------------------
# Debian packages and the build


@dataclass(frozen=True)
class SourceInfo:
    package: str
    name: str  # how the output is called (its directory)
    licence: str
    attribution: str


SOURCES = {
    "austen": SourceInfo(
        package="r-cran-janeaustenr",
        name="austen",
        licence="Texts: public domain. R package janeaustenr: MIT (Copyright 2016-2017 Julia Silge).",
        attribution="Jane Austen's six completed novels as packaged in janeaustenr by Julia Silge "
        "(https://github.com/juliasilge/janeaustenr), from Project Gutenberg texts.",
    ),
    "bible": SourceInfo(
        package="sword-text-web",
        name="bible-web-derived",
        licence="Public domain (text dedicated to the public domain by its translators; Debian packaging GPL-2+).",
        attribution='Derived from the World English Bible with Deuterocanon (eBible.org), SWORD module '
        'engWEB2015eb. Footnotes, cross references, headings and front matter were removed and markup '
        'stripped, so per the eBible.org trademark condition this altered text is not called "World English '
        'Bible".',
    ),
}


def fetch_package(package: str, work_dir: Path, deb_dir: Path | None = None) -> tuple[Path, Path]:
    """Download (``apt-get download``) and unpack (``dpkg-deb -x``) a Debian package; returns (.deb, root).

    A matching ``{package}_*.deb`` already in ``deb_dir`` is used instead of downloading (offline rebuilds).
    """
    work_dir = Path(work_dir)
    debs = sorted(Path(deb_dir).glob(f"{package}_*.deb")) if deb_dir is not None else []
    if not debs:
        result = subprocess.run(["apt-get", "download", package], cwd=work_dir, capture_output=True, text=True)
        if result.returncode != 0 and "Unable to locate package" in result.stderr:
            subprocess.run(["apt-get", "update"], check=True, capture_output=True)
            result = subprocess.run(["apt-get", "download", package], cwd=work_dir, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"apt-get download {package} failed: {result.stderr.strip()}")
        debs = sorted(work_dir.glob(f"{package}_*.deb"))
    if len(debs) != 1:
        raise RuntimeError(f"expected one {package}_*.deb, found {[d.name for d in debs]}")
    root = work_dir / f"{package}-root"
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(root)], check=True)
    return debs[0], root


def _deb_version(deb: Path) -> str:
    result = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True, text=True)
    return result.stdout.strip()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def render_sources_md(manifest: dict) -> str:
    """Human-readable attribution and licence list for a built corpus."""
    built_by = f"Built by `python -m qwen3next.train.corpus` (format {manifest['format']})."
    lines = ["# Sources of this corpus", "", built_by, ""]
    for key, src in manifest["sources"].items():
        lines += [
            f"## {src['name']} (`{key}`)",
            "",
            f"- Debian package: `{src['package']}` version `{src['version']}`"
            f" (sha256 of the .deb `{src['deb_sha256']}`)",
            f"- Licence: {src['licence']}",
            f"- Attribution: {src['attribution']}",
            f"- Files: {', '.join(f'`{f}`' for f in src['files'])} ({src['bytes']:,} bytes)",
            "",
        ]
    return "\n".join(lines)


def build_corpus(
    out_dir: Path, sources: Sequence[str] = SOURCE_NAMES, deb_dir: Path | None = None, verbose: bool = False
) -> dict:
    """Fetch the packages, extract clean text and write the corpus files, ``manifest.json`` and ``SOURCES.md``.

    Returns the manifest. Output bytes depend only on the package versions (recorded in the manifest).
    """
    unknown = [s for s in sources if s not in SOURCES]
    if unknown or not sources:
        raise ValueError(f"sources must be a non-empty subset of {list(SOURCES)}, got {list(sources)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"format": 1, "doc_end": DOC_END, "sources": {}, "files": {}}
    with tempfile.TemporaryDirectory(prefix="qwen3next-corpus-") as tmp:
        for key in sources:
            info = SOURCES[key]
            start = time.perf_counter()
            deb, root = fetch_package(info.package, Path(tmp), deb_dir)
            if key == "austen":
                groups = {name: [text] for name, text in read_austen(root).items()}
            else:
                groups = read_bible(root)
            files = []
            total = 0
            (out_dir / info.name).mkdir(exist_ok=True)
            for group, documents in groups.items():
                data = join_documents(documents).encode("utf-8")
                filename = f"{info.name}/{group}.txt"
                (out_dir / filename).write_bytes(data)
                manifest["files"][filename] = {
                    "source": key,
                    "documents": len(documents),
                    "bytes": len(data),
                    "lines": data.count(b"\n"),
                    "sha256": _sha256(data),
                }
                files.append(filename)
                total += len(data)
            manifest["sources"][key] = {
                "name": info.name,
                "package": info.package,
                "version": _deb_version(deb),
                "deb_sha256": _sha256(deb.read_bytes()),
                "licence": info.licence,
                "attribution": info.attribution,
                "files": files,
                "bytes": total,
            }
            if verbose:
                seconds = time.perf_counter() - start
                print(f"{key}: {len(files)} files, {total:,} bytes in {seconds:.1f}s", file=sys.stderr)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "SOURCES.md").write_text(render_sources_md(manifest), encoding="utf-8")
    return manifest


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the demo model's training corpus from Debian packages.")
    parser.add_argument("out_dir", nargs="?", default="runs/corpus", type=Path)
    parser.add_argument("--sources", default=",".join(SOURCE_NAMES), help="comma-separated subset of austen,bible")
    parser.add_argument("--deb-dir", type=Path, default=None, help="use .deb files from here instead of downloading")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    manifest = build_corpus(args.out_dir, args.sources.split(","), args.deb_dir, verbose=True)
    for src in manifest["sources"].values():
        print(f"{src['name']}: {src['package']} {src['version']}, {src['bytes']:,} bytes")
    print(f"wrote {args.out_dir} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
