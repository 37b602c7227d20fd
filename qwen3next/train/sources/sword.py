"""The Bible of the Debian package ``sword-text-web``: a SWORD zText module (zlib-compressed verse slots) whose
text is OSIS markup, read into plain-text books grouped into a few files."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from .osis import osis_books


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

