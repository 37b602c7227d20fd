"""Weights placed on transparent huge pages (ops/hugepages.py): same model, same outputs, memory advised for 2 MiB
pages, the switch, and what must stay untouched."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from qwen3next.checkpoint import load_model, save_model
from qwen3next.engine.llm import Engine
from qwen3next.engine.sampling import SamplingParams
from qwen3next.ops import dispatch, hugepages
from qwen3next.ops.hugepages import MIN_BYTES, is_placed, leave_weights, place_weights
from qwen3next.quant import quantize_model
from qwen3next.tokenizer import Tokenizer
from tiny_models import make_model, write_byte_tokenizer

needs_thp = pytest.mark.skipif(not hugepages.supported(), reason="no transparent huge pages on this system")


def vm_flags(ptr: int) -> set[str]:
    """The VmFlags of the mapping of this process holding address `ptr` (/proc/self/smaps)."""
    inside, flags = False, None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= ptr < hi
            elif inside and line.startswith("VmFlags:"):
                flags = set(line.split()[1:])
    assert flags is not None, f"no mapping holds {ptr:#x}"
    return flags


def logits(model, ids):
    with torch.no_grad():
        return model(ids).float()


@needs_thp
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_placed_model_is_the_same_model(bits):
    model = make_model("base", seed=3)
    if bits is not None:
        quantize_model(model, bits, group_size=16)
    ids = torch.tensor([[5, 17, 3, 88, 41, 2, 9]])
    before = logits(model, ids)
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    moved = place_weights(model)
    assert moved > 0
    after = dict(model.named_parameters())
    assert all(after[n] is p for n, p in params.items())  # the same Parameter objects
    big = {n: t for n, t in model.state_dict().items() if t.nbytes >= MIN_BYTES}
    assert big and all(is_placed(t) for t in big.values())
    assert not any(is_placed(t) for t in model.state_dict().values() if t.nbytes < MIN_BYTES)
    for name, t in model.state_dict().items():  # same values, dtypes, shapes and strides
        assert t.dtype == state[name].dtype and t.stride() == state[name].stride(), name
        assert torch.equal(t, state[name]), name
    assert torch.equal(logits(model, ids), before)
    for t in big.values():
        assert "hg" in vm_flags(t.data_ptr())  # advised MADV_HUGEPAGE
        assert t.data_ptr() % hugepages.ALIGN == 0
    assert place_weights(model) == 0  # idempotent


@needs_thp
def test_tied_weights_stay_tied_and_saving_still_works(tmp_path):
    model = make_model("base", seed=1, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    place_weights(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight and is_placed(model.lm_head.weight)
    with torch.no_grad():  # one storage for both: a write through one is seen through the other
        model.model.embed_tokens.weight[0, 0] = 123.0
    assert model.lm_head.weight[0, 0].item() == 123.0
    save_model(model, tmp_path)  # safetensors refuses tensors that share memory: each placed one has its own storage
    loaded = load_model(tmp_path)
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, model.state_dict()[name]), name


@needs_thp
def test_views_sharing_a_storage_are_left_alone():
    model = make_model("base", seed=2)
    whole = torch.randn(64, 64)
    model.register_buffer("view_a", whole[:32], persistent=False)  # two tensors on one storage
    model.register_buffer("view_b", whole[32:], persistent=False)
    place_weights(model)
    assert not is_placed(model.view_a) and not is_placed(model.view_b)
    assert model.view_a.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
    assert is_placed(model.lm_head.weight)


def test_switch_off_and_the_twin_leave_weights_where_they_are():
    model = make_model("base", seed=4)
    ptrs = {n: t.data_ptr() for n, t in model.state_dict().items()}
    previous = dispatch.set_hugepages(False)
    try:
        assert place_weights(model) == 0
        assert not dispatch.enabled("hugepage_weights")
    finally:
        dispatch.set_hugepages(previous)
    assert leave_weights(model) == 0
    assert {n: t.data_ptr() for n, t in model.state_dict().items()} == ptrs


def _status_mib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1]) // 1024


@needs_thp
def test_peak_memory_is_the_model_plus_about_one_tensor():
    """Each tensor is dropped once its copy is in place: placing 10 tensors of 40 MiB raises the peak resident size
    by about one of them (with a margin for what other threads of the session allocate meanwhile), not by all ten.
    The tensors are above glibc's largest mmap threshold, 32 MiB, so that a freed one goes back to the system
    whatever the process allocated before."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets this process's peak resident size (VmHWM)
    except OSError:
        pytest.skip("this kernel cannot reset the peak resident size")
    module = torch.nn.Module()
    for i in range(5):
        module.register_buffer(f"b{i}", torch.ones(10 << 20))  # 40 MiB each
        module.register_parameter(f"p{i}", torch.nn.Parameter(torch.ones(10 << 20)))
    before = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    assert place_weights(module) >= 400 << 20
    assert _status_mib("VmHWM") - before < 160  # the whole copy at once would be +400 MiB
    assert all(bool((t == 1).all()) and is_placed(t) for t in [*module.parameters(), *module.buffers()])


@needs_thp
def test_the_mapping_lives_as_long_as_its_tensors():
    model = make_model("base", seed=5)
    place_weights(model)
    arenas = [a for a in hugepages._arenas if a.base <= model.lm_head.weight.data_ptr() < a.base + len(a)]
    assert len(arenas) == 1
    ref = weakref.ref(arenas[0])
    del arenas
    gc.collect()
    assert ref() is not None
    del model
    gc.collect()
    assert ref() is None  # unmapped with the model's last tensor


@needs_thp
def test_the_engine_places_the_weights_and_generates_the_same_tokens(tmp_path):
    write_byte_tokenizer(tmp_path)
    tokenizer = Tokenizer.from_dir(tmp_path)
    prompts = [[5, 17, 3, 88], [41, 2, 9, 60, 7, 7, 13]]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    def run(model):
        engine = Engine(model, tokenizer=tokenizer, max_memory="16MiB", max_num_seqs=2, max_model_len=64)
        reqs = [engine.add_request(p, greedy) for p in prompts]
        while engine.step():
            pass
        return engine, [r.output().token_ids for r in reqs]

    previous = dispatch.set_hugepages(False)
    try:
        plain, want = run(make_model("base", seed=6, vocab_size=300))
        assert not is_placed(plain.runner.model.lm_head.weight)
    finally:
        dispatch.set_hugepages(previous)
    placed, got = run(make_model("base", seed=6, vocab_size=300))
    assert is_placed(placed.runner.model.lm_head.weight)
    assert got == want and len(got[0]) == 6
