"""`qwen3next bench --structured-output`: what grammar-constrained decoding costs.

1. Decode speed with a JSON-schema constraint vs without, through one engine, at each `--batch` size: per round the
   same B chat prompts run unconstrained and constrained (the order alternates between rounds; one untimed warmup
   round first), greedy, EOS ignored, `--decode-tokens` tokens each. The clock starts once every request has its
   first token (prefill is not timed) and stops when the last finishes. The schema is a long list of weather
   reports (at least 64 items), so the grammar constrains every timed token. Reported: tok/s of both (medians over
   rounds) and their ratio per round, and the grammar's own time per decode step and per token in milliseconds
   (`engine.stats["grammar_seconds"]`: the token masks, their unpacking, the matcher advances), which is the
   cleaner number: the outputs differ, and the MoE's cost depends a little on which experts the tokens pick.
2. Grammar compile times (median of `--repeat` compiles, after one that builds llguidance's tokenizer trie, timed
   apart): the weather schema, the list schema, and the tool-call grammars of 10 tools (`tool_choice` "required",
   and "auto").
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..engine.llm import Engine
from ..engine.sampling import SamplingParams, StructuredOutputsParams
from ..model.qwen3_next import Qwen3NextForCausalLM
from ..tokenizer import Tokenizer

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 24},
    "temperature": {"type": "integer", "minimum": -60, "maximum": 60},
    "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "temperature", "unit"], "additionalProperties": False}
REPORTS = {"type": "object", "properties": {"reports": {"type": "array", "items": WEATHER, "minItems": 64}},
           "required": ["reports"], "additionalProperties": False}
QUESTIONS = [f"What is the weather in {c}? Answer in JSON." for c in
             ("Paris", "Madrid", "Cairo", "Oslo", "Lima", "Tokyo", "Nairobi", "Quito")]


def ten_tools() -> list[dict]:
    """Ten tools of the kinds real tool lists have: strings, integers, enums, a nested object, an array."""
    kinds = [{"type": "string"}, {"type": "integer", "minimum": 0}, {"enum": ["low", "medium", "high"]},
             {"type": "object", "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
              "required": ["lat", "lon"]},
             {"type": "array", "items": {"type": "string"}}]
    tools = []
    for i in range(10):
        props = {f"arg{j}": kinds[(i + j) % len(kinds)] for j in range(2 + i % 3)}
        tools.append({"type": "function", "function": {
            "name": f"tool_{i}", "description": f"Tool number {i}.",
            "parameters": {"type": "object", "properties": props, "required": list(props)[:2],
                           "additionalProperties": False}}})
    return tools


@dataclass
class StructuredBenchOptions:
    batches: list[int] = field(default_factory=lambda: [1, 8])
    decode_tokens: int = 64
    rounds: int = 5  # timed rounds per batch size (after one warmup)
    compile_repeat: int = 5


def _engine(model: Qwen3NextForCausalLM, tokenizer: Tokenizer, num_seqs: int, max_model_len: int) -> Engine:
    # No prefix caching: the rounds reuse their prompts (prefill is not timed, but the runs should be alike).
    return Engine(model, tokenizer=tokenizer, max_num_seqs=num_seqs, max_model_len=max_model_len,
                  enable_prefix_caching=False)


@dataclass
class _Run:
    seconds: float
    tokens: int  # generated in the timed window
    steps: int
    grammar_seconds: float  # of those seconds, in token masks and matcher advances (engine.stats)


def _run(engine: Engine, prompts: list[list[int]], tokens: int, constraint: StructuredOutputsParams | None) -> _Run:
    """The timed window (after every request's first token) of one batch."""
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, structured_outputs=constraint)
    reqs = [engine.add_request(p, params) for p in prompts]
    while any(not r.samples[0].out.token_ids for r in reqs):
        engine.step()
    before = sum(len(r.samples[0].out.token_ids) for r in reqs)
    steps, grammar = engine.stats["steps"], engine.stats["grammar_seconds"]
    t0 = time.perf_counter()
    while engine.step():
        pass
    seconds = time.perf_counter() - t0
    return _Run(seconds, sum(len(r.samples[0].out.token_ids) for r in reqs) - before, engine.stats["steps"] - steps,
                engine.stats["grammar_seconds"] - grammar)


def measure_decode(engine: Engine, opts: StructuredBenchOptions, log: Callable[[str], None]) -> list[dict]:
    tok = engine.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True))
               for q in QUESTIONS]
    constraint = StructuredOutputsParams(json=REPORTS)
    rows = []
    for batch in opts.batches:
        batch_prompts = [prompts[i % len(prompts)] for i in range(batch)]
        runs: dict[str, list[_Run]] = {"plain": [], "json": []}
        for r in range(opts.rounds + 1):
            order = ("plain", "json") if r % 2 == 0 else ("json", "plain")
            for name in order:
                run = _run(engine, batch_prompts, opts.decode_tokens, constraint if name == "json" else None)
                if r:  # round 0 warms up
                    runs[name].append(run)
        rate = {k: [x.tokens / x.seconds for x in v] for k, v in runs.items()}
        step_ms = {k: statistics.median(1e3 * x.seconds / max(x.steps, 1) for x in v) for k, v in runs.items()}
        grammar_ms = statistics.median(1e3 * x.grammar_seconds / max(x.steps, 1) for x in runs["json"])
        ratios = [j / p for p, j in zip(rate["plain"], rate["json"])]
        row = {"batch": batch, "plain_tokens_per_s": statistics.median(rate["plain"]),
               "json_tokens_per_s": statistics.median(rate["json"]), "ratio_median": statistics.median(ratios),
               "ratio_min": min(ratios), "plain_step_ms": step_ms["plain"], "json_step_ms": step_ms["json"],
               "grammar_ms_per_step": grammar_ms, "grammar_ms_per_token": grammar_ms / batch,
               "grammar_share": grammar_ms / step_ms["json"],
               "plain_rounds": rate["plain"], "json_rounds": rate["json"]}
        log(f"structured batch {batch}: {row['plain_tokens_per_s']:.1f} tok/s plain, "
            f"{row['json_tokens_per_s']:.1f} constrained (x{row['ratio_median']:.3f}); grammar {grammar_ms:.3f} ms "
            f"of a {step_ms['json']:.2f} ms step")
        rows.append(row)
    return rows


def measure_compile(engine: Engine, opts: StructuredBenchOptions) -> dict:
    from ..server import protocol as P
    from ..server.tools import tool_grammar

    tools = [P.Tool.model_validate(t) for t in ten_tools()]
    t0 = time.perf_counter()
    engine.compile_grammar(SamplingParams(structured_outputs={"json_object": True}))  # builds the token trie
    first = time.perf_counter() - t0
    cases = {"weather schema": StructuredOutputsParams(json=WEATHER),
             "list of 64+ weather reports": StructuredOutputsParams(json=REPORTS),
             "10 tools, tool_choice required": StructuredOutputsParams(
                 grammar=tool_grammar(tools, "required", True, True)),
             "10 tools, tool_choice auto": StructuredOutputsParams(grammar=tool_grammar(tools, "auto", True, True))}
    out = {"tokenizer_trie_ms": 1e3 * first}
    for name, so in cases.items():
        times = []
        for _ in range(opts.compile_repeat):
            t0 = time.perf_counter()
            engine.compile_grammar(SamplingParams(structured_outputs=so))
            times.append(1e3 * (time.perf_counter() - t0))
        out[name] = {"median_ms": statistics.median(times), "max_ms": max(times)}
    return out


def bench_structured(opts: StructuredBenchOptions, model: Qwen3NextForCausalLM, tokenizer: Tokenizer,
                     log: Callable[[str], None]) -> dict:
    engine = _engine(model, tokenizer, max(opts.batches), 512 + opts.decode_tokens)
    compile_ms = measure_compile(engine, opts)
    return {"decode": measure_decode(engine, opts, log), "compile": compile_ms,
            "schema": "an object holding a list of at least 64 weather reports (city, temperature, unit)"}


def format_section(section: dict, aligned: Callable[[list[list[str]], int], list[str]]) -> list[str]:
    lines = ["structured output (grammar-constrained decoding, llguidance): decode, greedy, EOS ignored",
             f"  schema: {section['schema']}"]
    table = [["batch", "plain tok/s", "json tok/s", "ratio med", "ratio min", "step ms", "grammar ms/step",
              "ms/token", "share"]]
    for r in section["decode"]:
        table.append([str(r["batch"]), f"{r['plain_tokens_per_s']:.1f}", f"{r['json_tokens_per_s']:.1f}",
                      f"{r['ratio_median']:.3f}", f"{r['ratio_min']:.3f}", f"{r['json_step_ms']:.2f}",
                      f"{r['grammar_ms_per_step']:.3f}", f"{r['grammar_ms_per_token']:.3f}",
                      f"{100 * r['grammar_share']:.1f}%"])
    lines += ["  " + line for line in aligned(table, 1)]
    c = section["compile"]
    lines.append(f"  grammar compile (median of repeats): token trie {c['tokenizer_trie_ms']:.1f} ms once")
    for name, v in c.items():
        if isinstance(v, dict):
            lines.append(f"    {name}: {v['median_ms']:.2f} ms (max {v['max_ms']:.2f})")
    return lines
