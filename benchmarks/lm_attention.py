"""The LM with its attention on srl's FlashAttention against the same LM on torch's SDPA.

``LMConfig.kernels`` switches every dense attention call of ``TransformerLM`` (the causal training
forward and backward, prefill and decode over the KV cache with per-row lengths, and the
speculative tree verification); both sides run the same random-weight bf16 models in the same
process (the 123.6M policy and 10.5M draft of ``benchmarks/generation.py``).

- ``train``: forward + backward of a causal batch (tokens/s);
- ``prefill``: a batch of prompts into the cache (ms);
- ``spec``: speculative generation (standard k = 1 and SpecTr k = 4, CUDA graphs); random models
  accept few drafts, and the sampled tokens can differ between the sides, so the comparison is
  the time per iteration (one draft block, one tree pass, selection), with tokens/s beside it.

    python benchmarks/lm_attention.py --json lm_attention.json
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch

from srl.generation.decode import cache_for, prefill
from srl.generation.speculative import SpeculativeSampler
from srl.policies.lm import LMConfig, TransformerLM

POLICY = dict(vocab_size=50304, d_model=768, n_layers=12, n_heads=12, max_seq_len=1024)
DRAFT = dict(vocab_size=50304, d_model=192, n_layers=2, n_heads=3, max_seq_len=1024)


def _pair(kernels: bool):
    torch.manual_seed(0)
    models = [TransformerLM(LMConfig(**cfg, kernels=kernels)).cuda().to(torch.bfloat16).eval()
              for cfg in (POLICY, DRAFT)]
    return models


def _median_ms(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def bench_train(model, B: int, T: int, reps: int) -> float:
    model = copy.deepcopy(model).train()
    x = torch.randint(0, POLICY["vocab_size"], (B, T), device="cuda")

    def step():
        model.zero_grad(set_to_none=True)
        model(x).float().square().mean().backward()
    return _median_ms(step, reps)


@torch.inference_mode()
def bench_prefill(model, B: int, T: int, reps: int) -> float:
    cache = cache_for(model, B, T + 64, "cuda", torch.bfloat16)
    prompt = torch.randint(0, POLICY["vocab_size"], (B, T), device="cuda")
    return _median_ms(lambda: prefill(model, cache, prompt), reps)


def bench_spec(target, draft, B: int, k: int, L: int, new: int, reps: int) -> dict:
    sampler = SpeculativeSampler(target, draft, B, 64 + new + (k + 2) * L + 8, k=k, draft_len=L)
    prompt = torch.randint(0, POLICY["vocab_size"], (B, 32), device="cuda")
    sampler.generate(prompt, new)
    runs = [sampler.generate(prompt, new) for _ in range(reps)]
    sampler.close()
    per_iter = [r.seconds / r.stats["iterations"] for r in runs]
    return {"ms_per_iteration": 1e3 * float(np.median(per_iter)),
            "tokens_per_s": float(np.median([B * new / r.seconds for r in runs])),
            "tokens_per_pass": float(np.median([r.stats["tokens_per_pass"] for r in runs]))}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--train", default="16x512", help="BxT")
    p.add_argument("--prefill", default="16x512", help="BxT")
    p.add_argument("--spec-batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--ks", type=int, nargs="+", default=[1, 4])
    p.add_argument("--draft-len", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = []
    tb, tt = map(int, args.train.split("x"))
    pb, pt = map(int, args.prefill.split("x"))
    for kernels in (False, True):
        target, draft = _pair(kernels)
        side = "srl" if kernels else "sdpa"
        rows.append({"part": "train", "side": side, "B": tb, "T": tt, "ms": bench_train(target, tb, tt, args.reps)})
        rows.append({"part": "prefill", "side": side, "B": pb, "T": pt, "ms": bench_prefill(target, pb, pt, args.reps)})
        for B in args.spec_batches:
            for k in args.ks:
                r = bench_spec(target, draft, B, k, args.draft_len, args.new_tokens, args.reps)
                rows.append({"part": "spec", "side": side, "B": B, "k": k, "L": args.draft_len, **r})
        for r in rows[-2 - len(args.spec_batches) * len(args.ks):]:
            print(json.dumps(r), flush=True)
        del target, draft
        torch.cuda.empty_cache()
    key = lambda r: (r["part"], r["B"], r.get("k"))  # noqa: E731
    print(f"{'part':<8} {'B':>3} {'k':>2} {'SDPA ms':>9} {'srl ms':>9} {'SDPA / srl':>10}")
    for a in rows:
        if a["side"] != "sdpa":
            continue
        b = next(r for r in rows if r["side"] == "srl" and key(r) == key(a))
        ms_a, ms_b = a.get("ms", a.get("ms_per_iteration")), b.get("ms", b.get("ms_per_iteration"))
        print(f"{a['part']:<8} {a['B']:>3} {str(a.get('k', '-')):>2} {ms_a:>9.3f} {ms_b:>9.3f} {ms_a / ms_b:>10.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": __import__("triton").__version__, "settings": vars(args), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
