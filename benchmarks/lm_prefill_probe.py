"""Where the LM's prefill time goes on srl's kernels against SDPA (``benchmarks/lm_attention.py``'s
prefill part, taken apart).

- ``prefill``: the whole prefill (16 prompts of 512 tokens into the cache of the 123.6M policy),
  SDPA side and srl side alternated (so a drift shows), host time and CUDA-event time per call;
  then the srl side under variants of the call (tiles, the output layout, int32 lengths);
- ``profile``: the kernels and host calls of a few prefills per side (torch.profiler): which
  kernels run, how long, and any host synchronisation;
- ``attention``: layer 0's attention call alone, on the inputs the prefill hands it (the LM's
  strided q, the cache's k and v, int64 ``kv_lens``), per tile and against SDPA with the
  additive mask (the LM's SDPA side) and with ``is_causal``;
- ``after_spec``: the srl prefill again after a speculative sampler has run (the order of
  ``lm_attention.py`` since its third run).

The JSON is rewritten after each part, so a cut run keeps what it measured.

    python benchmarks/lm_prefill_probe.py --json prefill_probe.json
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from lm_attention import DRAFT, POLICY  # noqa: E402 - benchmarks/ is on sys.path when run
from srl.generation.decode import cache_for, prefill  # noqa: E402
import srl.policies.lm as lm  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a logic check through the interpreter

fa = importlib.import_module("srl.kernels.flash_attention")
common = importlib.import_module("srl.kernels._flash_common")

VARIANTS = {  # name -> patches of flash_attention's module globals
    "default": {},
    "tile_128x64_w8s4": {"_CACHED_FWD_TILES": {}},  # the training tile (runs 1 and 3)
    "tile_128x128_w8s3": {"_CACHED_FWD_TILES": {64: fa._tiles(128, 128, 8, 3)}},
    "tile_64x128_w4s3": {"_CACHED_FWD_TILES": {64: fa._tiles(64, 128, 4, 3)}},
    "tile_128x64_w4s3": {"_CACHED_FWD_TILES": {64: fa._tiles(128, 64, 4, 3)}},
    "o_contiguous": {"empty_like_heads": lambda t: torch.empty(t.shape, device=t.device, dtype=t.dtype)},
    "lens_int32": {"check_index": lambda name, t, shape, q: common.check_index(name, t, shape, q).int()},
}
VARIANTS["run1_like"] = {**VARIANTS["tile_128x64_w8s4"], **VARIANTS["o_contiguous"], **VARIANTS["lens_int32"]}


def make_pairs(tiny: bool) -> dict:
    """Both sides' (policy, draft), the same weights; ``tiny``: small float32 models for a CPU check."""
    sizes = [dict(c, d_model=128, n_layers=2, n_heads=2, vocab_size=512) for c in (POLICY, DRAFT)] if tiny \
        else [POLICY, DRAFT]
    dtype = torch.float32 if tiny else torch.bfloat16
    pairs = {}
    for side, kernels in (("sdpa", False), ("srl", True)):
        torch.manual_seed(0)
        with torch.device(DEV):
            pairs[side] = [lm.TransformerLM(lm.LMConfig(**c, kernels=kernels)).to(dtype).eval() for c in sizes]
    if DEV == "cpu":  # the kernels' path on the CPU: the Triton interpreter
        lm._kernels_apply = lambda q: q.dtype == torch.float32
    return pairs


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def patched(names: dict):
    old = {n: getattr(fa, n) for n in names}
    try:
        for n, v in names.items():
            setattr(fa, n, v)
        yield
    finally:
        for n, v in old.items():
            setattr(fa, n, v)


def compiled() -> int | None:
    """Compiled variants of the forward kernel so far (a count that grows per call = a recompile)."""
    try:
        return sum(len(c[0]) for c in fa._attn_fwd.device_caches.values())
    except (AttributeError, TypeError, IndexError):
        return None


def timed(fn, reps: int) -> dict:
    """Median host ms (call to synchronize) and CUDA-event ms of ``fn``, after one warm-up call."""
    fn()
    sync()
    before = compiled()
    host, dev = [], []
    for _ in range(reps):
        events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if DEV == "cuda" else None
        t0 = time.perf_counter()
        if events:
            events[0].record()
        fn()
        if events:
            events[1].record()
        sync()
        host.append(1e3 * (time.perf_counter() - t0))
        dev.append(events[0].elapsed_time(events[1]) if events else host[-1])
    after = compiled()
    return {"host_ms": float(np.median(host)), "event_ms": float(np.median(dev)),
            "host_ms_min": float(np.min(host)), "host_ms_all": [round(h, 3) for h in host],
            "compiles_while_timed": None if before is None else after - before, "kernels_compiled": after}


def prefill_fn(model, B: int, T: int):
    torch.manual_seed(2)
    cache = cache_for(model, B, T + 64, DEV, model.head.weight.dtype)
    prompt = torch.randint(0, model.config.vocab_size, (B, T), device=DEV)
    return lambda: prefill(model, cache, prompt)


def part_prefill(pairs, B, T, reps, rows, save) -> None:
    fns = {side: prefill_fn(pairs[side][0], B, T) for side in pairs}
    with torch.inference_mode():
        for rnd in range(2):  # alternated: a drift between the sides shows
            for side in ("sdpa", "srl"):
                rows.append({"part": "prefill", "side": side, "round": rnd, **timed(fns[side], reps)})
                print(json.dumps(rows[-1]), flush=True)
        save()
        for name, patch in VARIANTS.items():
            with patched(patch):
                try:
                    row = {"part": "prefill", "side": "srl", "variant": name, **timed(fns["srl"], reps)}
                except Exception as exc:  # noqa: BLE001 - recorded; the other variants still run
                    row = {"part": "prefill", "side": "srl", "variant": name, "error": str(exc)[:300]}
            rows.append(row)
            print(json.dumps(row), flush=True)
            save()


def part_profile(pairs, B, T, rows, save) -> None:
    from torch.profiler import ProfilerActivity, profile

    for side in ("sdpa", "srl"):
        fn = prefill_fn(pairs[side][0], B, T)
        with torch.inference_mode():
            fn()
            sync()
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
            with profile(activities=acts) as prof:
                for _ in range(3):
                    fn()
                sync()
        events = prof.key_averages()
        dev = sorted(events, key=lambda e: -getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)))
        top = [{"name": e.key[:90], "count": e.count,
                "device_us": getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)) / 3,
                "cpu_us": e.cpu_time_total / 3} for e in dev[:18]]
        host = [{"name": e.key[:90], "count": e.count, "cpu_us": e.cpu_time_total / 3} for e in events
                if any(s in e.key for s in ("Synchronize", "_local_scalar_dense", "item", "Memcpy", "memcpy",
                                            "to_copy", "cuModuleLoad", "compile", "Malloc", "Free", "alloc"))]
        kernels = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")]
        gpu_us = sum(getattr(e, "self_device_time_total", 0) for e in kernels) / 3
        counts = {e.key: e.count // 3 for e in events if e.key.startswith(("aten::", "cuda", "triton", "_attn"))}
        rows.append({"part": "profile", "side": side, "per_call": True, "top_device": top, "host_calls": host,
                     "op_counts": counts, "gpu_busy_us": gpu_us,
                     "kernels": sorted(({"name": e.key[:90], "count": e.count // 3,
                                         "us": getattr(e, "self_device_time_total", 0) / 3} for e in kernels),
                                       key=lambda k: -k["us"])[:25]})
        print(json.dumps(rows[-1])[:3000], flush=True)
        save()


def layer0_inputs(model, B, T):
    """(q, k, v, mask) that layer 0's attention gets in a prefill."""
    got = {}
    real = lm.attend

    def spy(q, k, v, mask, causal, kernels=True):
        got.setdefault("args", (q, k, v, mask))
        return real(q, k, v, mask, causal, kernels)

    lm.attend = spy
    try:
        with torch.inference_mode():
            prefill_fn(model, B, T)()
    finally:
        lm.attend = real
    return got["args"]


def part_attention(pairs, B, T, rows, save) -> None:
    q, k, v, mask = layer0_inputs(pairs["srl"][0], B, T)
    m = mask.slots
    n = q.shape[2]
    calls = {"sdpa_mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask.additive),
             "sdpa_causal": lambda: F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n], is_causal=True)}
    for name, patch in VARIANTS.items():
        calls[f"srl_{name}"] = (lambda p: lambda: _srl_call(p, q, k, v, m))(patch)
    want = calls["sdpa_mask"]().float()
    with torch.inference_mode():
        for name, fn in calls.items():
            try:
                err = float((fn().float() - want).norm() / want.norm())
                us = device_us(fn)
                host = timed(fn, 20)["host_ms"] * 1e3
                row = {"part": "attention", "call": name, "device_us": us, "host_us": host, "rel_err": err}
            except Exception as exc:  # noqa: BLE001
                row = {"part": "attention", "call": name, "error": str(exc)[:300]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    rows.append({"part": "attention", "shapes": {"q": list(q.shape), "q_stride": list(q.stride()),
                                                  "k": list(k.shape), "kv_lens_dtype": str(m.kv_lens.dtype)}})
    save()


def device_us(fn) -> float:
    if DEV == "cpu":
        return timed(fn, 2)["host_ms"] * 1e3
    import triton.testing as tt
    return 1e3 * tt.do_bench(fn, warmup=5, rep=40)


def _srl_call(patch, q, k, v, m):
    with patched(patch):
        return fa.flash_attention(q, k, v, causal=True, kv_lens=m.kv_lens)


def part_after_spec(pairs, B, T, reps, rows, save) -> None:
    from lm_attention import bench_spec

    fn = prefill_fn(pairs["srl"][0], B, T)
    if DEV == "cuda":  # (CPU check: the sampler is lm_attention.py's, tested there)
        bench_spec(*pairs["srl"], 1, 1, 5, 64, 2)
    with torch.inference_mode():
        rows.append({"part": "prefill", "side": "srl", "variant": "after_spec", **timed(fn, reps)})
        fn_s = prefill_fn(pairs["sdpa"][0], B, T)
        rows.append({"part": "prefill", "side": "sdpa", "variant": "after_spec", **timed(fn_s, reps)})
    print(json.dumps(rows[-2:]), flush=True)
    save()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prefill", default="16x512", help="BxT")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--parts", default="prefill,profile,attention,after_spec")
    p.add_argument("--json", default=None)
    p.add_argument("--tiny", action="store_true", help="small float32 models (CPU logic check)")
    args = p.parse_args()
    B, T = map(int, args.prefill.split("x"))
    pairs = make_pairs(args.tiny)
    result = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu", "torch": torch.__version__,
              "triton": __import__("triton").__version__, "settings": vars(args), "rows": []}

    def save() -> None:
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=1)

    rows = result["rows"]
    for part in args.parts.split(","):
        t0 = time.perf_counter()
        try:
            if part == "prefill":
                part_prefill(pairs, B, T, args.reps, rows, save)
            elif part == "profile":
                part_profile(pairs, B, T, rows, save)
            elif part == "attention":
                part_attention(pairs, B, T, rows, save)
            elif part == "after_spec":
                part_after_spec(pairs, B, T, args.reps, rows, save)
        except Exception as exc:  # noqa: BLE001 - recorded; the other parts still run
            rows.append({"part": part, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        rows.append({"part": part, "wall_s": time.perf_counter() - t0})
        print(json.dumps(rows[-1]), flush=True)
        save()


if __name__ == "__main__":
    main()
