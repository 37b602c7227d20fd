"""Grammar-constrained decoding (engine/structured.py, llguidance): the demo model's sampled outputs match their
JSON schema / regex / choice / grammar every time; the token masks per speculative position equal the masks of a
matcher advanced by hand; MTP drafting leaves constrained outputs token-identical; bad constraints get clear
errors."""

from __future__ import annotations

import json
import re

import jsonschema
import llguidance
import pytest
import torch

from qwen3next import DEFAULT_MODEL
from qwen3next.engine.llm import LLM, Engine
from qwen3next.engine.sampling import SamplingParams, StructuredOutputsParams
from qwen3next.engine.structured import GrammarCompiler, allowed_mask, closed_objects, words_per_row
from qwen3next.tokenizer import Tokenizer

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL / "config.json").exists(), reason="demo model not built")

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 24},
    "temperature": {"type": "integer", "minimum": -60, "maximum": 60},
    "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "temperature", "unit"], "additionalProperties": False}
QUESTION = [{"role": "user", "content": "What is the weather in Paris? Answer in JSON."}]


@pytest.fixture(scope="module")
def llm():
    with LLM(DEFAULT_MODEL, max_memory="64MiB", max_model_len=512) as llm:
        yield llm


@pytest.fixture(scope="module")
def compiler():
    tok = Tokenizer.from_dir(DEFAULT_MODEL)
    return GrammarCompiler(tok.backend.to_str(), 8256, tok.eos_token_ids)


def sample(llm, so, n=20, max_tokens=64, messages=QUESTION):
    params = [SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=i, structured_outputs=so) for i in range(n)]
    return [o.outputs[0] for o in llm.generate([llm.chat_prompt(messages)] * n, params)]


def test_json_schema_outputs_validate_20_of_20_at_temperature_1(llm):
    outs = sample(llm, {"json": WEATHER})
    for o in outs:
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), WEATHER)
    assert len({o.text for o in outs}) > 1  # really sampled


def test_without_the_constraint_the_demo_model_does_not_answer_in_that_schema(llm):
    """The constraint is what makes the outputs valid: unconstrained samples of the same prompt are not."""
    valid = 0
    for o in sample(llm, None):
        try:
            jsonschema.validate(json.loads(o.text), WEATHER)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    assert valid < 20


def test_json_object_regex_choice_and_grammars(llm):
    for o in sample(llm, {"json_object": True}, n=6, max_tokens=96):
        if o.finish_reason == "stop":
            assert isinstance(json.loads(o.text), dict)
        else:  # cut by max_tokens: still a prefix of an object
            assert o.text.startswith("{")
    for o in sample(llm, {"regex": r"[0-9]{3}-[a-z]{2,5}"}, n=6):
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,5}", o.text), o.text
    choices = ["sunny", "rainy", "cloudy"]
    outs = sample(llm, {"choice": choices}, n=8)
    assert all(o.text in choices for o in outs)
    lark = 'start: "The weather is " WORD "."\nWORD: /[a-z]{3,8}/'
    for o in sample(llm, {"grammar": lark}, n=4):
        assert re.fullmatch(r"The weather is [a-z]{3,8}\.", o.text), o.text
    gbnf = 'root ::= "answer: " ("yes" | "no")'
    assert {o.text for o in sample(llm, {"grammar": gbnf}, n=6)} <= {"answer: yes", "answer: no"}


def test_n_samples_advance_their_own_matchers(llm):
    out = llm.generate([llm.chat_prompt(QUESTION)], SamplingParams(
        n=4, temperature=1.0, max_tokens=64, seed=3, structured_outputs={"json": WEATHER}))[0]
    for o in out.outputs:
        jsonschema.validate(json.loads(o.text), WEATHER)


def test_masks_of_speculative_positions_equal_a_matcher_advanced_by_hand(compiler):
    """fill_masks(drafts) writes, for position j, the mask after drafts[:j] (reference: a fresh matcher fed those
    tokens and asked once), leaves the rows after a draft the grammar rejects all-ones, and leaves the matcher
    where it was (rolled back)."""
    tok = Tokenizer.from_dir(DEFAULT_MODEL)
    so = StructuredOutputsParams(json=WEATHER)
    W = words_per_row(8256)

    def mask_after(tokens):
        ref = compiler.matcher(so)
        assert ref.accept(tokens)
        row = torch.full((1, W), -1, dtype=torch.int32)
        ref.fill_masks(row, 0, [])
        return row[0]

    prefix = tok.encode('{"city": "Pa')
    m = compiler.matcher(so)
    assert m.accept(prefix)
    good = tok.encode('ris", "temperature": 1')
    bad = tok.encode('ris"') + tok.encode("}") + tok.encode(', "unit"')  # "}" before the required keys
    for ds, valid in ((good, len(good)), (bad, len(tok.encode('ris"')))):
        bitmask = torch.full((len(ds) + 1, W), -1, dtype=torch.int32)
        assert m.fill_masks(bitmask, 0, ds) == valid + 1
        for j in range(len(ds) + 1):
            if j <= valid:
                assert torch.equal(bitmask[j], mask_after(prefix + ds[:j])), j
            else:
                assert (bitmask[j] == -1).all(), j
        row = torch.full((1, W), -1, dtype=torch.int32)
        m.fill_masks(row, 0, [])
        assert torch.equal(row[0], mask_after(prefix))  # rolled back to the prefix


def test_allowed_mask_matches_the_bit_layout():
    """The vectorised unpacking against a per-token loop (reference twin)."""
    g = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, words_per_row(100)), dtype=torch.int32, generator=g)
    got = allowed_mask(bitmask, 100)
    want = torch.tensor([[bool((int(bitmask[r, t // 32]) >> (t % 32)) & 1) for t in range(100)] for r in range(3)])
    assert torch.equal(got, want)


# Optional keys and a short string: drafts that end the grammar early (`"` `}` then EOS) and are then rejected
OPTIONAL = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 12}, "temperature": {"type": "integer"},
    "unit": {"enum": ["celsius", "fahrenheit"]}, "note": {"type": "string", "maxLength": 8}}, "required": ["city"]}


def _constrained_outputs(spec, schema, n: int, on_step=None):
    """n requests of QUESTION constrained to `schema` (two greedy, the rest seeded sampling) through a demo-model
    engine with `spec`; `on_step(engine, reqs)` after every step. Returns the engine and the outputs."""
    engine = Engine(DEFAULT_MODEL, max_memory="64MiB", max_model_len=256, max_num_seqs=n, speculative_config=spec)
    prompt = engine.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    params = [SamplingParams(temperature=0.0 if i < 2 else 1.0, seed=i, max_tokens=80,
                             structured_outputs={"json": schema}) for i in range(n)]
    reqs = [engine.add_request(prompt, sp) for sp in params]
    while engine.step():
        if on_step is not None:
            on_step(engine, reqs)
    return engine, [r.output().outputs[0] for r in reqs]


@pytest.mark.parametrize("schema", [WEATHER, OPTIONAL], ids=["required-keys", "optional-keys"])
def test_mtp_drafting_leaves_constrained_outputs_token_identical(schema):
    """Greedy and seeded constrained outputs with MTP drafts (masks per verified position on a copy of the
    matcher) equal plain decoding's and validate; the drafts stay inside the grammar and are mostly accepted."""
    def drafts_inside_the_grammar(engine, reqs):
        for r in reqs:  # the MTP head drafts inside the grammar: every draft is one the grammar allows next
            seq, eos = r.samples[0].seq, engine.scheduler.config.eos_token_ids
            d = seq.draft_token_ids
            d = d[:next((i + 1 for i, t in enumerate(d) if t in eos), len(d))]  # nothing follows an EOS
            if seq.is_finished:
                continue
            if seq.grammar.is_stopped:  # complete: only an end-of-sequence token may follow
                assert not d or d[0] in eos
            else:
                assert seq.grammar.valid_prefix(d) == len(d)

    outs = []
    for spec in (None, {"method": "mtp", "num_speculative_tokens": 3, "adaptive": False}):
        engine, got = _constrained_outputs(spec, schema, 16, drafts_inside_the_grammar)
        outs.append(got)
        if spec is not None:
            assert engine.spec_stats.acceptance_rate > 0.35  # 0.46-0.8 here; drafts outside the grammar: ~0.2
    for plain, spec in zip(*outs):
        assert plain.token_ids == spec.token_ids
        assert spec.finish_reason == "stop"
        jsonschema.validate(json.loads(plain.text), schema)


def test_bad_constraints_are_rejected_clearly(llm, compiler):
    cases = [({"json": {}, "regex": "a"}, "exactly one of json, json_object, regex, choice, grammar"),
             ({"json": "{not json"}, "structured_outputs.json: not valid JSON"),
             ({"choice": []}, "structured_outputs.choice must be a non-empty list"),
             ({"regex": 3}, "structured_outputs.regex must be a non-empty string"),
             ({"jsn": {}}, "unknown key 'jsn'")]
    for so, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            SamplingParams(structured_outputs=so)
    for so, field in (({"regex": "(unclosed"}, "regex"), ({"grammar": "start: undefined_rule"}, "grammar"),
                      ({"json": {"type": "no-such-type"}}, "json")):
        with pytest.raises(ValueError, match=f"structured_outputs.{field}: "):
            llm.submit("Hi", SamplingParams(structured_outputs=so))
    assert llm.generate(["Hi"], SamplingParams(max_tokens=2))[0].outputs[0].token_ids  # still serving


def test_no_tokenizer_no_constraint():
    engine = Engine(DEFAULT_MODEL, max_memory="32MiB", max_model_len=128, skip_tokenizer_init=True)
    with pytest.raises(ValueError, match="structured_outputs: constrained decoding needs the tokenizer"):
        engine.add_request([1, 2, 3], SamplingParams(structured_outputs={"json_object": True}))


def test_llguidance_is_the_engine():  # the tokenizer built from tokenizer.json alone sees the special tokens
    tok = Tokenizer.from_dir(DEFAULT_MODEL)
    lt = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=8256, eos_token=tok.eos_token_ids)
    assert lt.vocab_size == 8256 and set(lt.eos_tokens) == set(tok.eos_token_ids)


def test_objects_get_only_the_keys_their_schema_lists(llm):
    """As xgrammar (vLLM's default backend) does: a schema listing properties without a word on others (pydantic's
    default) gets no invented keys; one that allows them explicitly keeps that."""
    open_schema = {k: v for k, v in WEATHER.items() if k != "additionalProperties"}
    for o in sample(llm, {"json": open_schema}, n=10):
        assert o.finish_reason == "stop" and set(json.loads(o.text)) <= set(WEATHER["properties"]), o.text
    nested = {"type": "object", "properties": {
        "properties": {"type": "object", "properties": {"a": {"type": "integer"}}},  # a key named "properties"
        "rows": {"type": "array", "items": {"type": "object", "properties": {"x": {}}}},
        "free": {"type": "object", "properties": {"y": {}}, "additionalProperties": True}},
        "$defs": {"D": {"type": "object", "properties": {"z": {}}}}, "enum": [{"properties": {}}]}
    closed = closed_objects(nested)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["properties"]["additionalProperties"] is False
    assert set(closed["properties"]) == {"properties", "rows", "free"}  # the mapping itself is not a schema
    assert closed["properties"]["rows"]["items"]["additionalProperties"] is False
    assert closed["properties"]["free"]["additionalProperties"] is True
    assert closed["$defs"]["D"]["additionalProperties"] is False
    assert closed["enum"] == [{"properties": {}}]  # values, not schemas
    assert "additionalProperties" not in nested  # the caller's schema is not changed
    # schemas that combine or condition objects stay as they mean: closing would make them unsatisfiable or change
    # what they reject
    both = {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                      {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}]}
    assert closed_objects(both) == both
    conditional = {"type": "object", "properties": {"country": {"type": "string"}},
                   "if": {"properties": {"country": {"const": "US"}}}, "then": {"required": ["zip"]}}
    assert closed_objects(conditional) == conditional
    assert closed_objects({"not": {"properties": {"a": {}}}}) == {"not": {"properties": {"a": {}}}}
    unlisted = {"type": "object", "properties": {"a": {}}, "required": ["a", "b"]}
    assert closed_objects(unlisted) == unlisted


def test_mtp_with_a_draft_vocabulary_keeps_constrained_outputs(tmp_path):
    """A draft vocabulary under a grammar: the demo's own map, and one of two tokens the grammar never allows (every
    constrained draft then has only -inf logits; the matcher copy refuses it and drafting goes on unconstrained):
    greedy and seeded outputs equal plain decoding's and validate."""
    (tmp_path / "tiny.json").write_text("[5, 6]")
    maps = [str(DEFAULT_MODEL / "speculative_token_map.json"), str(tmp_path / "tiny.json")]
    outs = []
    for token_map in (None, *maps):
        spec = None if token_map is None else {"method": "mtp", "num_speculative_tokens": 3, "adaptive": False,
                                               "speculative_token_map": token_map}
        engine, got = _constrained_outputs(spec, WEATHER, 4)
        outs.append(got)
        if spec is not None:
            assert engine.spec_stats.num_draft_tokens > 0
    for plain, *spec in zip(*outs):
        assert all(s.token_ids == plain.token_ids for s in spec)
        jsonschema.validate(json.loads(plain.text), WEATHER)
