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

The readers of the two packages live in ``qwen3next.train.sources``; this module builds the corpus from them and
re-exports them. Run as ``python -m qwen3next.train.corpus OUT_DIR [--sources austen,bible]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from .documents import DOC_SEPARATOR, join_documents
from .documents import split_documents as _split_documents
from .sources.austen import AUSTEN_NOVELS, clean_austen, read_austen, unwrap_paragraphs
from .sources.osis import BibleBook, osis_books, strip_osis
from .sources.rdata import RObject, RSymbol, read_lazyload_db, read_r_serialized, read_r_string_vector
from .sources.sword import BIBLE_GROUPS, read_bible, read_ztext_entries

__all__ = [  # the build, the document layout and the readers of the sources
    "SOURCE_NAMES", "SOURCES", "SourceInfo", "build_corpus", "fetch_package", "main", "render_sources_md",
    "join_documents", "split_documents",
    "AUSTEN_NOVELS", "clean_austen", "read_austen", "unwrap_paragraphs",
    "BIBLE_GROUPS", "BibleBook", "osis_books", "read_bible", "read_ztext_entries", "strip_osis",
    "RObject", "RSymbol", "read_lazyload_db", "read_r_serialized", "read_r_string_vector",
]

SOURCE_NAMES = ("austen", "bible")

# Corpus files are always in `join_documents`' layout, so reading one back is strict: a file that does not end with
# the `<|endoftext|>` line is an error.
split_documents = partial(_split_documents, strict=True)


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
    A failing command is a RuntimeError naming it with its stderr (a missing one: FileNotFoundError).
    """
    work_dir = Path(work_dir)
    debs = sorted(Path(deb_dir).glob(f"{package}_*.deb")) if deb_dir is not None else []
    if not debs:
        result = subprocess.run(["apt-get", "download", package], cwd=work_dir, capture_output=True, text=True)
        if result.returncode != 0 and "Unable to locate package" in result.stderr:
            _run_checked(["apt-get", "update"])
            result = subprocess.run(["apt-get", "download", package], cwd=work_dir, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"apt-get download {package} failed: {result.stderr.strip()}")
        debs = sorted(work_dir.glob(f"{package}_*.deb"))
    if len(debs) != 1:
        raise RuntimeError(f"expected one {package}_*.deb, found {[d.name for d in debs]}")
    root = work_dir / f"{package}-root"
    _run_checked(["dpkg-deb", "-x", str(debs[0]), str(root)])
    return debs[0], root


def _run_checked(cmd: list[str]) -> str:
    """stdout of `cmd`; RuntimeError with its exit status and stderr when it fails."""
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit status {result.returncode}): {result.stderr.strip()}")
    return result.stdout


def _deb_version(deb: Path) -> str:
    return _run_checked(["dpkg-deb", "-f", str(deb), "Version"]).strip()


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
    manifest: dict = {"format": 1, "doc_end": DOC_SEPARATOR, "sources": {}, "files": {}}
    with tempfile.TemporaryDirectory(prefix="qwen3next-corpus-") as tmp:
        for key in sources:
            start = time.perf_counter()
            manifest["sources"][key] = _build_source(key, out_dir, Path(tmp), deb_dir, manifest["files"])
            if verbose:
                seconds = time.perf_counter() - start
                src = manifest["sources"][key]
                print(f"{key}: {len(src['files'])} files, {src['bytes']:,} bytes in {seconds:.1f}s", file=sys.stderr)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "SOURCES.md").write_text(render_sources_md(manifest), encoding="utf-8")
    return manifest


def _build_source(key: str, out_dir: Path, work_dir: Path, deb_dir: Path | None, file_entries: dict) -> dict:
    """Write one source's files under ``out_dir/<its name>/``, add them to ``file_entries``; its manifest entry."""
    info = SOURCES[key]
    deb, root = fetch_package(info.package, work_dir, deb_dir)
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
        file_entries[filename] = {
            "source": key,
            "documents": len(documents),
            "bytes": len(data),
            "lines": data.count(b"\n"),
            "sha256": _sha256(data),
        }
        files.append(filename)
        total += len(data)
    return {
        "name": info.name,
        "package": info.package,
        "version": _deb_version(deb),
        "deb_sha256": _sha256(deb.read_bytes()),
        "licence": info.licence,
        "attribution": info.attribution,
        "files": files,
        "bytes": total,
    }



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
