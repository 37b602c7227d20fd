"""`LLM(..., skip_tokenizer_init=True)` (vLLM's name): a bare checkpoint without tokenizer files runs on token ids."""

from __future__ import annotations

import json

import pytest
import torch

from qwen3next.engine.llm import LLM, Engine
from qwen3next.engine.sampling import SamplingParams
from qwen3next.model.generate import generate_tokens
from tiny_models import make_model


@pytest.fixture(scope="module")
def bare_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bare")
    make_model("base", vocab_size=97, max_position_embeddings=512).save_pretrained(d)  # config.json: eos 2
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 2]}))
    assert not (d / "tokenizer.json").exists()
    return d


def test_a_bare_checkpoint_needs_the_flag_and_says_so(bare_dir):
    with pytest.raises(ValueError, match="skip_tokenizer_init=True"):
        Engine(bare_dir)


def test_token_ids_in_token_ids_out(bare_dir):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(6, 97, (n,), generator=g).tolist() for n in (5, 17)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    with LLM(bare_dir, skip_tokenizer_init=True, max_memory="16MiB", max_model_len=128) as llm:
        assert llm.tokenizer is None
        assert llm.engine.scheduler.config.eos_token_ids == (2, 5)  # config.json's, then generation_config's
        outs = llm.generate(prompts, params)
        model = llm.engine.model
        for p, o in zip(prompts, outs):
            assert o.token_ids == list(generate_tokens(model, p, 8)) and o.text == ""
            assert [e["token_id"] for e in o.outputs[0].logprobs] == o.token_ids
            assert o.prompt_logprobs[0] is None and len(o.prompt_logprobs) == len(p)
            assert all(lp.decoded_token is None for d in o.prompt_logprobs[1:] for lp in d.values())
        for call, match in ((lambda: llm.generate("text"), "token ids"),
                            (lambda: llm.generate([[7, 8]], SamplingParams(stop=["x"])), "stop_token_ids"),
                            (lambda: llm.chat([{"role": "user", "content": "hi"}]), "chat template")):
            with pytest.raises(ValueError, match=match):
                call()
        # an eos id from the config ends generation without the tokenizer
        first = outs[0].token_ids[0]
        plain = SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[first])
        stopped = llm.generate([prompts[0]], plain)[0]
        assert stopped.token_ids == [first] and stopped.finish_reason == "stop"


def test_with_a_model_object_and_no_tokenizer(bare_dir):
    model = make_model("base", vocab_size=97, max_position_embeddings=512)
    with pytest.raises(ValueError, match="skip_tokenizer_init"):
        Engine(model)
    engine = Engine(model, skip_tokenizer_init=True, max_memory="16MiB", max_model_len=64)
    assert engine.scheduler.config.eos_token_ids == (2,)
    req = engine.add_request([9, 10, 11], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    while engine.step():
        pass
    assert req.output().token_ids == list(generate_tokens(model, [9, 10, 11], 4))
