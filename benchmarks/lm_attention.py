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

Both sides' models are built first; each part then runs on the SDPA side and the srl side back to
back (speculative parts first), and the JSON is rewritten after each part.

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
    torch.manual_seed(1)  # the same inputs on both sides
    model = copy.deepcopy(model).train()
    x = torch.randint(0, POLICY["vocab_size"], (B, T), device="cuda")

    def step():
        model.zero_grad(set_to_none=True)
        model(x).float().square().mean().backward()
    return _median_ms(step, reps)


@torch.inference_mode()
def bench_prefill(model, B: int, T: int, reps: int) -> float:
    torch.manual_seed(2)
    cache = cache_for(model, B, T + 64, "cuda", torch.bfloat16)
    prompt = torch.randint(0, POLICY["vocab_size"], (B, T), device="cuda")
    return _median_ms(lambda: prefill(model, cache, prompt), reps)


def bench_spec(target, draft, B: int, k: int, L: int, new: int, reps: int) -> dict:
    torch.manual_seed(3)
    sampler = SpeculativeSampler(target, draft, B, 64 + new + (k + 2) * L + 8, k=k, draft_len=L)
    prompt = torch.randint(0, POLICY["vocab_size"], (B, 32), device="cuda")
    sampler.generate(prompt, new)
    runs = [sampler.generate(prompt, new) for _ in range(reps)]
    sampler.close()
    per_iter = [r.seconds / r.stats["iterations"] for r in runs]
    return {"ms_per_iteration": 1e3 * float(np.median(per_iter)),
            "tokens_per_s": float(np.median([B * new / r.seconds for r in runs])),
            "tokens_per_pass": float(np.median([r.stats["tokens_per_pass"] for r in runs]))}


def _ms(row: dict) -> float:
    return row.get("ms", row.get("ms_per_iteration"))


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
    tb, tt = map(int, args.train.split("x"))
    pb, pt = map(int, args.prefill.split("x"))
    pairs = {"sdpa": _pair(False), "srl": _pair(True)}
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "settings": vars(args), "rows": []}

    def both(part: str, fn, **key) -> None:
        """One part on both sides back to back (so a cut run keeps whole comparisons); JSON rewritten."""
        got = {}
        for side, (target, draft) in pairs.items():
            got[side] = {"part": part, "side": side, **key, **fn(target, draft)}
            result["rows"].append(got[side])
            print(json.dumps(got[side]), flush=True)
        print(f"{part} {key}: SDPA {_ms(got['sdpa']):.3f} ms  srl {_ms(got['srl']):.3f} ms  "
              f"SDPA / srl {_ms(got['sdpa']) / _ms(got['srl']):.3f}", flush=True)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=1)

    for B in args.spec_batches:
        for k in args.ks:
            both("spec", lambda t, d: bench_spec(t, d, B, k, args.draft_len, args.new_tokens, args.reps),
                 B=B, k=k, L=args.draft_len)
    both("prefill", lambda t, d: {"ms": bench_prefill(t, pb, pt, args.reps)}, B=pb, T=pt)
    both("train", lambda t, d: {"ms": bench_train(t, tb, tt, args.reps)}, B=tb, T=tt)


if __name__ == "__main__":
    main()
