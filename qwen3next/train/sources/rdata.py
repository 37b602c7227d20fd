"""A reader of R's serialization format (XDR binary, versions 2 and 3) and of R lazy-load databases.

Only the subset that R data packages use is read: NULL, symbols, pairlists, strings, logical / integer / double
vectors and lists, with their attributes. No R installation and no extra Python package is needed.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path


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
_LGL, _INT, _REAL, _VEC, _EXPR = 10, 13, 14, 19, 20
STRSXP = 16  # R's type code of a character vector
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
        elif sexptype in (STRSXP, _VEC, _EXPR):
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
    if not isinstance(obj, RObject) or obj.sexptype != STRSXP:
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

