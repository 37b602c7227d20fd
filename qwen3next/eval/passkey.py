"""`qwen3next eval passkey`: RULER-style single-needle retrieval.

A prompt of exactly L tokens: an instruction, a haystack of the evaluation text with the needle
"The pass key is 71432. Remember it. 71432 is the pass key." inserted at a depth fraction (snapped to the nearest
sentence end), then the question. With the chat template the whole of it is one user turn and the assistant's
reply starts with "The pass key is"; the plain format ends the prompt with "What is the pass key? The pass key is".
The model answers greedily through the engine; a trial passes when the key appears in the answer as a whole number.
Keys and haystack offsets are drawn from `--seed`, so every cell of the grid sees different text and keys.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import load_model
from ..engine.llm import Engine
from ..engine.sampling import SamplingParams
from ..tokenizer import Tokenizer
from .plots import plot_passkey_heatmap, require_matplotlib
from .table import format_columns
from .text import load_text

INSTRUCTION = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
               "memorize it. I will quiz you about it afterwards.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key?"
ANSWER_START = "The pass key is"
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
_SENTENCE_END = re.compile(r"""[.!?]["')\]]*\s*$|\n\s*$""")
_HAYSTACK = "\x00HAYSTACK\x00"  # marks where the haystack goes in the rendered chat template


def is_correct(answer: str, key: str) -> bool:
    """The key appears in the answer as a whole number (not inside a longer run of digits)."""
    return re.search(rf"(?<!\d){re.escape(key)}(?!\d)", answer) is not None


def has_chat_template(model_dir: str | Path) -> bool:
    """Whether the model directory declares a chat template (the tokenizer falls back to a built-in one)."""
    d = Path(model_dir)
    if (d / "chat_template.jinja").is_file():
        return True
    cfg = d / "tokenizer_config.json"
    try:
        return bool(json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")) if cfg.is_file() else False
    except (ValueError, AttributeError):
        return False


@dataclass(frozen=True)
class PasskeyPrompt:
    ids: list[int]
    key: str
    depth: float
    needle_at: int  # token index where the needle starts


class PasskeyPrompts:
    """Builds prompts of an exact token length from a tokenized haystack text (repeated when too short)."""

    def __init__(self, tokenizer: Tokenizer, haystack_text: str, chat: bool):
        self.tokenizer = tokenizer
        if chat:
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": f"{INSTRUCTION}\n\n{_HAYSTACK}\n\n{QUESTION}"}],
                add_generation_prompt=True)
            head, tail = rendered.split(_HAYSTACK)
            tail += ANSWER_START
        else:
            head, tail = f"{INSTRUCTION}\n\n", f"\n\n{QUESTION} {ANSWER_START}"
        self.head, self.tail = tokenizer.encode(head), tokenizer.encode(tail)
        self.haystack = tokenizer.encode(haystack_text.strip() + "\n\n")
        if not self.haystack:
            raise ValueError("--text: no tokens to build a haystack from")
        pieces = {t: tokenizer.decode([t]) for t in set(self.haystack)}
        # positions i where a sentence has just ended (a cut before haystack[i] falls between sentences)
        self.boundaries = [0] + [i + 1 for i, t in enumerate(self.haystack) if _SENTENCE_END.search(pieces[t])]

    def needle_ids(self, key: str) -> list[int]:
        return self.tokenizer.encode(" " + NEEDLE.format(key=key) + " ")

    def fixed_tokens(self, key: str = "12345") -> int:
        """Tokens of a prompt that are not haystack (instruction, needle, question)."""
        return len(self.head) + len(self.needle_ids(key)) + len(self.tail)

    def build(self, length: int, depth: float, key: str, rng: random.Random) -> PasskeyPrompt:
        """A prompt of exactly `length` tokens with the needle at `depth` (0 = right after the instruction, 1 = right
        before the question) of a haystack starting at a random sentence of the text."""
        needle = self.needle_ids(key)
        n = length - len(self.head) - len(needle) - len(self.tail)
        if n < 1:
            raise ValueError(f"--lengths: {length} tokens leave no room for a haystack (instruction, needle and "
                             f"question take {length - n} tokens)")
        start = rng.choice(self.boundaries[:-1] or [0])
        size = len(self.haystack)
        reps = -(-(start + n) // size)
        hay = (self.haystack * reps)[start:start + n]
        # the sentence end nearest to the depth (offsets into `hay`, over every copy of the text), 0 and n included
        ends = [k * size + b - start for k in range(reps) for b in self.boundaries if 0 <= k * size + b - start <= n]
        cut = min([0, n, *ends], key=lambda b: (abs(b - depth * n), b))
        ids = self.head + hay[:cut] + needle + hay[cut:] + self.tail
        assert len(ids) == length
        return PasskeyPrompt(ids, key, depth, len(self.head) + cut)


def run_grid(engine: Engine, prompts: PasskeyPrompts, lengths: list[int], depths: list[float], trials: int,
             seed: int, max_tokens: int, verbose: bool = True) -> list[dict]:
    """Every (length, depth, trial) through the engine, greedy; one row per trial."""
    rng = random.Random(seed)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    rows = []
    for length in lengths:
        t0 = time.perf_counter()
        cells = [(d, prompts.build(length, d, str(rng.randint(10000, 99999)), rng))
                 for d in depths for _ in range(trials)]
        reqs = [engine.add_request(p.ids, params) for _, p in cells]
        while engine.step():
            pass
        for (d, p), req in zip(cells, reqs):
            answer = req.output().text
            rows.append({"length": length, "depth": d, "key": p.key, "needle_at": p.needle_at, "answer": answer,
                         "correct": is_correct(answer, p.key)})
        ok = sum(r["correct"] for r in rows[-len(cells):])
        if verbose:
            print(f"length {length:,}: {ok}/{len(cells)} correct ({time.perf_counter() - t0:.1f} s)", file=sys.stderr,
                  flush=True)
    return rows


def accuracy_grid(rows: list[dict], lengths: list[int], depths: list[float]) -> list[list[float]]:
    """accuracy[depth index][length index] in [0, 1]."""
    grid = []
    for d in depths:
        line = []
        for n in lengths:
            cell = [r["correct"] for r in rows if r["length"] == n and r["depth"] == d]
            line.append(sum(cell) / len(cell))
        grid.append(line)
    return grid


def format_table(grid: list[list[float]], rows: list[dict], lengths: list[int], depths: list[float],
                 trials: int) -> str:
    header = ["depth \\ length", *(f"{n:,}" for n in lengths)]
    body = [[f"{d:.0%}", *(f"{round(a * trials)}/{trials}" for a in line)] for d, line in zip(depths, grid)]
    per_length = [[r["correct"] for r in rows if r["length"] == n] for n in lengths]
    body.append(["all", *(f"{sum(c)}/{len(c)} ({sum(c) / len(c):.0%})" for c in per_length)])
    return "\n".join(format_columns(header, body))


def run_passkey(args: argparse.Namespace) -> int:
    if args.plot:
        require_matplotlib("--plot")
    fmt = args.format if args.format != "auto" else ("chat" if has_chat_template(args.model) else "plain")
    torch.set_num_threads(args.threads)
    text, source = load_text(args.text)
    model = load_model(args.model, dtype=args.dtype, hf_overrides=args.hf_overrides)
    tok = Tokenizer.from_dir(args.model)
    prompts = PasskeyPrompts(tok, text, chat=fmt == "chat")
    lengths = sorted(set(args.lengths))
    too_short = [n for n in lengths if n <= prompts.fixed_tokens()]
    if too_short:
        raise ValueError(f"--lengths: {too_short[0]} tokens leave no room for a haystack (instruction, needle and "
                         f"question take {prompts.fixed_tokens()} tokens in the {fmt} format)")
    limit = model.config.max_context_len
    if lengths[-1] + args.max_tokens > limit:
        raise ValueError(f"--lengths: {lengths[-1]:,} prompt tokens + {args.max_tokens} answer tokens exceed the "
                         f"model's context of {limit:,} tokens; use shorter lengths, or extend the context with "
                         f"--hf-overrides (e.g. YaRN rope scaling)")
    engine = Engine(model, tokenizer=tok, max_model_len=lengths[-1] + args.max_tokens, max_num_seqs=args.max_num_seqs)
    start = time.perf_counter()
    rows = run_grid(engine, prompts, lengths, args.depths, args.trials, args.seed, args.max_tokens)
    seconds = time.perf_counter() - start
    grid = accuracy_grid(rows, lengths, args.depths)
    rope_text = model.config.rope_description()
    print(f"passkey retrieval: {args.model} on {source}, {fmt} format, {rope_text}, greedy, {args.trials} trial(s) per "
          f"cell, {seconds:.0f} s")
    print(format_table(grid, rows, lengths, args.depths, args.trials))
    for n in lengths:
        sample = next(r for r in rows if r["length"] == n)
        print(f"  e.g. length {n:,}, depth {sample['depth']:.0%}, key {sample['key']}: {sample['answer']!r}")
    report = {"model": str(args.model), "text": source, "format": fmt, "hf_overrides": args.hf_overrides,
              "rope": rope_text, "lengths": lengths, "depths": args.depths, "trials": args.trials, "seed": args.seed,
              "max_tokens": args.max_tokens, "seconds": round(seconds, 1),
              "accuracy": {str(n): {str(d): grid[i][j] for i, d in enumerate(args.depths)}
                           for j, n in enumerate(lengths)},
              "results": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    if args.plot:
        title = f"passkey: {Path(args.model).name}, {fmt} format, {rope_text}, {args.trials} trial(s)/cell"
        plot_passkey_heatmap(grid, lengths, args.depths, Path(args.plot), title)
        print(f"wrote {args.plot}")
    return 0
