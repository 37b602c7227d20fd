import math

import pytest
import torch

from qwen3next.engine.sampler import SamplingBatch, apply_penalties, sample
from qwen3next.engine.sampling import SamplingParams

# ---- SamplingParams ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"n": 0}, "n"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.1}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.1}, "frequency_penalty"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 21}, "logprobs"),
        ({"seed": 1.5}, "seed"),
        ({"stop": 5}, "stop"),
        ({"stop": ["a", 3]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [1, -2]}, "stop_token_ids"),
    ],
)
def test_sampling_params_validation_names_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_sampling_params_defaults_and_normalisation():
    p = SamplingParams()
    assert p.stop == [] and p.stop_token_ids == [] and not p.is_greedy and not p.has_top_k and not p.has_penalties
    assert SamplingParams(stop="x").stop == ["x"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(temperature=0).is_greedy
    assert not SamplingParams(top_k=0).has_top_k and SamplingParams(top_k=3).has_top_k
    assert SamplingParams(presence_penalty=-2, frequency_penalty=2, logprobs=20, top_p=1.0, min_p=1.0).has_penalties


# ---- greedy, logprobs --------------------------------------------------------------------------------------------


def test_greedy_is_argmax_and_logprobs_are_raw():
    torch.manual_seed(0)
    logits = torch.randn(6, 11) * 3
    params = [SamplingParams(temperature=0, logprobs=3)] * 6
    out = sample(logits, SamplingBatch(params))
    assert torch.equal(out.token_ids, logits.argmax(-1))
    ref = torch.log_softmax(logits.double(), -1)
    assert torch.allclose(out.logprobs.double(), ref.gather(1, out.token_ids[:, None])[:, 0], atol=1e-5)
    assert out.top_token_ids.shape == (6, 3)
    assert torch.equal(out.top_token_ids, ref.argsort(-1, descending=True)[:, :3])
    assert torch.equal(out.top_token_ids[:, 0], out.token_ids)
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()


def test_logprobs_over_whole_vocab_sum_to_one_and_ignore_temperature():
    torch.manual_seed(1)
    logits = torch.randn(3, 7)
    params = [SamplingParams(temperature=0.3, top_k=2, logprobs=20), SamplingParams(logprobs=0), SamplingParams()]
    out = sample(logits, SamplingBatch(params, [torch.Generator().manual_seed(i) for i in range(3)]))
    assert out.top_logprobs.shape == (3, 7)  # capped at the vocab size
    assert torch.allclose(out.top_logprobs.exp().sum(-1), torch.ones(3), atol=1e-5)
    # Raw model logprobs: not affected by temperature or top-k.
    assert torch.allclose(out.top_logprobs[0], torch.log_softmax(logits[0], -1).sort(descending=True).values)
    assert sample(logits, SamplingBatch([SamplingParams(logprobs=0)] * 3)).top_token_ids is None


# ---- seeded draws ------------------------------------------------------------------------------------------------


def test_seeded_row_is_independent_of_batch_composition():
    torch.manual_seed(2)
    V = 40
    logits = torch.randn(5, V)
    params = [
        SamplingParams(temperature=0.8, top_p=0.9, seed=1),
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.3, top_k=5),
        SamplingParams(temperature=1.0, min_p=0.05, seed=7),
        SamplingParams(temperature=0.5),
    ]

    def gens(seed):  # generators advance when used: a fresh set per call
        return [torch.Generator().manual_seed(seed), None, torch.Generator().manual_seed(seed + 100), None, None]

    for seed in range(30):
        alone = sample(logits[:1], SamplingBatch(params[:1], [torch.Generator().manual_seed(seed)])).token_ids[0]
        batched = sample(logits, SamplingBatch(params, gens(seed))).token_ids[0]
        reordered = sample(logits.flip(0), SamplingBatch(params[::-1], gens(seed)[::-1])).token_ids[-1]
        assert alone == batched and alone == reordered


def test_seeds_reproduce_and_differ():
    logits = torch.zeros(1, 1000)  # uniform: two seeds colliding is unlikely
    params = [SamplingParams(seed=0)]
    def seeded(s):
        return SamplingBatch(params, [torch.Generator().manual_seed(s)])

    a = [int(sample(logits, seeded(s)).token_ids[0]) for s in range(20)]
    b = [int(sample(logits, seeded(s)).token_ids[0]) for s in range(20)]
    assert a == b and len(set(a)) > 15


# ---- truncation and temperature, statistically -------------------------------------------------------------------


def draw_many(probs: list[float], params: SamplingParams, n: int = 4000, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    logits = torch.tensor(probs).log()[None].expand(n, -1).contiguous()
    return sample(logits, SamplingBatch([params] * n)).token_ids


def frequencies(tokens: torch.Tensor, V: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=V).double() / len(tokens)


PROBS = [0.05, 0.3, 0.02, 0.5, 0.13]  # sorted order: 3, 1, 4, 0, 2


def expected(keep: list[int]) -> torch.Tensor:
    p = torch.zeros(len(PROBS), dtype=torch.double)
    p[keep] = torch.tensor([PROBS[i] for i in keep], dtype=torch.double)
    return p / p.sum()


@pytest.mark.parametrize(
    "params, keep",
    [
        (SamplingParams(top_k=2), [3, 1]),
        (SamplingParams(top_k=3), [3, 1, 4]),
        (SamplingParams(top_p=0.75), [3, 1]),  # 0.5 < 0.75 keeps rank 1; 0.8 >= 0.75 drops rank 2
        (SamplingParams(top_p=0.85), [3, 1, 4]),
        (SamplingParams(top_p=0.01), [3]),
        (SamplingParams(min_p=0.2), [3, 1, 4]),  # threshold 0.1
        (SamplingParams(min_p=0.5), [3, 1]),  # threshold 0.25
        (SamplingParams(top_k=4, top_p=0.9, min_p=0.2), [3, 1, 4]),
        (SamplingParams(), [0, 1, 2, 3, 4]),
    ],
)
def test_truncation_never_samples_masked_tokens(params, keep):
    tokens = draw_many(PROBS, params)
    freq = frequencies(tokens, len(PROBS))
    masked = [i for i in range(len(PROBS)) if i not in keep]
    assert freq[masked].sum() == 0
    # 4000 draws: 4 standard deviations of a frequency is at most 4 * 0.5 / sqrt(4000) < 0.032.
    assert torch.allclose(freq, expected(keep), atol=0.032)


def test_temperature_reshapes_distribution():
    for temp in (0.5, 2.0):
        freq = frequencies(draw_many(PROBS, SamplingParams(temperature=temp), seed=3), len(PROBS))
        target = torch.softmax(torch.tensor(PROBS, dtype=torch.double).log() / temp, -1)
        assert torch.allclose(freq, target, atol=0.032)


def test_seeded_draws_follow_the_distribution():
    logits = torch.tensor(PROBS).log()[None]
    params = [SamplingParams(top_k=3, seed=0)]
    tokens = torch.stack([sample(logits, SamplingBatch(params, [torch.Generator().manual_seed(s)])).token_ids[0]
                          for s in range(2000)])
    freq = frequencies(tokens, len(PROBS))
    assert freq[[0, 2]].sum() == 0
    assert torch.allclose(freq, expected([3, 1, 4]), atol=0.045)


def test_mixed_batch_rows_use_their_own_params():
    torch.manual_seed(4)
    n = 600
    logits = torch.tensor(PROBS).log()[None].expand(3 * n, -1)
    params = [SamplingParams(top_k=1)] * n + [SamplingParams(temperature=0)] * n + [SamplingParams(top_p=0.75)] * n
    tokens = sample(logits, SamplingBatch(params)).token_ids
    assert (tokens[: 2 * n] == 3).all()
    assert set(tokens[2 * n:].tolist()) == {1, 3}


# ---- penalties ---------------------------------------------------------------------------------------------------


def test_penalties_match_hand_computed_values():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0], [2.0, -1.0, 0.5, 3.0, -2.0]])
    p = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, [p, SamplingParams()], [[0], [0]], [[1, 1, 3], [1, 1, 3]])
    # token 0: in prompt only -> 2/2; token 1: output x2 -> -1*2 - 2*0.25 - 0.5; token 3: output x1 -> 3/2 - 0.25 - 0.5
    assert torch.allclose(out[0], torch.tensor([1.0, -3.0, 0.5, 0.75, -2.0]))
    assert torch.equal(out[1], logits[1])  # a row without penalties is untouched
    greedy = sample(logits[:1], SamplingBatch([SamplingParams(temperature=0, repetition_penalty=2.0,
                                                              presence_penalty=0.5, frequency_penalty=0.25,
                                                              logprobs=0)],
                                              None, [[0]], [[1, 1, 3]]))
    assert int(greedy.token_ids[0]) == 0  # 3 without penalties
    assert math.isclose(float(greedy.logprobs[0]), float(torch.log_softmax(logits[0], -1)[0]), rel_tol=1e-6)
    # without a row asking for logprobs, none are computed
    assert sample(logits[:1], SamplingBatch([SamplingParams(temperature=0)])).logprobs is None


def test_negative_presence_penalty_encourages_and_prompt_does_not_count():
    logits = torch.zeros(1, 4)
    out = apply_penalties(logits, [SamplingParams(presence_penalty=-1.0)], [[2]], [[1]])
    assert out.tolist() == [[0.0, 1.0, 0.0, 0.0]]


def test_sample_argument_errors():
    logits = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="logits"):
        sample(torch.zeros(4), SamplingBatch([SamplingParams()]))
    with pytest.raises(ValueError, match="SamplingParams"):
        sample(logits, SamplingBatch([SamplingParams()]))
    with pytest.raises(ValueError, match="generators"):
        sample(logits, SamplingBatch([SamplingParams()] * 2, [None]))
    with pytest.raises(ValueError, match="output_token_ids"):
        sample(logits, SamplingBatch([SamplingParams(presence_penalty=1.0)] * 2))
    with pytest.raises(ValueError, match="prompt_token_ids"):
        sample(logits, SamplingBatch([SamplingParams(repetition_penalty=1.2)] * 2, output_token_ids=[[], []]))


def test_allowed_mask_restricts_every_kind_of_row_and_logprobs_stay_raw():
    """A grammar's [B, V] mask: greedy, sampled and penalised rows only pick allowed tokens; logprobs are the raw
    model's (before the mask); a row allowing nothing and a mask of the wrong shape are clear errors."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(5))
    allowed = torch.zeros(3, 50, dtype=torch.bool)
    allowed[0, [3, 17]] = True
    allowed[1, 40:] = True
    allowed[2, logits[2].argmin()] = True  # the least likely token, forced
    params = [SamplingParams(temperature=0, logprobs=0), SamplingParams(temperature=1.5, top_p=0.95, logprobs=0),
              SamplingParams(temperature=0.7, presence_penalty=1.0, logprobs=0)]
    raw = torch.log_softmax(logits, -1)
    for seed in range(30):
        gens = [torch.Generator().manual_seed(seed + 100 * i) for i in range(3)]
        out = sample(logits, SamplingBatch(params, gens, [[1], [2], [3]], [[], [41], []], allowed=allowed))
        tokens = out.token_ids.tolist()
        assert tokens[0] == (3 if logits[0, 3] > logits[0, 17] else 17)
        assert 40 <= tokens[1] < 50
        assert tokens[2] == int(logits[2].argmin())
        assert torch.allclose(out.logprobs, raw.gather(1, out.token_ids[:, None])[:, 0])
    with pytest.raises(ValueError, match="row 1 allows no token"):
        sample(logits, SamplingBatch(params, allowed=allowed & torch.tensor([True, False, True])[:, None]))
    with pytest.raises(ValueError, match="allowed: expected a bool mask"):
        sample(logits, SamplingBatch(params, allowed=allowed[:, :10]))
