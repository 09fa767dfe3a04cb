"""The LM with its attention on srl's FlashAttention against the same LM on torch's SDPA.

``LMConfig.kernels`` switches every dense attention call of ``TransformerLM`` (the causal training
forward and backward, prefill and decode over the KV cache with per-row lengths, and the
speculative tree verification); both sides run the same random-weight bf16 models in the same
process (the 123.6M policy and 10.5M draft of ``benchmarks/generation.py``).

- ``train``: forward + backward of a causal batch (tokens/s);
- ``prefill``: a batch of prompts into the cache (ms), before any speculative sampler ran and again
  after them (``prefill_after_spec``: the third run measured prefill only there, at 0.64x);
- ``spec_paired``: speculative generation (standard k = 1 and SpecTr k = 4, CUDA graphs), both
  sides' samplers built and their generate calls interleaved; random models accept few drafts, and
  the sampled tokens can differ between the sides, so the comparison is the time per iteration
  (one draft block, one tree pass, selection): the median of the per-pair ratios;
- ``prefill_paired`` (and ``_after_spec``): prefill interleaved the same way.

Every timed loop follows ``BURN_S`` seconds of back-to-back calls.

Both sides' models are built first; each part then runs on the SDPA side and the srl side back to
back, and the JSON is rewritten after each part.

    python benchmarks/lm_attention.py --json lm_attention.json
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import time

import numpy as np
import torch

from bare_imports import bare_packages  # noqa: E402 - benchmarks/ is on sys.path when run

bare_packages("srl.envs", "srl.policies")  # the GPU image has no gymnasium
from srl.generation.decode import cache_for, prefill, tree_slot_mask  # noqa: E402
from srl.generation.speculative import SpeculativeSampler  # noqa: E402
from srl.policies.lm import LMConfig, TransformerLM  # noqa: E402

POLICY = dict(vocab_size=50304, d_model=768, n_layers=12, n_heads=12, max_seq_len=1024)
DRAFT = dict(vocab_size=50304, d_model=192, n_layers=2, n_heads=3, max_seq_len=1024)
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: --tiny, a logic check of this script
DTYPE = torch.bfloat16


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def _pair(kernels: bool):
    torch.manual_seed(0)
    with torch.device(DEV):  # initialised on the GPU: seconds faster than on the host
        return [TransformerLM(LMConfig(**cfg, kernels=kernels)).to(DTYPE).eval() for cfg in (POLICY, DRAFT)]


BURN_S = 0.3
"""Seconds of back-to-back calls before each timed loop: in a fresh H200 process the first ~0.1-0.3 s
after an idle stretch (a kernel compiling) ran slower (lm_prefill_probe_h200_roundA.json)."""


def _burn(fn, seconds: float) -> None:
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        fn()
    _sync()


def _median_ms(fn, reps: int) -> float:
    fn()
    _burn(fn, BURN_S)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def bench_train(model, B: int, T: int, reps: int) -> float:
    torch.manual_seed(1)  # the same inputs on both sides
    model = copy.deepcopy(model).train()
    x = torch.randint(0, POLICY["vocab_size"], (B, T), device=DEV)

    def step():
        model.zero_grad(set_to_none=True)
        model(x).float().square().mean().backward()
    return _median_ms(step, reps)


def _timed_s(fn) -> float:
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


def gpu_state() -> str:
    """SM and memory clocks, power, temperature and throttle reasons now (nvidia-smi), or ''."""
    import subprocess

    q = "clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


@torch.inference_mode()
def bench_prefill(model, B: int, T: int, reps: int, burn_s: float = 0.0) -> dict:
    """Median ms per prefill (call to synchronize), and the median host time until the call
    returns (``enqueue_ms``: close to ``ms`` when the host, not the GPU, sets the pace).
    ``burn_s``: prefill back to back this long first (a slow state that passes shows here)."""
    torch.manual_seed(2)
    cache = cache_for(model, B, T + 64, DEV, DTYPE)
    prompt = torch.randint(0, POLICY["vocab_size"], (B, T), device=DEV)
    fn = lambda: prefill(model, cache, prompt)  # noqa: E731
    fn()
    _burn(fn, burn_s)
    enqueue = []
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        fn()
        enqueue.append(time.perf_counter() - t0)
    ms = 1e3 * float(np.median([_timed_s(fn) for _ in range(reps)]))
    return {"ms": ms, "enqueue_ms": 1e3 * float(np.median(enqueue)), "burn_s": burn_s,
            "gpu": gpu_state() if DEV == "cuda" else ""}


def bench_spec(target, draft, B: int, k: int, L: int, new: int, reps: int) -> dict:
    torch.manual_seed(3)
    sampler = SpeculativeSampler(target, draft, B, 64 + new + (k + 2) * L + 8, k=k, draft_len=L)
    prompt = torch.randint(0, POLICY["vocab_size"], (B, 32), device=DEV)
    sampler.generate(prompt, new)
    _burn(lambda: sampler.generate(prompt, new), BURN_S)
    runs = [sampler.generate(prompt, new) for _ in range(reps)]
    sampler.close()
    per_iter = [r.seconds / r.stats["iterations"] for r in runs]
    return {"ms_per_iteration": 1e3 * float(np.median(per_iter)),
            "tokens_per_s": float(np.median([B * new / r.seconds for r in runs])),
            "tokens_per_pass": float(np.median([r.stats["tokens_per_pass"] for r in runs]))}


def interleaved(fns: dict, reps: int) -> dict:
    """Each side's call timed alternately (A B A B ...), ``reps`` times each after ``BURN_S`` of
    calls per side: a GPU state that comes and goes (clocks) hits both sides alike. Returns the
    per-side median seconds and the median of the per-pair ratios (first side / second side)."""
    for fn in fns.values():
        fn()
        _burn(fn, BURN_S)
    times: dict = {side: [] for side in fns}
    for _ in range(reps):
        for side, fn in fns.items():
            times[side].append(_timed_s(fn))
    a, b = times.values()
    return {"median_s": {side: float(np.median(t)) for side, t in times.items()},
            "ratio": float(np.median([x / y for x, y in zip(a, b)])), "all_s": times}


@torch.inference_mode()
def prefill_paired(pairs: dict, B: int, T: int, reps: int) -> dict:
    """Prefill on both sides interleaved: SDPA ms, srl ms, and the median ratio SDPA / srl."""
    fns = {}
    for side, (model, _) in pairs.items():
        torch.manual_seed(2)
        cache = cache_for(model, B, T + 64, DEV, DTYPE)
        prompt = torch.randint(0, POLICY["vocab_size"], (B, T), device=DEV)
        fns[side] = (lambda m, c, x: lambda: prefill(m, c, x))(model, cache, prompt)
    got = interleaved(fns, reps)
    return {f"{side}_ms": 1e3 * t for side, t in got["median_s"].items()} | {"sdpa_over_srl": got["ratio"]}


def spec_paired(pairs: dict, B: int, k: int, L: int, new: int, reps: int) -> dict:
    """Speculative generation on both sides interleaved (a generate call each, in turn): ms per
    iteration per side and the median ratio SDPA / srl of the per-iteration times."""
    samplers, runs = {}, {}
    prompt = None
    for side, (target, draft) in pairs.items():
        torch.manual_seed(3)
        samplers[side] = SpeculativeSampler(target, draft, B, 64 + new + (k + 2) * L + 8, k=k, draft_len=L)
        prompt = torch.randint(0, POLICY["vocab_size"], (B, 32), device=DEV)
    fns = {side: (lambda smp: lambda: runs.setdefault(smp, []).append(smp.generate(prompt, new)))(smp)
           for side, smp in samplers.items()}
    interleaved(fns, reps)
    out = {}
    per_iter = {}
    for side, smp in samplers.items():
        timed = runs[smp][-reps:]
        per_iter[side] = [r.seconds / r.stats["iterations"] for r in timed]
        out[f"{side}_ms_per_iteration"] = 1e3 * float(np.median(per_iter[side]))
        out[f"{side}_tokens_per_pass"] = float(np.median([r.stats["tokens_per_pass"] for r in timed]))
        smp.close()
    out["sdpa_over_srl"] = float(np.median([a / b for a, b in zip(per_iter["sdpa"], per_iter["srl"])]))
    return out


@torch.inference_mode()
def check_logits(pairs: dict, B: int = 4, T: int = 64, P: int = 32, k: int = 4, L: int = 5) -> dict:
    """Relative error of the srl side's policy logits against the SDPA side's (same weights, same
    inputs): a causal forward of T tokens, and a tree pass over per-row cache lengths after a
    prefill of P tokens (shapes that share the kernels the timed parts compile)."""
    torch.manual_seed(4)
    target = pairs["sdpa"][0]
    dev, dtype, vocab = target.head.weight.device, target.head.weight.dtype, target.config.vocab_size
    x = torch.randint(0, vocab, (B, T), device=dev)
    drop = torch.arange(B, device=dev) * 3  # rows at different cache lengths
    logits = {}
    for side, (target, _) in pairs.items():
        cache = cache_for(target, B, 128, dev, dtype)
        prefill(target, cache, x[:, :P])
        cache.lens -= drop
        slots, positions, mask = tree_slot_mask(cache.lens, k, L, cache.max_len)
        tin = torch.cat([x.gather(1, cache.lens[:, None]), x[:, P:P + k * L]], 1)
        logits[side] = {"causal": target(x).float(),
                        "tree": target(tin, cache, positions=positions, slots=slots, mask=mask).float()}
    return {part: float((logits["srl"][part] - want).norm() / want.norm())
            for part, want in logits["sdpa"].items()}


def _ms(row: dict) -> float:
    return row.get("ms", row.get("ms_per_iteration"))


def main() -> None:
    global BURN_S, DTYPE
    p = argparse.ArgumentParser()
    p.add_argument("--train", default="16x512", help="BxT")
    p.add_argument("--prefill", default="16x512", help="BxT")
    p.add_argument("--spec-batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--ks", type=int, nargs="+", default=[1, 4])
    p.add_argument("--draft-len", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", default=None)
    p.add_argument("--burn-s", type=float, default=BURN_S, help="back-to-back calls before each timed loop (s)")
    p.add_argument("--profile", action="store_true",
                   help="after the speculative parts, one profiled prefill per side (kernels, GPU busy time)")
    p.add_argument("--tree-on-decode", action="store_true",
                   help="then the speculative parts again with srl's tree pass on the split-KV decode kernel")
    p.add_argument("--tiny", action="store_true", help="small float32 models on the CPU (logic check)")
    args = p.parse_args()
    if args.tiny:
        DTYPE = torch.float32
        for cfg in (POLICY, DRAFT):
            cfg.update(vocab_size=512, d_model=128, n_layers=2, n_heads=2, max_seq_len=256)
    tb, tt = map(int, args.train.split("x"))
    pb, pt = map(int, args.prefill.split("x"))
    pairs = {"sdpa": _pair(False), "srl": _pair(True)}
    result = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu", "torch": torch.__version__,
              "triton": __import__("triton").__version__, "settings": vars(args), "rows": []}

    def both(part: str, fn, sides=("sdpa", "srl"), **key) -> None:
        """One part on both sides back to back (so a cut run keeps whole comparisons); JSON rewritten."""
        for side in sides:
            row = {"part": part, "side": side, **key}
            try:
                row.update(fn(*pairs[side.split("_")[0]]))
            except Exception as exc:  # noqa: BLE001 - recorded; the other parts still run
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
        sdpa = next(r for r in result["rows"] if r["side"] == "sdpa" and r["part"] == part
                    and all(r[n] == v for n, v in key.items()))
        if _ms(sdpa) and _ms(row):
            print(f"{part} {key}: SDPA {_ms(sdpa):.3f} ms  {side} {_ms(row):.3f} ms  "
                  f"SDPA / {side} {_ms(sdpa) / _ms(row):.3f}", flush=True)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=1)

    try:
        result["logits_rel_err"] = check_logits(pairs)  # the kernels' answers, before their times
    except Exception as exc:  # noqa: BLE001
        result["logits_rel_err"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    print("srl vs SDPA logits, relative error:", json.dumps(result["logits_rel_err"]), flush=True)
    BURN_S = args.burn_s

    def prefill_part(rnd: int):  # round 0 timed right away, round 1 after 0.5 s of back-to-back prefills
        return lambda t, d: bench_prefill(t, pb, pt, args.reps, burn_s=0.5 * rnd)
    def paired(part: str, fn, **key) -> None:
        """Both sides interleaved call by call (one row with both sides' times and the ratio)."""
        row = {"part": part, "side": "paired", **key}
        try:
            row.update(fn())
        except Exception as exc:  # noqa: BLE001 - recorded; the other parts still run
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=1)

    for rnd in range(2):  # before any speculative sampler ran; sides alternated twice
        both("prefill", prefill_part(rnd), B=pb, T=pt, round=rnd)
    paired("prefill_paired", lambda: prefill_paired(pairs, pb, pt, 2 * args.reps), B=pb, T=pt)
    for B in args.spec_batches:
        for k in args.ks:
            paired("spec_paired", lambda: spec_paired(pairs, B, k, args.draft_len, args.new_tokens, args.reps + 2),
                   B=B, k=k, L=args.draft_len)
    for rnd in range(2):  # the order of the third run: after the speculative parts; then after 0.5 s of prefills
        both("prefill_after_spec", prefill_part(rnd), B=pb, T=pt, round=rnd)
    paired("prefill_paired_after_spec", lambda: prefill_paired(pairs, pb, pt, 2 * args.reps), B=pb, T=pt)
    if args.profile:
        from lm_prefill_probe import part_profile  # noqa: E402 - same folder
        part_profile({side: pair for side, pair in pairs.items()}, pb, pt, result["rows"], lambda: None)
    both("train", lambda t, d: {"ms": bench_train(t, tb, tt, args.reps)}, B=tb, T=tt)
    if args.tree_on_decode:
        importlib.import_module("srl.kernels.flash_attention")._DECODE_STARTS = True
        for B in args.spec_batches:
            for k in args.ks:
                paired("spec_paired_tree_on_decode",
                       lambda: spec_paired(pairs, B, k, args.draft_len, args.new_tokens, args.reps + 2),
                       B=B, k=k, L=args.draft_len)


if __name__ == "__main__":
    main()
