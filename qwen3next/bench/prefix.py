"""`qwen3next bench --workload NAME`: prefix caching on vs off, through the engine, on three workloads.

- multi-turn: one conversation of `--turns` turns after a starting history of about `--history-tokens` tokens (a
  system prompt and earlier user/assistant turns; cut to fit the model's context). Each turn adds a user message of
  about `--message-tokens` tokens; its prompt is the chat template of the whole conversation so far, the model's own
  earlier replies included (greedy, up to `--decode-tokens` tokens, stopping at EOS). Per turn: TTFT, prompt tokens,
  prompt tokens computed (prompt - num_cached_tokens). Headline: the last turn's TTFT, off / on.
- shared-system-prompt: `--requests` requests sharing a system prompt with a tools block (about `--system-tokens`
  tokens together: TOOLS through the template's `tools=`, the system text filled up to the size), each with its own
  short user message. SEQUENTIAL: each request is submitted when the one before has finished (`--decode-tokens`
  tokens, EOS ignored), so a TTFT is that of a lone request on an idle engine. Headline: median TTFT, off / on.
- cache-miss: `--requests` prompts of about `--prompt-tokens` tokens that share nothing but the template's first
  tokens (`<|im_start|>user\\n`), all submitted at once (CONCURRENT; `--decode-tokens` tokens each, EOS ignored).
  Throughput = (prompt + generated tokens) / wall seconds; TTFT from submission (queueing behind the other prompts'
  prefill included). Headline: throughput on / on, which should be ~1: caching must not slow down a miss workload.

Settings and rounds: "off" is an engine with enable_prefix_caching=False, "on" one with True (and
--prefix-snapshot-slots / --prefix-snapshot-interval when given); all else is the engine's defaults. `--rounds`
interleaved rounds (off then on, on then off in alternate rounds), each with a FRESH engine per setting, so that
every round starts from an empty cache with the same prompts; the report gives medians over rounds. One untimed
warmup (a short prompt, twice, through an "on" and an "off" engine) comes first. TTFT: from `Engine.add_request` to
the end of the step that produced the request's first token (the engine is stepped in this process: no server, no
thread hand-off). Hit rate: prompt tokens found cached / prompt tokens looked up (the block manager's counters) over
the "on" runs. "identical": the generated token ids of on and off agree request for request (greedy; chunking that
differs can change float rounding, so a difference is reported, not fatal).

Prompts: a model with a tokenizer gets its chat template and real text (consecutive words of the Pride and Prejudice
passages of austen_passages.txt from seeded random offsets). A model without one (random --preset weights) gets the
same ChatML structure in token ids: the engine is given a word-level tokenizer whose last three ids are
<|im_start|>, <|im_end|> and <|endoftext|> (so the engine's turn-boundary snapshots see the turns), the roles and the
newline are fixed ids, content is random ids, and a reply is fed back as the ids generated (no re-tokenization; EOS
ignored, every reply is --decode-tokens long). A preset measures the engine's costs on a model of its size, not a
model's behaviour.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..argtypes import positive_int, prefix_snapshot_interval, prefix_snapshot_slots
from ..engine.llm import Engine
from ..engine.sampling import SamplingParams
from ..model.qwen3_next import Qwen3NextForCausalLM
from ..tokenizer import Tokenizer
from .speculative import austen_passages

WORKLOADS = ("multi-turn", "shared-system-prompt", "cache-miss")
SETTINGS = ("off", "on")
TARGETS = {"multi-turn": 5.0, "shared-system-prompt": 4.0}  # TTFT off / on the issue asks for
ENGINE_MAX_MODEL_LEN = 8192  # the engine's default max_model_len is min(model context, this)
TURN_OVERHEAD = 16  # template tokens a turn adds besides its message and reply (ChatML: ~10), with a margin

SYSTEM_TEXT = ("You are a literary assistant for a reading group that is working through Pride and Prejudice. "
               "Members quote passages; answer briefly, refer to the text, and use the tools when a request needs "
               "them.")
QUESTIONS = (
    "What is the weather like in Paris today?", "Find me a good edition of Pride and Prejudice.",
    "Send a note to Anna that we meet on Thursday.", "How much is 120 euros in pounds?",
    "Put the book club on my calendar for Friday at six.", "Who wrote Sense and Sensibility?",
    "Look up the price of Penguin's stock.", "Which chapter introduces Mr. Darcy?",
    "Is it going to rain in London tomorrow?", "Search for essays about Elizabeth Bennet.",
    "Email the reading list to the group.", "Convert 50 dollars to euros, please.",
    "What time is our next meeting?", "Summarise chapter three in two sentences.",
    "Find a film adaptation we could watch together.", "What is the capital of Derbyshire?",
)
PASSAGE_QUESTIONS = ("What do you make of this passage?", "How does this change your view of the characters?",
                     "What is the narrator hinting at here?", "Summarise this in one sentence.")


def _tool(name: str, description: str, properties: dict[str, tuple[str, str]], required: list[str]) -> dict:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "required": required,
                       "properties": {k: {"type": t, "description": d} for k, (t, d) in properties.items()}}}}


TOOLS = (
    _tool("get_weather", "Get the current weather and a short forecast for a city.",
          {"city": ("string", "The city name, e.g. Paris"), "unit": ("string", "celsius or fahrenheit"),
           "days": ("integer", "Days of forecast to include, 0 to 7")}, ["city"]),
    _tool("search_web", "Search the web and return the titles, links and snippets of the best results.",
          {"query": ("string", "What to search for"), "max_results": ("integer", "How many results, 1 to 20"),
           "site": ("string", "Only results from this domain, e.g. gutenberg.org")}, ["query"]),
    _tool("send_email", "Send an email from the user's account.",
          {"to": ("string", "Recipient addresses, comma-separated"), "subject": ("string", "The subject line"),
           "body": ("string", "The message text"), "cc": ("string", "Addresses to copy, comma-separated")},
          ["to", "subject", "body"]),
    _tool("create_calendar_event", "Create an event in the user's calendar.",
          {"title": ("string", "What the event is"), "start": ("string", "Start time, ISO 8601"),
           "end": ("string", "End time, ISO 8601"), "location": ("string", "Where it takes place"),
           "attendees": ("array", "Email addresses of the people to invite")}, ["title", "start"]),
    _tool("convert_currency", "Convert an amount of money between currencies at today's rate.",
          {"amount": ("number", "The amount to convert"), "from": ("string", "ISO 4217 code, e.g. EUR"),
           "to": ("string", "ISO 4217 code, e.g. GBP")}, ["amount", "from", "to"]),
    _tool("get_stock_quote", "Get the latest price, change and volume of a listed company's stock.",
          {"symbol": ("string", "The ticker symbol, e.g. PSO"), "exchange": ("string", "The exchange, e.g. LSE")},
          ["symbol"]),
    _tool("lookup_book", "Find a book in the library catalogue by title, author or ISBN.",
          {"title": ("string", "Part of the title"), "author": ("string", "Part of the author's name"),
           "isbn": ("string", "The ISBN-10 or ISBN-13"), "available_only": ("boolean", "Only copies on the shelf")},
          []),
)


# ---- options ---------------------------------------------------------------------------------------------------------
@dataclass
class PrefixOptions:
    workloads: list[str] = field(default_factory=lambda: list(WORKLOADS))
    rounds: int = 3
    max_tokens: int = 32  # --decode-tokens: reply / generation length per request
    turns: int = 10
    history_tokens: int = 2048
    message_tokens: int = 170
    requests: int = 16
    system_tokens: int = 1500
    prompt_tokens: int = 1024
    seed: int = 0
    snapshot_slots: int | None = None  # the "on" engines' prefix_snapshot_slots (None: the engine's default)
    snapshot_interval: int | None = None  # the "on" engines' prefix_snapshot_interval
    warmup_tokens: int = 600  # the untimed warmup prompt (past one 512-token prefill chunk)

    def validate(self) -> None:
        bad = [w for w in self.workloads if w not in WORKLOADS]
        if bad or not self.workloads:
            raise ValueError(f"workload: expected some of {list(WORKLOADS)}, got {self.workloads}")
        for name in ("rounds", "max_tokens", "turns", "history_tokens", "message_tokens", "requests", "system_tokens",
                     "prompt_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)}")


def parse_workloads(s: str) -> list[str]:
    """An argparse type: comma-separated workload names ("all": every one)."""
    names = [w.strip() for w in s.split(",") if w.strip()]
    names = [n for w in names for n in (WORKLOADS if w == "all" else (w,))]
    bad = [w for w in names if w not in WORKLOADS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(WORKLOADS)} (or all), got {s!r}")
    return names


_SIZE_FLAGS = {  # flag -> (PrefixOptions field, help)
    "--rounds": ("rounds", "interleaved on/off rounds, a fresh engine per setting each (default 3)"),
    "--turns": ("turns", "multi-turn: turns measured (default 10)"),
    "--history-tokens": ("history_tokens", "multi-turn: tokens of the starting history, system prompt and earlier "
                                           "turns (default 2048, cut to fit the model's context)"),
    "--message-tokens": ("message_tokens", "multi-turn: tokens of each new user message (default 170)"),
    "--requests": ("requests", "shared-system-prompt and cache-miss: requests per run (default 16)"),
    "--system-tokens": ("system_tokens", "shared-system-prompt: tokens of the shared system prompt with its tools "
                                         "block (default 1500)"),
    "--prompt-tokens": ("prompt_tokens", "cache-miss: tokens of each distinct prompt (default 1024)"),
}


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", type=parse_workloads, action="append", default=None, metavar="NAME[,NAME]",
                        help="instead of the usual measurements: prefix caching on vs off through the engine on "
                             f"these workloads ({', '.join(WORKLOADS)}, or all; repeat the flag or separate names "
                             "with commas; bench/prefix.py); --decode-tokens is the reply length, --threads, --seed, "
                             "--dtype, --json apply")
    for flag, (_, text) in _SIZE_FLAGS.items():
        parser.add_argument(flag, type=positive_int, default=None, metavar="N", help=f"--workload {text}")
    parser.add_argument("--prefix-snapshot-slots", type=prefix_snapshot_slots, default=None, metavar="N",
                        help="--workload: the 'on' engines' snapshot slots (default: the engine's)")
    parser.add_argument("--prefix-snapshot-interval", type=prefix_snapshot_interval, default=None, metavar="N",
                        help="--workload: the 'on' engines' snapshot interval in tokens (default: the engine's)")


def check_unused(args: argparse.Namespace) -> None:
    """A ValueError when options of --workload come without it."""
    given = [f for f in (*_SIZE_FLAGS, "--prefix-snapshot-slots", "--prefix-snapshot-interval")
             if getattr(args, f.lstrip("-").replace("-", "_")) is not None]
    if given:
        raise ValueError(f"workload: {', '.join(given)} go with --workload")


def options_from_args(args: argparse.Namespace) -> PrefixOptions:
    names = [n for group in args.workload for n in group]
    opts = PrefixOptions(workloads=list(dict.fromkeys(names)), max_tokens=args.decode_tokens, seed=args.seed,
                         snapshot_slots=args.prefix_snapshot_slots, snapshot_interval=args.prefix_snapshot_interval)
    for flag, (name, _) in _SIZE_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            setattr(opts, name, value)
    opts.validate()
    return opts


# ---- prompts ---------------------------------------------------------------------------------------------------------
class TextChat:
    """Text messages rendered by the model's chat template; content is prose from austen_passages.txt."""

    description = "the model's chat template over text (Pride and Prejudice passages, tool schemas, questions)"
    ignore_eos = False  # a reply ends where the model ends it (or at max_tokens)

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.words = " ".join(austen_passages()).split()

    def render(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True
               ) -> list[int]:
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages, tools=tools,
                                                                        add_generation_prompt=add_generation_prompt))

    def system(self, rng: random.Random, n_tokens: int) -> str:
        return SYSTEM_TEXT

    def message(self, rng: random.Random, n_tokens: int, question: str = "") -> str:
        """About `n_tokens` tokens (at most that many, at least one word): consecutive words from a random offset,
        then `question` after a blank line."""
        start, suffix = rng.randrange(len(self.words)), f"\n\n{question}" if question else ""

        def text(k: int) -> str:
            return " ".join(self.words[(start + i) % len(self.words)] for i in range(k)) + suffix

        lo, hi = 1, max(n_tokens, 1)  # every word is at least one token
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if len(self.tokenizer.encode(text(mid))) <= n_tokens else (lo, mid - 1)
        return text(lo)

    def question(self, i: int) -> str:
        return QUESTIONS[i % len(QUESTIONS)] + (f" (question {i // len(QUESTIONS) + 1})" if i >= len(QUESTIONS)
                                                else "")

    def reply(self, request: _Request) -> str:
        return request.text

    def shared_system(self, rng: random.Random, n_tokens: int) -> tuple[str, list[dict] | None]:
        """A system message and tools of about `n_tokens` together: SYSTEM_TEXT, the first TOOLS that fit in two
        thirds of it, then a reference passage up to the size."""
        def size(content: str, tools: list[dict] | None) -> int:
            return len(self.render([{"role": "system", "content": content}], tools, False))

        k, lead = 0, f"{SYSTEM_TEXT}\n\nReference text: "
        while k < len(TOOLS) and size(SYSTEM_TEXT, list(TOOLS[:k + 1])) <= n_tokens * 2 // 3:
            k += 1
        tools = list(TOOLS[:k]) or None
        fill = n_tokens - size(lead, tools)
        return (lead + self.message(rng, fill) if fill > 0 else SYSTEM_TEXT), tools


class TokenChat:
    """ChatML in token ids for a model without a tokenizer: see the module docstring."""

    description = ("ChatML in token ids (random content; the word-level tokenizer's last 3 ids play <|im_start|>, "
                   "<|im_end|>, <|endoftext|>)")
    ignore_eos = True
    ROLES = {"system": 1, "user": 2, "assistant": 3}
    NEWLINE, FIRST_CONTENT = 4, 5

    def __init__(self, vocab_size: int):
        from .harness import synthetic_tokenizer  # harness imports this module

        if vocab_size < 16:
            raise ValueError(f"vocab_size: token-id chats need at least 16 ids, got {vocab_size}")
        self.im_start, self.im_end, end = vocab_size - 3, vocab_size - 2, vocab_size - 1
        self.tokenizer = synthetic_tokenizer(vocab_size, {self.im_start: "<|im_start|>", self.im_end: "<|im_end|>",
                                                          end: "<|endoftext|>"})

    def render(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True
               ) -> list[int]:
        ids: list[int] = []
        for m in messages:
            ids += [self.im_start, self.ROLES[m["role"]], self.NEWLINE, *m["content"], self.im_end, self.NEWLINE]
        if add_generation_prompt:
            ids += [self.im_start, self.ROLES["assistant"], self.NEWLINE]
        return ids

    def message(self, rng: random.Random, n_tokens: int, question: str = "") -> list[int]:
        return [rng.randrange(self.FIRST_CONTENT, self.im_start) for _ in range(n_tokens)]

    def system(self, rng: random.Random, n_tokens: int) -> list[int]:
        return self.message(rng, n_tokens)

    def question(self, i: int) -> list[int]:
        return self.message(random.Random(1000 + i), 12 + i % 8)

    def reply(self, request: _Request) -> list[int]:
        return list(request.token_ids)

    def shared_system(self, rng: random.Random, n_tokens: int) -> tuple[list[int], None]:
        return self.message(rng, max(n_tokens - 5, 1)), None  # 5: <|im_start|> system \n ... <|im_end|> \n


Chat = TextChat | TokenChat


@dataclass
class _Plan:
    """What one workload feeds each engine (the same in every round and setting)."""

    description: str
    info: dict[str, object]
    history: list[dict] = field(default_factory=list)  # multi-turn: the starting conversation
    messages: list = field(default_factory=list)  # multi-turn: the user messages of the turns
    prompts: list[list[int]] = field(default_factory=list)  # the other workloads: the prompts


def plan_multi_turn(chat: Chat, opts: PrefixOptions, limit: int, rng: random.Random) -> _Plan:
    per_turn = opts.message_tokens + opts.max_tokens + TURN_OVERHEAD
    history_tokens, note = opts.history_tokens, None
    if history_tokens + opts.turns * per_turn > limit:
        history_tokens = limit - opts.turns * per_turn
        if history_tokens < 64:
            raise ValueError(f"multi-turn: {opts.turns} turns of ~{per_turn} tokens exceed the model's context "
                             f"({limit} tokens); lower --turns, --message-tokens or --decode-tokens")
        note = f"history cut from {opts.history_tokens} to ~{history_tokens} tokens to fit the {limit}-token context"
    history = [{"role": "system", "content": chat.system(rng, 40)}]
    while True:
        q = PASSAGE_QUESTIONS[len(history) // 2 % len(PASSAGE_QUESTIONS)]
        pair = [{"role": "user", "content": chat.message(rng, opts.message_tokens, q)},
                {"role": "assistant", "content": chat.message(rng, opts.max_tokens)}]
        if len(chat.render(history + pair, add_generation_prompt=False)) > history_tokens:
            break
        history += pair
    messages = [chat.message(rng, opts.message_tokens, PASSAGE_QUESTIONS[i % len(PASSAGE_QUESTIONS)])
                for i in range(opts.turns)]
    n = len(chat.render(history, add_generation_prompt=False))
    info = {"history_tokens": n, "history_turns": (len(history) - 1) // 2,
            "message_tokens": opts.message_tokens, "max_tokens": opts.max_tokens, "note": note}
    text = (f"{opts.turns} turns after a {n}-token history (system prompt + {info['history_turns']} earlier "
            f"turns); user messages ~{opts.message_tokens} tokens, replies up to {opts.max_tokens} tokens (greedy"
            f"{', EOS ignored' if chat.ignore_eos else ''}) fed back into the next turn's prompt; one request at a "
            "time")
    return _Plan(text + (f"; {note}" if note else ""), info, history=history, messages=messages)


def plan_shared(chat: Chat, opts: PrefixOptions, limit: int, rng: random.Random) -> _Plan:
    system, tools = chat.shared_system(rng, opts.system_tokens)
    sys_msg = {"role": "system", "content": system}
    prompts = [chat.render([sys_msg, {"role": "user", "content": chat.question(i)}], tools)
               for i in range(opts.requests)]
    shared = len(chat.render([sys_msg], tools, False))
    if max(map(len, prompts)) + opts.max_tokens > limit:
        raise ValueError(f"shared-system-prompt: prompts of up to {max(map(len, prompts))} tokens plus "
                         f"{opts.max_tokens} exceed the model's context ({limit}); lower --system-tokens")
    lens = [len(p) for p in prompts]
    info = {"shared_tokens": shared, "tools": len(tools or []), "prompt_lens": lens, "max_tokens": opts.max_tokens}
    tools_text = f" with {len(tools)} tool schemas (tools=)" if tools else ""
    text = (f"{opts.requests} requests sharing a {shared}-token system prompt{tools_text}, each with its own user "
            f"message ({min(lens)}-{max(lens)} prompt tokens); submitted one after another, each running to its end "
            f"({opts.max_tokens} tokens, EOS ignored) before the next is submitted")
    return _Plan(text, info, prompts=prompts)


def plan_miss(chat: Chat, opts: PrefixOptions, limit: int, rng: random.Random) -> _Plan:
    overhead = len(chat.render([{"role": "user", "content": chat.message(rng, 1)}])) - 1
    prompts = [chat.render([{"role": "user", "content": chat.message(rng, opts.prompt_tokens - overhead)}])
               for _ in range(opts.requests)]
    lens = [len(p) for p in prompts]
    if max(lens) + opts.max_tokens > limit:
        raise ValueError(f"cache-miss: prompts of {max(lens)} tokens plus {opts.max_tokens} exceed the model's "
                         f"context ({limit}); lower --prompt-tokens")
    common = min(next((i for i, (a, b) in enumerate(zip(p, q)) if a != b), len(p))
                 for p, q in zip(prompts, prompts[1:])) if len(prompts) > 1 else 0
    info = {"prompt_lens": lens, "common_prefix_tokens": common, "max_tokens": opts.max_tokens}
    text = (f"{opts.requests} distinct prompts of {min(lens)}-{max(lens)} tokens (at most {common} leading tokens in "
            f"common), submitted at once, {opts.max_tokens} tokens each (EOS ignored)")
    return _Plan(text, info, prompts=prompts)


PLANNERS = {"multi-turn": plan_multi_turn, "shared-system-prompt": plan_shared, "cache-miss": plan_miss}


# ---- runs ------------------------------------------------------------------------------------------------------------
@dataclass
class _Request:
    prompt_tokens: int
    cached_tokens: int
    ttft: float  # seconds from add_request to the step that produced the first token
    token_ids: list[int]
    text: str

    @property
    def computed_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


@dataclass
class _Run:
    requests: list[_Request]
    seconds: float  # wall time of the whole run
    counters: dict[str, int]  # the engine's prefix-cache counters after the run

    @property
    def computed_tokens(self) -> int:
        return sum(r.computed_tokens for r in self.requests)

    @property
    def tokens_per_s(self) -> float:
        return sum(r.prompt_tokens + len(r.token_ids) for r in self.requests) / self.seconds


def _first_token(req) -> bool:
    return bool(req.samples[0].out.token_ids)


def _finish(req, ids: list[int], ttft: float) -> _Request:
    out = req.output()
    return _Request(len(ids), out.num_cached_tokens, ttft, list(out.outputs[0].token_ids), out.outputs[0].text)


def run_one(engine: Engine, ids: list[int], params: SamplingParams) -> _Request:
    """One request on an idle engine, run to its end; TTFT timed."""
    t0 = time.perf_counter()
    req = engine.add_request(ids, params)
    while not _first_token(req):
        if not engine.step():
            raise RuntimeError("the engine stopped before the request's first token")
    ttft = time.perf_counter() - t0
    while engine.step():
        pass
    return _finish(req, ids, ttft)


def run_concurrent(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> tuple[list[_Request], float]:
    """All `prompts` submitted at once and run to their end; TTFT of each from the submission."""
    t0 = time.perf_counter()
    reqs = [engine.add_request(p, params) for p in prompts]
    ttft: list[float | None] = [None] * len(reqs)
    while engine.step():
        now = time.perf_counter() - t0
        for i, r in enumerate(reqs):
            if ttft[i] is None and _first_token(r):
                ttft[i] = now
    seconds = time.perf_counter() - t0
    if any(t is None for t in ttft):
        raise RuntimeError("the engine stopped before every request had its first token")
    return [_finish(r, p, t) for r, p, t in zip(reqs, prompts, ttft)], seconds


def _counters(engine: Engine) -> dict[str, int]:
    bm = engine.block_manager
    return {"queries": bm.queries, "hits": bm.hits, "snapshots": bm.num_snapshots,
            "cached_blocks": bm.num_cached_blocks, "evicted_snapshots": bm.evicted_snapshots,
            "evicted_blocks": bm.evicted_blocks, "steps": engine.stats["steps"]}


def run_workload(name: str, engine: Engine, chat: Chat, plan: _Plan, max_tokens: int) -> _Run:
    t0 = time.perf_counter()
    if name == "multi-turn":
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=chat.ignore_eos)
        messages, requests = list(plan.history), []
        for user in plan.messages:
            messages.append({"role": "user", "content": user})
            requests.append(run_one(engine, chat.render(messages), params))
            messages.append({"role": "assistant", "content": chat.reply(requests[-1])})
    elif name == "shared-system-prompt":
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        requests = [run_one(engine, p, params) for p in plan.prompts]
    else:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        requests, _ = run_concurrent(engine, plan.prompts, params)
    return _Run(requests, time.perf_counter() - t0, _counters(engine))


# ---- the measurement -------------------------------------------------------------------------------------------------
def _ms(seconds: list[float]) -> float:
    return 1e3 * statistics.median(seconds)


def _hit_rate(runs: list[_Run]) -> dict[str, object]:
    queries, hits = sum(r.counters["queries"] for r in runs), sum(r.counters["hits"] for r in runs)
    return {"queries": queries, "hits": hits, "hit_rate": hits / queries if queries else None}


def _identical(runs: dict[str, list[_Run]]) -> dict[str, object]:
    diff = [{"round": i, "request": j} for i, (a, b) in enumerate(zip(runs["off"], runs["on"]))
            for j, (x, y) in enumerate(zip(a.requests, b.requests)) if x.token_ids != y.token_ids]
    return {"identical": not diff, "differences": diff}


def _median_ttft_ms(run: _Run) -> float:
    return _ms([q.ttft for q in run.requests])


def _headline(metric: str, off_ms: list[float], on_ms: list[float], target: float) -> dict[str, object]:
    """TTFT off / on: the ratio of the medians over rounds, and each round's."""
    speedup = statistics.median(off_ms) / statistics.median(on_ms)
    return {"metric": metric, "off_ms": statistics.median(off_ms), "on_ms": statistics.median(on_ms),
            "speedup": speedup, "speedup_rounds": [a / b for a, b in zip(off_ms, on_ms)], "target": target,
            "meets_target": speedup >= target}


def _multi_turn(off: list[_Run], on: list[_Run]) -> dict[str, object]:
    turns = []
    for k in range(len(on[0].requests)):
        t_off, t_on = [r.requests[k] for r in off], [r.requests[k] for r in on]
        off_ms, on_ms = [1e3 * q.ttft for q in t_off], [1e3 * q.ttft for q in t_on]
        turns.append({"turn": k + 1, "prompt_tokens": statistics.median(q.prompt_tokens for q in t_off + t_on),
                      "computed_off": statistics.median(q.computed_tokens for q in t_off),
                      "computed_on": statistics.median(q.computed_tokens for q in t_on),
                      "reply_tokens": statistics.median(len(q.token_ids) for q in t_on),
                      "ttft_off_ms": statistics.median(off_ms), "ttft_on_ms": statistics.median(on_ms),
                      "ttft_off_rounds_ms": off_ms, "ttft_on_rounds_ms": on_ms,
                      "speedup": statistics.median(off_ms) / statistics.median(on_ms)})
    last = turns[-1]
    return {"turns": turns, "headline": _headline(f"turn-{last['turn']} TTFT", last["ttft_off_rounds_ms"],
                                                  last["ttft_on_rounds_ms"], TARGETS["multi-turn"])}


def _shared(off: list[_Run], on: list[_Run]) -> dict[str, object]:
    off_ms, on_ms = [_median_ttft_ms(r) for r in off], [_median_ttft_ms(r) for r in on]
    return {"ttft_median_off_rounds_ms": off_ms, "ttft_median_on_rounds_ms": on_ms,
            "ttft_first_on_ms": _ms([r.requests[0].ttft for r in on]),  # the cold request of each "on" run
            "headline": _headline("median TTFT", off_ms, on_ms, TARGETS["shared-system-prompt"])}


def _miss(off: list[_Run], on: list[_Run]) -> dict[str, object]:
    tps_off, tps_on = [r.tokens_per_s for r in off], [r.tokens_per_s for r in on]
    ttft_off, ttft_on = [_median_ttft_ms(r) for r in off], [_median_ttft_ms(r) for r in on]
    return {"tokens_per_s_off": statistics.median(tps_off), "tokens_per_s_on": statistics.median(tps_on),
            "tokens_per_s_off_rounds": tps_off, "tokens_per_s_on_rounds": tps_on,
            "ttft_median_off_ms": statistics.median(ttft_off), "ttft_median_on_ms": statistics.median(ttft_on),
            "headline": {"metric": "throughput on / off",
                         "ratio": statistics.median(tps_on) / statistics.median(tps_off),
                         "ratio_rounds": [b / a for a, b in zip(tps_off, tps_on)],
                         "ttft_ratio": statistics.median(ttft_on) / statistics.median(ttft_off)}}


SUMMARIES = {"multi-turn": _multi_turn, "shared-system-prompt": _shared, "cache-miss": _miss}


def summarize(name: str, runs: dict[str, list[_Run]]) -> dict[str, object]:
    """The report section of a workload from its runs per setting (one per round)."""
    off, on = runs["off"], runs["on"]
    return {"computed_tokens_off": statistics.median(r.computed_tokens for r in off),
            "computed_tokens_on": statistics.median(r.computed_tokens for r in on),
            "prompt_tokens": statistics.median(sum(q.prompt_tokens for q in r.requests) for r in on),
            "seconds_off": [r.seconds for r in off], "seconds_on": [r.seconds for r in on],
            **_hit_rate(on), "off_queries": sum(r.counters["queries"] for r in off),
            "counters_on": [r.counters for r in on], **_identical(runs), **SUMMARIES[name](off, on)}


def _make_engine(model: Qwen3NextForCausalLM, tokenizer: Tokenizer, caching: bool, opts: PrefixOptions) -> Engine:
    engine = Engine(model, tokenizer=tokenizer, enable_prefix_caching=caching,
                    prefix_snapshot_slots=opts.snapshot_slots if caching else None,
                    prefix_snapshot_interval=opts.snapshot_interval if caching else None)
    if engine.enable_prefix_caching != caching or engine.block_manager.enable_prefix_caching != caching:
        raise RuntimeError(f"engine: asked for enable_prefix_caching={caching}, got {engine.enable_prefix_caching} "
                           f"({engine.plan.num_snapshot_slots} snapshot slots)")
    return engine


def _engine_info(engine: Engine) -> dict[str, object]:
    cfg, plan = engine.scheduler.config, engine.plan
    return {"block_size": plan.geometry.block_size, "max_model_len": cfg.max_model_len,
            "max_num_seqs": cfg.max_num_seqs, "max_num_batched_tokens": cfg.max_num_batched_tokens,
            "prefill_chunk_size": cfg.prefill_chunk_size, "snapshot_slots": plan.num_snapshot_slots,
            "snapshot_bytes": plan.geometry.state_bytes_per_slot, "snapshot_interval": cfg.snapshot_policy.interval,
            "boundary_token_ids": list(cfg.snapshot_policy.boundary_token_ids)}


def _round_line(name: str, run: _Run) -> str:
    if name == "multi-turn":
        last = run.requests[-1]
        return (f"turn-{len(run.requests)} TTFT {1e3 * last.ttft:8.1f} ms ({last.computed_tokens} of "
                f"{last.prompt_tokens} prompt tokens computed); {run.computed_tokens} computed in all")
    ttft = _ms([q.ttft for q in run.requests])
    extra = f"{run.tokens_per_s:8.1f} tok/s, " if name == "cache-miss" else ""
    return (f"{extra}median TTFT {ttft:8.1f} ms; {run.computed_tokens} of "
            f"{sum(q.prompt_tokens for q in run.requests)} prompt tokens computed")


def bench_prefix(opts: PrefixOptions, model: Qwen3NextForCausalLM, tokenizer: Tokenizer | None,
                 log: Callable[[str], None] = lambda msg: None) -> dict[str, object]:
    """Every workload of `opts`, caching off vs on in interleaved rounds; the report's "prefix" section. `tokenizer`
    None: the model has none (prompts in token ids, see the module docstring)."""
    opts.validate()
    chat: Chat = TextChat(tokenizer) if tokenizer is not None else TokenChat(model.config.vocab_size)
    tokenizer = chat.tokenizer
    limit = min(model.config.max_context_len, ENGINE_MAX_MODEL_LEN)
    rng = random.Random(opts.seed)
    plans = {name: PLANNERS[name](chat, opts, limit, rng) for name in opts.workloads}  # errors before any run

    warm = chat.render([{"role": "user", "content": chat.message(rng, min(opts.warmup_tokens, limit // 2))}])
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    for caching in (True, False):  # kernels built / loaded, first-touch costs paid, the hit path taken once
        engine = _make_engine(model, tokenizer, caching, opts)
        for _ in range(2):
            run_one(engine, warm, params)
        if caching:
            info = _engine_info(engine)
        del engine
    gc.collect()

    sections = {}
    for name in opts.workloads:
        plan, runs = plans[name], {s: [] for s in SETTINGS}
        log(f"prefix  {name}: {plan.description}")
        for r in range(opts.rounds):
            for setting in SETTINGS if r % 2 == 0 else SETTINGS[::-1]:
                engine = _make_engine(model, tokenizer, setting == "on", opts)
                run = run_workload(name, engine, chat, plan, opts.max_tokens)
                runs[setting].append(run)
                log(f"prefix  {name:<20} round {r + 1}/{opts.rounds} {setting:<3}: {_round_line(name, run)}")
                del engine
                gc.collect()
        sections[name] = {"description": plan.description, **plan.info, **summarize(name, runs)}
    return {"prompts": chat.description, "rounds": opts.rounds, "engine": info, "workloads": sections}


# ---- printing --------------------------------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return f"{100 * x:.1f}%" if x is not None else "-"


def _tail(s: dict[str, object]) -> str:
    ident = "yes" if s["identical"] else f"NO ({len(s['differences'])} request-rounds differ)"
    return (f"hit rate (on) {_pct(s['hit_rate'])} ({s['hits']} of {s['queries']} prompt tokens looked up); "
            f"generated ids identical on vs off: {ident}")


def _target(h: dict[str, object]) -> str:
    rounds = " / ".join(f"{x:.1f}x" for x in h["speedup_rounds"])
    met = "met" if h["meets_target"] else "MISSED"
    return (f"{h['metric']}: {h['off_ms']:.1f} ms off vs {h['on_ms']:.1f} ms on, off / on = {h['speedup']:.1f}x (per "
            f"round {rounds}); target >= {h['target']:.0f}x: {met}")


def format_section(name: str, s: dict[str, object], aligned: Callable[[list[list[str]], int], list[str]]
                   ) -> list[str]:
    lines = [f"{name}: {s['description']}"]
    if name == "multi-turn":
        table = [["turn", "prompt", "computed off", "computed on", "reply", "TTFT off ms", "TTFT on ms", "off / on"]]
        for t in s["turns"]:
            table.append([str(t["turn"]), f"{t['prompt_tokens']:.0f}", f"{t['computed_off']:.0f}",
                          f"{t['computed_on']:.0f}", f"{t['reply_tokens']:.0f}", f"{t['ttft_off_ms']:.1f}",
                          f"{t['ttft_on_ms']:.1f}", f"{t['speedup']:.1f}x"])
        lines += aligned(table, 1)
        lines.append(_target(s["headline"]))
    elif name == "shared-system-prompt":
        h = s["headline"]
        table = [["setting", "median TTFT ms", "prompt tokens computed", "of"],
                 ["off", f"{h['off_ms']:.1f}", f"{s['computed_tokens_off']:.0f}", f"{s['prompt_tokens']:.0f}"],
                 ["on", f"{h['on_ms']:.1f}", f"{s['computed_tokens_on']:.0f}", f"{s['prompt_tokens']:.0f}"]]
        lines += aligned(table, 1)
        lines.append(_target(h) + f"; the first (cold) request's TTFT on: {s['ttft_first_on_ms']:.1f} ms")
    else:
        h = s["headline"]
        table = [["setting", "tok/s", "median TTFT ms", "wall s", "prompt tokens computed"],
                 ["off", f"{s['tokens_per_s_off']:.1f}", f"{s['ttft_median_off_ms']:.1f}",
                  f"{statistics.median(s['seconds_off']):.2f}", f"{s['computed_tokens_off']:.0f}"],
                 ["on", f"{s['tokens_per_s_on']:.1f}", f"{s['ttft_median_on_ms']:.1f}",
                  f"{statistics.median(s['seconds_on']):.2f}", f"{s['computed_tokens_on']:.0f}"]]
        lines += aligned(table, 1)
        rounds = " / ".join(f"{x:.2f}" for x in h["ratio_rounds"])
        lines.append(f"throughput on / off {h['ratio']:.2f} (per round {rounds}; ~1 expected: caching must not slow a "
                     f"miss workload); median TTFT on / off {h['ttft_ratio']:.2f}")
    return [*lines, _tail(s)]


def format_report(report: dict[str, object], aligned: Callable[[list[list[str]], int], list[str]]) -> str:
    """The text report of `qwen3next bench --workload` (`aligned`: the harness's column aligner)."""
    m, mod, p = report["machine"], report["model"], report["prefix"]
    load = " ".join(f"{x:.1f}" for x in m["load_average"]) if m.get("load_average") else "n/a"
    if m.get("load_average_end"):
        load += " (end " + " ".join(f"{x:.1f}" for x in m["load_average_end"]) + ")"
    e = p["engine"]
    lines = [
        f"machine    {m['cpu']}, {m['usable_cpus']}/{m['logical_cpus']} usable CPUs; torch {m['torch']} "
        f"({m['cpu_capability']}); {m['threads']} threads; load average {load}",
        *([f"           {m['busy_warning']}"] if m.get("busy_warning") else []),
        f"model      {mod['source']}: {mod['dtype']}, {mod['params_total'] / 1e6:.1f}M params, "
        f"{mod['params_active'] / 1e6:.1f}M active per token, vocab {mod['vocab_size']}",
        f"prompts    {p['prompts']}",
        f"engine     off: enable_prefix_caching=False; on: True with {e['snapshot_slots']} snapshot slots of "
        f"{e['snapshot_bytes'] / 1e6:.2f} MB, interval {e['snapshot_interval']} tokens; both: block "
        f"{e['block_size']}, prefill chunk {e['prefill_chunk_size']}, max_model_len {e['max_model_len']}, "
        f"max_num_seqs {e['max_num_seqs']}",
        f"rounds     {p['rounds']} interleaved (off, on / on, off), a fresh engine per setting and round (empty "
        "cache); medians over rounds; TTFT = add_request to the end of the step with the first token",
        "",
    ]
    for name, s in p["workloads"].items():
        lines += [*format_section(name, s, aligned), ""]
    return "\n".join(lines).rstrip()

