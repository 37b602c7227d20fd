"""`qwen3next bench --speculative-config JSON`: plain vs MTP speculative decoding of the same model, through the
engine, in paired rounds.

Per mode (eager; also compiled with `--compile`) two engines are built once, a plain one and a speculative one, sized
for the largest batch. For every batch size B, one untimed warmup round, then `--repeat` rounds; each round runs the
same B prompts (greedy, EOS ignored, `--decode-tokens` tokens per request) through the plain engine, then through the
speculative one. The clock starts once every request of the batch has its first token (prefill not timed) and stops
when the last request finishes; tok/s = tokens generated in that window / its seconds. The speedup of a round is
spec tok/s / plain tok/s of that round; the report gives medians over rounds and the smallest round speedup.

Greedy speculative decoding is exact: its token ids must equal plain decoding's, request for request; every round
(warmup included) is checked, and a difference is reported loudly (it is a bug).

Prompts: with a model tokenizer, real text (`austen_passages.txt`: passages from the opening chapters of *Pride and
Prejudice*, alternating with held-out synthetic chats of `train.synthetic` rendered with the model's chat template up
to their last user turn); without one, random token ids of `--prompt-len` tokens. A round at batch size B decodes
every prompt once, B at a time (the first B, cycled, when there are fewer than B).
"""

from __future__ import annotations

import copy
import itertools
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ..engine.llm import Engine, weight_storage
from ..engine.runner import cache_geometry
from ..engine.sampling import SamplingParams
from ..engine.speculative import MAX_SPECULATIVE_TOKENS, SpeculativeConfig
from ..model.qwen3_next import Qwen3NextForCausalLM
from ..quant.quantize import store_bf16
from ..tokenizer import Tokenizer
from . import measure

PASSAGES_FILE = Path(__file__).with_name("austen_passages.txt")
CHAT_SEED, CHAT_SPLIT = 0, "heldout"  # the demo model's chat data: train split of seed 0; these it never saw
NUM_CHATS = 8
BLOCK_SIZE = 64


# ---- prompts ---------------------------------------------------------------------------------------------------------
def austen_passages() -> list[str]:
    """The fixed passages of Pride and Prejudice, one per paragraph of `austen_passages.txt`."""
    text = PASSAGES_FILE.read_text(encoding="utf-8")
    return [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]


def chat_prompts(tokenizer: Tokenizer, n: int = NUM_CHATS) -> list[list[int]]:
    """`n` held-out synthetic conversations, each rendered with its tools up to its last user turn (with the
    assistant generation prompt) and encoded."""
    from ..train.synthetic import generate_chat_examples

    out = []
    for example in generate_chat_examples(n, CHAT_SEED, CHAT_SPLIT):
        last_user = max(i for i, m in enumerate(example.messages) if m["role"] == "user")
        text = tokenizer.apply_chat_template(example.messages[:last_user + 1], tools=example.tools,
                                             add_generation_prompt=True)
        out.append(tokenizer.encode(text))
    return out


def text_prompts(tokenizer: Tokenizer) -> list[list[int]]:
    """Austen passages and chats, alternating (passage 0, chat 0, passage 1, chat 1, ...)."""
    passages = [tokenizer.encode(p) for p in austen_passages()]
    chats = chat_prompts(tokenizer)
    return [p for pair in zip(passages, chats) for p in pair]


@dataclass
class PromptSet:
    prompts: list[list[int]]  # the mixed list; batch B takes the first B, cycled
    source: str  # "text" or "random"
    description: str

    def batch(self, size: int) -> list[list[int]]:
        return list(itertools.islice(itertools.cycle(self.prompts), size))

    def groups(self, size: int) -> list[list[list[int]]]:
        """Every prompt once, in batches of `size` (one batch of the first `size`, cycled, when there are fewer)."""
        if size >= len(self.prompts):
            return [self.batch(size)]
        return [self.prompts[i:i + size] for i in range(0, len(self.prompts) - size + 1, size)]


def prompt_set(tokenizer: Tokenizer | None, vocab_size: int, count: int, prompt_len: int, seed: int) -> PromptSet:
    """Real text through the model's `tokenizer`, or (None: a random model) `count` random prompts."""
    if tokenizer is not None:
        prompts = text_prompts(tokenizer)
        lens = [len(p) for p in prompts]
        return PromptSet(prompts, "text", f"{len(prompts) // 2} Pride and Prejudice passages alternating with "
                                          f"{len(prompts) // 2} held-out synthetic chats (train.synthetic seed "
                                          f"{CHAT_SEED}, split {CHAT_SPLIT}), {min(lens)}-{max(lens)} tokens")
    ids = measure.random_prompts(vocab_size, count, prompt_len, seed + 11)
    return PromptSet([row.tolist() for row in ids], "random",
                     f"{count} random token-id prompts of {prompt_len} tokens (the model has no tokenizer)")


# ---- engines ---------------------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    spec: SpeculativeConfig
    prompts: PromptSet
    max_model_len: int
    num_seqs: int


def prepare(opts, model: Qwen3NextForCausalLM, tokenizer: Tokenizer, has_tokenizer: bool) -> _Plan:
    """Prompts and engine sizes for the measurement, checked before the bench's other measurements run: a model
    without an MTP head fails here with the engine's ValueError, as does a context longer than the model's."""
    spec = SpeculativeConfig.parse(opts.speculative_config)
    if model.mtp is None:
        Engine(model, tokenizer=tokenizer, speculative_config=spec)  # raises its ValueError before allocating
    prompts = prompt_set(tokenizer if has_tokenizer else None, model.config.vocab_size, max(opts.batches),
                         opts.prompt_len, opts.seed)
    # room for a verification's drafts past max_tokens (the scheduler cuts the run, the cache still holds it)
    max_model_len = max(len(p) for p in prompts.prompts) + opts.decode_tokens + MAX_SPECULATIVE_TOKENS + 2
    if max_model_len > model.config.max_context_len:
        raise ValueError(f"speculative_config: the longest prompt ({max(len(p) for p in prompts.prompts)} tokens) "
                         f"plus {opts.decode_tokens} decode tokens and the drafts exceed the model's "
                         f"context ({model.config.max_context_len}: max_position_embeddings, or the YaRN length)")
    return _Plan(spec, prompts, max_model_len, max(opts.batches))


def _engine(model: Qwen3NextForCausalLM, tokenizer: Tokenizer, plan: _Plan, speculative: bool,
            compiled: bool) -> Engine:
    """An engine whose cache holds the largest batch's sequences of `plan.max_model_len` positions."""
    num_seqs = max(plan.num_seqs, 2) if compiled else plan.num_seqs  # the compiled decoder's warmup needs 2 slots
    geometry = cache_geometry(model, BLOCK_SIZE, include_mtp=speculative)
    blocks_per_seq = -(-plan.max_model_len // BLOCK_SIZE)
    budget = num_seqs * (geometry.state_bytes_per_slot + (blocks_per_seq + 1) * geometry.block_bytes) + 1
    # No prefix caching: the rounds reuse their prompts, which would then skip their prefills.
    return Engine(model, tokenizer=tokenizer, max_memory=budget, max_num_seqs=num_seqs,
                  max_model_len=plan.max_model_len, block_size=BLOCK_SIZE, compile_decode=compiled,
                  speculative_config=plan.spec if speculative else None, enable_prefix_caching=False)


# ---- one timed run ---------------------------------------------------------------------------------------------------
_SPEC_COUNTERS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "num_emitted_tokens")


def _snapshot(engine: Engine) -> dict[str, object]:
    s = engine.spec_stats
    return {"steps": engine.stats["steps"], "generation_tokens": engine.stats["generation_tokens"],
            **{k: getattr(s, k) for k in _SPEC_COUNTERS},
            "accepted_per_position": list(s.accepted_per_position),
            "drafted_per_position": list(s.drafted_per_position)}


def _combine(x: dict[str, object], y: dict[str, object], sign: int) -> dict[str, object]:
    """Counter snapshots added (sign 1) or subtracted (-1), key by key (lists element-wise)."""
    return {k: [a + sign * b for a, b in zip(v, y[k])] if isinstance(v, list) else v + sign * y[k]
            for k, v in x.items()}


def _delta(after: dict[str, object], before: dict[str, object]) -> dict[str, object]:
    return _combine(after, before, -1)


def _total(counters: list[dict[str, object]]) -> dict[str, object]:
    total = counters[0]
    for c in counters[1:]:
        total = _combine(total, c, 1)
    return total


@dataclass
class _Run:
    seconds: float
    tokens: int  # generated inside the timed window
    token_ids: list[list[int]]  # per request, everything it generated
    counters: dict[str, object]  # engine counters of the timed window

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def run_batch(engine: Engine, prompts: list[list[int]], max_tokens: int) -> _Run:
    """Greedy decoding of `prompts` (EOS ignored) to `max_tokens` each; the clock runs from the step after which every
    request has its first token to the end."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    reqs = [engine.add_request(p, params) for p in prompts]

    def generated() -> int:
        return sum(len(r.samples[0].out.token_ids) for r in reqs)

    while any(not r.samples[0].out.token_ids for r in reqs):  # prefill (possibly chunked over several steps)
        if not engine.step():
            raise RuntimeError("engine stopped before every prompt was prefilled")
    start_tokens, before = generated(), _snapshot(engine)
    t0 = time.perf_counter()
    while engine.step():
        pass
    seconds = time.perf_counter() - t0
    ids = [list(r.output().outputs[0].token_ids) for r in reqs]
    if any(len(t) != max_tokens for t in ids):
        raise RuntimeError(f"engine: expected {max_tokens} tokens per request, got {[len(t) for t in ids]}")
    return _Run(seconds, generated() - start_tokens, ids, _delta(_snapshot(engine), before))


def run_groups(engine: Engine, groups: list[list[list[int]]], max_tokens: int) -> _Run:
    """`run_batch` over each group in turn; times, tokens and counters added up."""
    runs = [run_batch(engine, g, max_tokens) for g in groups]
    return _Run(sum(r.seconds for r in runs), sum(r.tokens for r in runs), [t for r in runs for t in r.token_ids],
                _total([r.counters for r in runs]))


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


# ---- the measurement -------------------------------------------------------------------------------------------------
def _row(mode: str, batch: int, plain: list[_Run], spec: list[_Run], k: int, engine: Engine,
         mismatches: list[dict[str, object]]) -> dict[str, object]:
    """The report row of one (mode, batch): timed rounds, speedups, the acceptance over the timed rounds."""
    total = _total([r.counters for r in spec])
    drafts, drafted = total["num_drafts"], total["drafted_per_position"][:k]
    by_position = [a / d if d else None for a, d in zip(total["accepted_per_position"][:k], drafted)]
    plain_steps = sum(r.counters["steps"] for r in plain)
    ratios = [s.tokens_per_s / p.tokens_per_s for p, s in zip(plain, spec)]
    return {
        "mode": mode, "batch": batch,
        "plain_tokens_per_s": statistics.median(r.tokens_per_s for r in plain),
        "spec_tokens_per_s": statistics.median(r.tokens_per_s for r in spec),
        "plain_rounds": [r.tokens_per_s for r in plain], "spec_rounds": [r.tokens_per_s for r in spec],
        "speedups": ratios, "speedup_median": statistics.median(ratios), "speedup_min": min(ratios),
        "acceptance_by_position": by_position,
        "acceptance_rate": total["num_accepted_tokens"] / total["num_draft_tokens"] if drafts else None,
        "mean_accepted_length": total["num_emitted_tokens"] / drafts if drafts else None,  # tokens per verify step
        "verifications": drafts, "draft_tokens": total["num_draft_tokens"],
        "accepted_tokens": total["num_accepted_tokens"],
        "plain_steps": plain_steps, "spec_steps": total["steps"],
        "spec_tokens_per_step": total["generation_tokens"] / total["steps"] if total["steps"] else None,
        "draft_length_last": engine.scheduler.draft_policy.last_choice,
        "identical": not mismatches, "mismatches": mismatches,
    }


def engine_storage(opts, model: Qwen3NextForCausalLM) -> tuple[Qwen3NextForCausalLM, str]:
    """The model as the engine would hold it for `opts.model` and a description: a directory the engine loads with
    bf16 storage by default (`engine.llm.weight_storage`: a bf16 checkpoint loaded as float32 on a CPU with the
    native kernels) is measured so, through a copy whose matrices are bf16 (the float model's other tensors shared);
    else the bench's own model."""
    if opts.model is None or weight_storage(Path(opts.model), model.dtype, model.device, None) != "bf16":
        return model, str(model.dtype).removeprefix("torch.")
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return store_bf16(copy.deepcopy(model, memo=shared)), "bf16 storage (the engine's default for this checkpoint)"


def measure_speculative(opts, model: Qwen3NextForCausalLM, tokenizer: Tokenizer, plan: _Plan,
                        log: Callable[[str], None]) -> dict[str, object]:
    """Paired rounds of plain vs speculative decoding for every mode and batch size; the report's "speculative"
    section."""
    k, rows = plan.spec.num_speculative_tokens, []
    modes = ["eager", "compiled"] if opts.compile else ["eager"]
    model, storage = engine_storage(opts, model)
    for mode in modes:
        compiled = mode == "compiled"
        if compiled:
            log("spec    compiling the plain and the speculative engine's decode steps (not timed)")
        engines = {"plain": _engine(model, tokenizer, plan, speculative=False, compiled=compiled),
                   "spec": _engine(model, tokenizer, plan, speculative=True, compiled=compiled)}
        for batch in opts.batches:
            groups = plan.prompts.groups(batch)
            runs: dict[str, list[_Run]] = {"plain": [], "spec": []}
            mismatches: list[dict[str, object]] = []
            for r in range(opts.repeat + 1):  # round 0: warmup (not timed; the adaptive draft length settles)
                got = {name: run_groups(engine, groups, opts.decode_tokens) for name, engine in engines.items()}
                for i, (a, b) in enumerate(zip(got["plain"].token_ids, got["spec"].token_ids)):
                    at = _first_difference(a, b)
                    if at is not None:
                        mismatches.append({"round": r, "request": i, "first_difference": at})
                        log(f"MISMATCH {mode} B={batch} round {r} request {i}: speculative greedy tokens differ from "
                            f"plain from token {at} on ({a[at:at + 4]} vs {b[at:at + 4]}): a bug")
                if r:
                    for name in runs:
                        runs[name].append(got[name])
                    log(f"spec    {mode:<8} B={batch:<3} round {r}/{opts.repeat}: plain "
                        f"{got['plain'].tokens_per_s:8.1f} tok/s, spec {got['spec'].tokens_per_s:8.1f} tok/s, "
                        f"{got['spec'].tokens_per_s / got['plain'].tokens_per_s:.2f}x")
            rows.append(_row(mode, batch, runs["plain"], runs["spec"], k, engines["spec"], mismatches))
        del engines
    return {"config": asdict(plan.spec), "weights": storage, "prompts": plan.prompts.source,
            "prompt_description": plan.prompts.description, "prompt_lens": [len(p) for p in plan.prompts.prompts],
            "decode_tokens": opts.decode_tokens, "rounds": opts.repeat, "warmup_rounds": 1, "rows": rows,
            "identical": all(r["identical"] for r in rows)}


# ---- printing --------------------------------------------------------------------------------------------------------
def format_section(section: dict[str, object], aligned: Callable[[list[list[str]], int], list[str]]) -> list[str]:
    """The report's speculative-decoding table and notes (`aligned`: the harness's column aligner)."""
    c = section["config"]
    k, rounds = c["num_speculative_tokens"], section["rounds"]

    def num(x: float | None, fmt: str) -> str:
        return format(x, fmt) if x is not None else "-"

    def pct(x: float | None, fmt: str) -> str:
        return format(100 * x, fmt) + "%" if x is not None else "-"

    header = ["mode", "batch", "plain tok/s", "spec tok/s", "speedup (median / min)", "tokens/verify",
              "acceptance", f"by position (1..{k})", "steps plain / spec", "last k", "identical"]
    table = [header]
    for r in section["rows"]:
        table.append([r["mode"], str(r["batch"]), f"{r['plain_tokens_per_s']:.1f}", f"{r['spec_tokens_per_s']:.1f}",
                      f"{r['speedup_median']:.2f}x / {r['speedup_min']:.2f}x", num(r["mean_accepted_length"], ".2f"),
                      pct(r["acceptance_rate"], ".1f"), " ".join(pct(a, ".0f") for a in r["acceptance_by_position"]),
                      f"{r['plain_steps'] / rounds:.0f} / {r['spec_steps'] / rounds:.0f}", str(r["draft_length_last"]),
                      "true" if r["identical"] else "FALSE"])
    adaptive = "adaptive draft length 0.." + str(k) if c["adaptive"] else f"fixed draft length {k}"
    lines = [f"speculative decoding ({c['method']}, num_speculative_tokens {k}, {adaptive}) vs plain, same model "
             f"(weights: {section.get('weights', '-')}), through the engine", *aligned(table, 2), "",
             f"prompts: {section['prompt_description']}; every round decodes each prompt once, in batches of B",
             f"greedy, {section['decode_tokens']} tokens per request (EOS ignored); decode only (the clock starts once "
             f"every request has its first token); {section['rounds']} paired rounds after {section['warmup_rounds']} "
             "warmup (plain, then spec, same prompts); tok/s = median over rounds, speedup = spec / plain of the same "
             "round",
             "tokens/verify = tokens emitted per verification (1 + accepted drafts); acceptance = accepted / drafted "
             "tokens, by position = P(draft j accepted | drafts before it accepted), in %; steps = engine decode "
             "steps per round (a spec step without drafts is a plain step); last k = the draft length chosen last; "
             "identical = greedy token ids of spec == plain in every round"]
    bad = [r for r in section["rows"] if not r["identical"]]
    for r in bad:
        m = r["mismatches"][0]
        lines.append(f"!!! BUG: speculative greedy output differs from plain decoding ({r['mode']}, batch "
                     f"{r['batch']}: {len(r['mismatches'])} request-rounds, first in round {m['round']} request "
                     f"{m['request']} at token {m['first_difference']}); speculative decoding must be exact")
    return lines
