"""llama.cpp as a benchmark peer for `qwen3next bench --compare llama.cpp`.

llama.cpp's `llama-bench` runs as a subprocess on GGUF files converted from the same HF directory as ours: decode
(`tg`: N tokens after a CONTEXT-token context) and prefill (`pp`: P tokens), at the same thread count. The harness
interleaves its rounds with ours; this module holds what is llama.cpp's own: finding and checking the binary, the
command line, parsing its JSON lines, reading a GGUF header for the weight bytes a decode token reads, and the
per-round pairing math.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import statistics
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

# GGUF format -> our variant it is measured against (None: our float model at --dtype float32).
GGUF_VARIANTS: dict[str, str | None] = {"F32": None, "BF16": "bf16", "Q8_0": "int8", "Q4_K_M": "int4"}
JSONL_FIELDS = ("n_prompt", "n_gen", "n_depth", "avg_ts", "stddev_ts", "samples_ts")  # what we need from a line
JSONL_EXTRA = ("model_type", "model_size", "n_threads", "build_commit")  # kept for the report when present


class LlamaBenchError(RuntimeError):
    """One llama-bench run failed (exit status, timeout, or no result line); the bench reports it and goes on."""


# ---- options ---------------------------------------------------------------------------------------------------------
def find_llama_bench(path: str | None) -> str:
    """The llama-bench executable: `path` (a file path, or a name looked up on PATH), default `llama-bench` on PATH.
    Raises ValueError naming --llama-bench if there is none."""
    found = shutil.which(path if path is not None else "llama-bench")
    if found is None:
        if path is None:
            raise ValueError("llama_bench: --compare llama.cpp needs --llama-bench PATH (no llama-bench on PATH)")
        why = "not executable" if Path(path).is_file() else "no such file"
        raise ValueError(f"llama_bench: {path} is not an executable llama-bench ({why})")
    return found


def parse_gguf_args(items: list[str]) -> dict[str, str]:
    """`--gguf` values ["F32=a.gguf", "Q8_0=b.gguf"] -> {"F32": "a.gguf", "Q8_0": "b.gguf"} (format names are
    case-insensitive). Raises ValueError for a malformed item or a format given twice."""
    out: dict[str, str] = {}
    for item in items:
        fmt, sep, path = item.partition("=")
        if not sep or not fmt or not path:
            raise ValueError(f"gguf: expected FORMAT=PATH (e.g. Q8_0=model-Q8_0.gguf), got {item!r}")
        fmt = fmt.upper()
        if fmt in out:
            raise ValueError(f"gguf: format {fmt} given twice")
        out[fmt] = path
    return out


def check_gguf(gguf: dict[str, str]) -> None:
    """Every format known, every file present and a GGUF of that format; ValueError naming --gguf otherwise."""
    if not gguf:
        raise ValueError(f"gguf: --compare llama.cpp needs --gguf FORMAT=PATH ... (FORMAT: {', '.join(GGUF_VARIANTS)})")
    for fmt, path in gguf.items():
        if fmt not in GGUF_VARIANTS:
            raise ValueError(f"gguf: unknown format {fmt!r}; expected some of {', '.join(GGUF_VARIANTS)}")
        if not Path(path).is_file():
            raise ValueError(f"gguf: {fmt}={path}: no such file")
        held = gguf_format(path)
        if held is not None and held != fmt:
            raise ValueError(f"gguf: {fmt}={path} holds {held} weights")


def check_gguf_model(fmt: str, path: str, hidden_size: int, vocab_size: int) -> None:
    """A cheap same-weights check against our model's config: the GGUF's embedding width and vocabulary."""
    meta, tensors = read_gguf(path)
    arch = meta.get("general.architecture")
    embd = next((t for t in tensors if t.name == "token_embd.weight"), None)
    got = (meta.get(f"{arch}.embedding_length"), embd.shape[-1] if embd else None)
    if arch != "qwen3next" or got != (hidden_size, vocab_size):
        raise ValueError(f"gguf: {fmt}={path} was not converted from --model: architecture {arch}, hidden size and "
                         f"vocab {got[0]}, {got[1]} vs the model's {hidden_size}, {vocab_size}")


# ---- running llama-bench ---------------------------------------------------------------------------------------------
def parse_jsonl(text: str) -> list[dict[str, object]]:
    """The result lines of `llama-bench -o jsonl` (one JSON object per test; other lines ignored), reduced to
    JSONL_FIELDS and whichever of JSONL_EXTRA are present. Raises LlamaBenchError for a line missing a field."""
    results = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise LlamaBenchError(f"llama-bench: unreadable JSON line ({e}): {line[:120]}") from None
        missing = [f for f in JSONL_FIELDS if f not in d]
        if missing:
            raise LlamaBenchError(f"llama-bench: result line without {missing}: {line[:120]}")
        results.append({f: d[f] for f in (*JSONL_FIELDS, *JSONL_EXTRA) if f in d})
    return results


@dataclass(frozen=True)
class LlamaBench:
    """llama-bench at a fixed thread count (`-t T` and OMP_NUM_THREADS=T); `timeout_s` bounds each run."""

    binary: str
    threads: int
    timeout_s: float = 600.0

    def command(self, gguf: str, prompt: list[int] | None = None, gen: int = 0, depth: int = 0,
                reps: int = 1) -> list[str]:
        """prompt [P, ...] with gen 0: prefill of P tokens; prompt None with gen N: N decode tokens after a `depth`
        context. llama-bench's own warmup run precedes the timed `reps`."""
        pp = ",".join(str(p) for p in prompt) if prompt else "0"
        return [self.binary, "-m", str(gguf), "-t", str(self.threads), "-p", pp, "-n", str(gen), "-d", str(depth),
                "-r", str(reps), "-o", "jsonl"]

    def run(self, cmd: list[str]) -> list[dict[str, object]]:
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout_s, env=env, check=False)
        except subprocess.TimeoutExpired:
            raise LlamaBenchError(f"llama-bench timed out after {self.timeout_s:.0f} s: {' '.join(cmd)}") from None
        except OSError as e:
            raise LlamaBenchError(f"llama-bench could not start: {e}") from None
        if done.returncode != 0:
            last = next((ln.strip() for ln in reversed(done.stderr.splitlines()) if ln.strip()), "no message")
            raise LlamaBenchError(f"llama-bench exited with status {done.returncode}: {last}")
        results = parse_jsonl(done.stdout)
        if not results:
            raise LlamaBenchError(f"llama-bench printed no result line: {' '.join(cmd)}")
        return results

    def decode(self, gguf: str, context: int, tokens: int) -> dict[str, object]:
        """One timed run of `tokens` decode steps after a `context`-token context: its result line."""
        return _pick(self.run(self.command(gguf, gen=tokens, depth=context)), n_prompt=0, n_gen=tokens,
                     n_depth=context)

    def prefill(self, gguf: str, lengths: list[int]) -> dict[int, dict[str, object]]:
        """One timed prefill per length (one llama-bench call for all): length -> its result line."""
        results = self.run(self.command(gguf, prompt=lengths))
        return {n: _pick(results, n_prompt=n, n_gen=0, n_depth=0) for n in lengths}


def _pick(results: list[dict[str, object]], **want: int) -> dict[str, object]:
    for r in results:
        if all(r[k] == v for k, v in want.items()):
            return r
    raise LlamaBenchError(f"llama-bench: no result line with {want}")


def tokens_per_s(result: dict[str, object]) -> float:
    """A result line's tok/s: the median of its samples (one sample per rep)."""
    samples = result["samples_ts"] or [result["avg_ts"]]
    return float(statistics.median(samples))


# ---- pairing ---------------------------------------------------------------------------------------------------------
def pair_rounds(ours: list[float | None], theirs: list[float | None]) -> dict[str, object]:
    """Round r of ours (tok/s) against round r of llama.cpp's; None marks a side that failed in that round.
    Medians of each side over its rounds, the per-round ratios ours / llama.cpp, and their min and median."""
    if len(ours) != len(theirs):
        raise ValueError(f"pair_rounds: {len(ours)} rounds of ours vs {len(theirs)} of llama.cpp")
    ratios = [o / t for o, t in zip(ours, theirs) if o is not None and t is not None]
    mine, peer = [x for x in ours if x is not None], [x for x in theirs if x is not None]
    return {"ours_tokens_per_s": statistics.median(mine) if mine else None,
            "llama_cpp_tokens_per_s": statistics.median(peer) if peer else None,
            "ratios": ratios, "ratio_min": min(ratios) if ratios else None,
            "ratio_median": statistics.median(ratios) if ratios else None}


def round_line(samples: dict[str, list[float | None]], r: int) -> str:
    """Round r's tok/s of each side in `samples` ({"llama_cpp": per-round tok/s, "eager": ..., ...}), ours with its
    ratio to llama.cpp: a progress line."""
    peer = samples["llama_cpp"][r]
    parts = []
    for side, values in samples.items():
        x = values[r]
        text = f"{side.replace('_', '.')} " + (f"{x:.1f}" if x is not None else "-")
        if side != "llama_cpp" and x is not None and peer is not None:
            text += f" ({x / peer:.2f}x)"
        parts.append(text)
    return ", ".join(parts) + " tok/s"


def paired_row(phase: str, tokens: int, context: int, samples: dict[str, list[float | None]],
               ideal: dict[str, float | None] | None) -> dict[str, object]:
    """One row of the comparison: per side of `samples` (as in `round_line`) its per-round tok/s and their median;
    for ours also the per-round ratios to llama.cpp with their min and median; with `ideal` (side -> roofline tok/s,
    decode rows) the share of its own roofline."""
    row: dict[str, object] = {"phase": phase, "tokens": tokens, "context": context}
    peer = samples["llama_cpp"]
    for side, values in samples.items():
        present = [x for x in values if x is not None]
        entry: dict[str, object] = {"rounds": values, "tokens_per_s": statistics.median(present) if present else None}
        if side != "llama_cpp":
            paired = pair_rounds(values, peer)
            entry.update({k: paired[k] for k in ("ratios", "ratio_min", "ratio_median")})
        if ideal is not None and ideal.get(side) and entry["tokens_per_s"] is not None:
            entry["roofline_pct"] = 100 * entry["tokens_per_s"] / ideal[side]
        row[side] = entry
    return row


# ---- GGUF header: the weight bytes a decode token reads ------------------------------------------------------------
# ggml type id -> (elements per block, bytes per block), for the types converters and llama-quantize write here;
# a tensor of any other type is sized from the gap to the next tensor's offset.
GGML_BLOCKS: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 36),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 30: (1, 2),
}
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the contiguous (input) dimension
    ggml_type: int
    nbytes: int


class _Reader:
    def __init__(self, buf: mmap.mmap):
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str):
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.scalar("<Q")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item, n = self.scalar("<I"), self.scalar("<Q")
            if item in _SCALARS and item != 7:  # skip numeric arrays (token types, scores) without decoding them
                self.pos += n * struct.calcsize(_SCALARS[item])
                return None
            return [self.value(item) for _ in range(n)]
        if vtype not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {vtype}")
        return self.scalar(_SCALARS[vtype])


def _read_header(r: _Reader) -> tuple[dict[str, object], list[tuple], int]:
    r.pos = 4
    version, n_tensors, n_kv = r.scalar("<I"), r.scalar("<Q"), r.scalar("<Q")
    if version < 2:
        raise ValueError(f"GGUF version {version} is not supported")
    meta = {}
    for _ in range(n_kv):
        key = r.string()
        meta[key] = r.value(r.scalar("<I"))
    infos = []  # (name, shape, ggml type, offset in the data section)
    for _ in range(n_tensors):
        name = r.string()
        shape = tuple(r.scalar("<Q") for _ in range(r.scalar("<I")))
        infos.append((name, shape, r.scalar("<I"), r.scalar("<Q")))
    align = int(meta.get("general.alignment", 32))
    return meta, infos, len(r.buf) - (-(-r.pos // align) * align)


def read_gguf(path: str | Path) -> tuple[dict[str, object], list[GGUFTensor]]:
    """The metadata (numeric arrays left out) and tensor table of a GGUF v2/v3 file."""
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"gguf: {path} is not a GGUF file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                meta, infos, data_bytes = _read_header(_Reader(buf))
            except (struct.error, ValueError) as e:
                raise ValueError(f"gguf: {path}: unreadable GGUF header ({e})") from None
    ends = sorted({offset for *_, offset in infos} | {data_bytes})
    tensors = []
    for name, shape, ggml_type, offset in infos:
        numel = 1
        for d in shape:
            numel *= d
        if ggml_type in GGML_BLOCKS:
            block, size = GGML_BLOCKS[ggml_type]
            nbytes = numel // block * size
        else:
            nbytes = ends[ends.index(offset) + 1] - offset  # includes the alignment padding (< `align` bytes)
        tensors.append(GGUFTensor(name, shape, ggml_type, nbytes))
    return meta, tensors


LLAMA_FILE_TYPES = {0: "F32", 32: "BF16", 7: "Q8_0", 15: "Q4_K_M"}  # general.file_type (llama_ftype) -> format


def gguf_format(path: str | Path) -> str | None:
    """The GGUF's format name from its general.file_type (None: a type outside GGUF_VARIANTS or none recorded)."""
    meta, _ = read_gguf(path)
    return LLAMA_FILE_TYPES.get(meta.get("general.file_type"))


WEIGHTS_RULE = ("llama.cpp's weight bytes per decode token are read from the GGUF tensor table by our own rule: one "
                "token_embd row, top-k/E of each expert tensor, every other tensor in full, the MTP layers not at all")


def gguf_decode_weight_bytes(path: str | Path) -> dict[str, int]:
    """Weight bytes one batch-1 decode token reads from a GGUF, by the rule of our own count: one row of
    token_embd (all of it when there is no output.weight and it doubles as the LM head), top-k of E of every
    `*_exps` tensor, every other tensor in full, the MTP (nextn) layers not at all. Also the file's size and its
    tensors' total (what llama-bench reports as model_size)."""
    meta, tensors = read_gguf(path)
    arch = meta.get("general.architecture", "")
    E, k = int(meta.get(f"{arch}.expert_count", 0) or 0), int(meta.get(f"{arch}.expert_used_count", 0) or 0)
    blocks = int(meta.get(f"{arch}.block_count", 0) or 0)
    mtp_from = blocks - int(meta.get(f"{arch}.nextn_predict_layers", 0) or 0)
    has_output = any(t.name == "output.weight" for t in tensors)
    per_token = 0
    for t in tensors:
        parts = t.name.split(".")
        if parts[0] == "blk" and int(parts[1]) >= mtp_from:
            continue
        if t.name == "token_embd.weight":
            per_token += t.nbytes // t.shape[-1] + (0 if has_output else t.nbytes)
        elif "_exps." in t.name and E:
            per_token += t.nbytes * k // E
        else:
            per_token += t.nbytes
    return {"file_bytes": Path(path).stat().st_size, "tensor_bytes": sum(t.nbytes for t in tensors),
            "weight_bytes_per_token": per_token}
