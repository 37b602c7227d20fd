"""One-shot accelerator check (run on a GPU machine: `python scripts/device_check.py --device cuda`).

Compares the CUDA paths against CPU fp32 on tiny random models (full forward, padded batches, cache continuation,
MoE, both delta-rule forms), runs the engine greedy on the device against the plain loop, checks bf16 drift, and
times the `small` preset. Prints one line per check; exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwen3next.engine.llm import Engine  # noqa: E402
from qwen3next.engine.sampling import SamplingParams  # noqa: E402
from qwen3next.model.generate import generate_tokens  # noqa: E402
from qwen3next.tokenizer import Tokenizer  # noqa: E402
from tiny_models import make_model, write_byte_tokenizer  # noqa: E402

FAILED: list[str] = []


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILED.append(name)


@torch.no_grad()
def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--skip-timing", action="store_true")
    args = ap.parse_args()
    dev = torch.device(args.device)
    print(f"torch {torch.__version__}, device {dev}"
          + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""), flush=True)
    gen = torch.Generator().manual_seed(0)
    for name in ("base", "mlp_only", "yarn"):
        cpu = make_model(name)
        gpu = make_model(name).to(dev)
        ids = torch.randint(0, cpu.config.vocab_size, (2, 130), generator=gen)
        err = (cpu(ids) - gpu(ids.to(dev)).cpu()).abs().max().item()
        check(f"{name} fp32 full forward cpu vs {dev.type}", err < 1e-3, f"max |dlogits| {err:.2e}")
    cpu, gpu = make_model("base"), make_model("base").to(dev)
    ids = torch.randint(0, cpu.config.vocab_size, (3, 100), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :40] = 0
    mask[2, 70:] = 0
    err = (cpu(ids, attention_mask=mask) - gpu(ids.to(dev), attention_mask=mask.to(dev)).cpu()).abs().max().item()
    check("padded batch cpu vs device", err < 1e-3, f"max |dlogits| {err:.2e}")
    full = gpu(ids.to(dev))
    cache = gpu.new_cache(3, 128)
    parts = [gpu(ids[:, :37].to(dev), cache), gpu(ids[:, 37:90].to(dev), cache)]
    parts += [gpu(ids[:, t:t + 1].to(dev), cache) for t in range(90, 100)]
    err = (torch.cat(parts, 1) - full).abs().max().item()
    check("cache continuation on device", err < 1e-3, f"max |dlogits| {err:.2e}")
    bf = make_model("base").to(dev, torch.bfloat16)
    ref = cpu(ids)
    out = bf(ids.to(dev)).float().cpu()
    rel = ((out - ref).abs().mean() / ref.abs().mean()).item()
    check("bf16 on device vs fp32 cpu", rel < 0.08, f"mean relative error {rel:.3f}")

    # engine on the device, greedy vs the plain loop
    with tempfile.TemporaryDirectory() as d:
        write_byte_tokenizer(d)
        tok = Tokenizer.from_dir(d)
        model = make_model("base", vocab_size=261).to(dev)
        engine = Engine(model, tokenizer=tok, max_memory="256MiB", max_model_len=512, prefill_chunk_size=32)
        prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 120, 33)]
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        reqs = [engine.add_request(p, params) for p in prompts]
        while engine.step():
            pass
        same = all(r.output().token_ids == list(generate_tokens(model, p, 16)) for p, r in zip(prompts, reqs))
        check("engine greedy on device == plain loop", same, f"{len(prompts)} prompts")
        seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=7, ignore_eos=True)
        a = engine.add_request(prompts[1], seeded)
        engine.add_request(prompts[0], SamplingParams(temperature=0.5, max_tokens=9, ignore_eos=True))
        while engine.step():
            pass
        b = engine.add_request(prompts[1], seeded)
        while engine.step():
            pass
        check("seeded sampling on device is batch independent", a.output().token_ids == b.output().token_ids,
              str(a.output().token_ids))

    if not args.skip_timing and dev.type == "cuda":
        from qwen3next import Qwen3NextForCausalLM
        from qwen3next.train.presets import preset_config

        for dtype in (torch.bfloat16,):
            m = Qwen3NextForCausalLM(preset_config("small"))
            m.init_weights(torch.Generator().manual_seed(0))
            m = m.to(dev, dtype).eval()
            for B in (1, 8):
                cache = m.new_cache(B, 4200)
                prompt = torch.randint(0, 32000, (B, 4096), device=dev)
                torch.cuda.synchronize()
                t = time.perf_counter()
                m(prompt, cache)
                torch.cuda.synchronize()
                pre = time.perf_counter() - t
                tok = torch.randint(0, 32000, (B, 1), device=dev)
                for _ in range(3):
                    m(tok, cache)
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(20):
                    m(tok, cache)
                torch.cuda.synchronize()
                step = (time.perf_counter() - t) / 20
                print(f"time small {dtype} B={B}: prefill 4096 {B * 4096 / pre:,.0f} tok/s; decode {step * 1e3:.1f} "
                      f"ms/step ({B / step:,.0f} tok/s)", flush=True)
    print("FAILED: " + ", ".join(FAILED) if FAILED else "all device checks passed", flush=True)
    return 1 if FAILED else 0


if __name__ == "__main__":
    raise SystemExit(main())
