"""Sparse attention kernel variants side by side: tile lists against the range kernels.

For each pattern of ``sparse_attention.py`` (sink+window, S2 strided) and each N, times the
forward and forward+backward of every variant in VARIANTS (tile sizes, TMA, range or list
kernels) next to srl's dense causal kernel (for the block-count ideal) and, unless --no-flex,
FlexAttention on the same mask. ``--warm I/K`` only compiles the I-th of K shares of the
variants at a short N (same Triton specializations) so that K processes can fill the kernel
cache in parallel before the timed run.

    PYTHONPATH=. python benchmarks/kernels/sparse_attention_sweep.py --json sweep.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sparse_attention as bench  # noqa: E402  - this folder's benchmark (its helpers and patterns)

from srl.kernels.flash_attention import flash_attention  # noqa: E402
from srl.kernels.sparse_attention import sparse_attention  # noqa: E402

SA = bench.SA
bench.time_ms.__defaults__ = (300.0, 30)  # per-call budget (ms), most calls: a sweep of many variants
DEV = bench.DEV
T0 = time.perf_counter()


def _t(bm, bn, warps, stages, **extra):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages, **extra}


R = {"RANGES": True}
HF = {"RANGES": True, "HEADS_FAST": True}
# name -> (fwd tiles, dK/dV tiles, dQ tiles); "list" rows are the committed list-kernel defaults.
# Round A (H200) ruled out 4-stage range tiles (shared memory), BLOCK_M 256 and 64-row forward tiles.
VARIANTS = {
    "sink_window": {
        "list": (_t(128, 64, 8, 3), _t(64, 128, 8, 3), _t(128, 64, 8, 3)),
        "r128_tma": (_t(128, 128, 8, 3, TMA=True, PRE_N=64, **R), _t(64, 128, 8, 3, **R), _t(128, 64, 8, 3, **R)),
        "r128_tma_s2": (_t(128, 128, 8, 2, TMA=True, PRE_N=64, **R), _t(64, 128, 8, 3, **HF),
                        _t(128, 64, 8, 3, **HF)),
        "r64_tma": (_t(128, 64, 8, 3, TMA=True, **R), _t(64, 64, 4, 3, **R), _t(128, 64, 8, 2, **R)),
        "r64_tma_s4": (_t(128, 64, 8, 4, TMA=True, **R), _t(64, 128, 8, 2, **HF), _t(64, 64, 4, 3, **R)),
    },
    "s2": {
        "list": (_t(128, 64, 8, 4), _t(64, 64, 4, 3), _t(64, 64, 4, 3)),
        "r64_tma": (_t(128, 64, 8, 3, TMA=True, **R), _t(64, 64, 4, 3, **R), _t(64, 64, 4, 3, **R)),
        "r64_tma_s4": (_t(128, 64, 8, 4, TMA=True, **R), _t(64, 64, 4, 3, **HF), _t(128, 64, 8, 3, **R)),
        "r64_s4": (_t(128, 64, 8, 4, **R), _t(128, 64, 8, 3, **R), _t(64, 64, 4, 2, **R)),
        "r128band_tma": (_t(128, 128, 8, 3, TMA=True, PRE_N=64, **R), _t(64, 64, 4, 2, **HF),
                         _t(128, 64, 8, 2, **HF)),
    },
}


def queued_ms(fn, per_call_ms, budget_ms=150.0, max_reps=30):
    """Mean time of back-to-back calls between two events: the host's launch work overlaps the
    previous call's kernels (as in a training loop), so this is the device time per call."""
    if DEV == "cpu":
        return per_call_ms
    reps = int(max(3, min(max_reps, budget_ms / max(per_call_ms, 1e-3))))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def timed(impl, q, k, v, do):
    """(fwd, fwd+bwd) medians of per-call timings, then the same two from back-to-back calls."""
    fwd, fwd_bwd = bench.timed_pair(impl, q, k, v, do)

    def step():
        for t in (q, k, v):
            t.grad = None
        impl(q, k, v).backward(do)
    with torch.no_grad():
        fwd_q = queued_ms(lambda: impl(q, k, v), fwd)
    return fwd, fwd_bwd, fwd_q, queued_ms(step, fwd_bwd)


def log(msg):
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def use(tiles):
    SA.TILE_OVERRIDE.clear()
    SA.TILE_OVERRIDE.update(fwd=tiles[0], dkdv=tiles[1], dq=tiles[2])


def inputs(n, h, d, seed):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    q, k, v = (torch.randn(1, h, n, d, device=DEV, dtype=torch.bfloat16, generator=gen).requires_grad_()
               for _ in range(3))
    return q, k, v, torch.randn(1, h, n, d, device=DEV, dtype=torch.bfloat16, generator=gen)


def warm(share, shares, n, h, d):
    """Compile this process's share of the variants (the last share: the dense kernels too). The
    kernels do not specialize on the head count, so the LM (8 heads) reuses these binaries."""
    q, k, v, do = inputs(n, h, d, 0)
    jobs = [(name, var) for name in VARIANTS for var in VARIANTS[name]]
    for i, (name, var) in enumerate(jobs):
        if i % shares != share:
            continue
        use(VARIANTS[name][var])
        try:
            bench.timed_pair(lambda a, b, c: sparse_attention(a, b, c, bench.PATTERNS[name]), q, k, v, do)
            log(f"warm {name} {var}")
        except Exception as err:  # a tile that does not compile: the timed run reports it
            log(f"warm {name} {var} failed: {str(err).splitlines()[0][:160]}")
    SA.TILE_OVERRIDE.clear()
    if share == shares - 1:
        bench.timed_pair(lambda a, b, c: flash_attention(a, b, c, causal=True), q, k, v, do)
    log("warm done")


def check(name, pattern, q, k, v, do, ref):
    """Relative errors of O, dQ, dK, dV against the first variant's (the list kernels)."""
    for t in (q, k, v):
        t.grad = None
    o = sparse_attention(q, k, v, pattern)
    o.backward(do)
    got = [o.detach(), q.grad, k.grad, v.grad]
    for t in (q, k, v):
        t.grad = None
    if ref is None:
        return got, {}
    return ref, {f"err_{x}": bench.rel_err(a, b) for x, a, b in zip(("o", "dq", "dk", "dv"), got, ref)}


def time_variant(n, name, var, tiles, qkvd, dense, frac, ref):
    """Row of one variant (errors against ``ref``, the list kernels' results), or None if it fails."""
    pattern = bench.PATTERNS[name]
    use(tiles)
    try:
        ref, errs = check(name, pattern, *qkvd, ref)
        t = timed(lambda a, b, c: sparse_attention(a, b, c, pattern), *qkvd)
    except Exception as err:
        log(f"N={n} {name} {var} failed: {str(err).splitlines()[0][:160]}")
        return None, ref
    row = {"N": n, "pattern": name, "variant": var, "tiles": tiles, "fwd_ms": t[0], "fwd_bwd_ms": t[1],
           "fwd_q_ms": t[2], "fwd_bwd_q_ms": t[3], "block_fraction": frac,
           "ideal_fwd": dense[0] * frac / t[0], "ideal_fwd_bwd": dense[1] * frac / t[1],
           "ideal_fwd_q": dense[2] * frac / t[2], "ideal_fwd_bwd_q": dense[3] * frac / t[3], **errs}
    log(f"N={n} {name:11s} {var:15s} fwd {t[0]:8.3f} fwd+bwd {t[1]:8.3f} ideal {row['ideal_fwd']:.3f} / "
        f"{row['ideal_fwd_bwd']:.3f} queued {t[2]:8.3f} / {t[3]:8.3f} ideal {row['ideal_fwd_q']:.3f} / "
        f"{row['ideal_fwd_bwd_q']:.3f} " + " ".join(f"{a}={b:.1e}" for a, b in errs.items()))
    return row, ref


def run_n(n, h, d, results, save, only):
    """Dense causal, every variant of both patterns, then the best forward with the best backward."""
    qkvd = inputs(n, h, d, n)
    SA.TILE_OVERRIDE.clear()
    dense = timed(lambda a, b, c: flash_attention(a, b, c, causal=True), *qkvd)
    results["dense"].append({"N": n, "fwd_ms": dense[0], "fwd_bwd_ms": dense[1], "fwd_q_ms": dense[2],
                             "fwd_bwd_q_ms": dense[3]})
    log(f"N={n} dense causal {dense[0]:.3f} / {dense[1]:.3f} ms, queued {dense[2]:.3f} / {dense[3]:.3f} ms")
    for name, pattern in bench.PATTERNS.items():
        frac = bench.block_fraction(pattern, h, n)
        ref = None
        for var, tiles in VARIANTS[name].items():
            if not only or var in only or var == "list":
                row, ref = time_variant(n, name, var, tiles, qkvd, dense, frac, ref)
                if row:
                    results["variants"].append(row)
                    save()
        best = best_tiles(results, name, n)
        if best:
            row, _ = time_variant(n, name, "best", best[0], qkvd, dense, frac, ref)
            if row:
                results["variants"].append(dict(row, best_of=best[1]))
                save()
    SA.TILE_OVERRIDE.clear()


def best_tiles(results, name, n):
    """Fastest forward tiles and fastest backward tiles (fwd+bwd - fwd) of a pattern at N."""
    rows = [r for r in results["variants"] if r["pattern"] == name and r["N"] == n and r["variant"] != "best"]
    if not rows:
        return None
    fwd = min(rows, key=lambda r: r["fwd_ms"])
    bwd = min(rows, key=lambda r: r["fwd_bwd_ms"] - r["fwd_ms"])
    return (fwd["tiles"][0], bwd["tiles"][1], bwd["tiles"][2]), f"{fwd['variant']}+{bwd['variant']}"


def run_flex(n, h, d, results, save, go_file="", patterns=()):
    """FlexAttention on both masks at N: compile (one call each), wait for ``go_file`` if given (so
    that compiling here can overlap other work and timing cannot), then time."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    flex = torch.compile(flex_attention, dynamic=False)
    q, k, v, do = inputs(n, h, d, n)
    masks = {}
    for name, pattern in bench.PATTERNS.items():
        if patterns and name not in patterns:
            continue
        masks[name] = create_block_mask(bench.flex_mask_mod(pattern), None, h, n, n, device=DEV, _compile=True)
        flex(q, k, v, block_mask=masks[name]).backward(do)
        log(f"flex compiled {name} N={n}")
    while go_file and not os.path.exists(go_file):
        time.sleep(0.1)
    for name, mask in masks.items():
        t = timed(lambda a, b, c: flex(a, b, c, block_mask=mask), q, k, v, do)
        results["flex"].append({"N": n, "pattern": name, "fwd_ms": t[0], "fwd_bwd_ms": t[1], "fwd_q_ms": t[2],
                                "fwd_bwd_q_ms": t[3]})
        save()
        log(f"N={n} {name} flex {t[0]:.3f} / {t[1]:.3f} ms, queued {t[2]:.3f} / {t[3]:.3f} ms")


def lm_tiles(results, n):
    """Tiles of the fastest forward+backward row of each pattern at N (none measured: defaults)."""
    tiles = {}
    for name in VARIANTS:
        rows = [r for r in results.get("variants", []) if r["pattern"] == name and r["N"] == n]
        if rows:
            fwd, dkdv, dq = min(rows, key=lambda r: r["fwd_bwd_ms"])["tiles"]
            tiles[f"longgen_{name}"] = {"fwd": fwd, "dkdv": dkdv, "dq": dq}
    return tiles


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.seq_and_warm_args(parser)
    parser.add_argument("--flex-only", action="store_true", help="FlexAttention rows only")
    parser.add_argument("--go-file", default="", help="with --flex-only: compile, then time once this file exists")
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--patterns", nargs="*", default=[], help="FlexAttention: only these patterns")
    parser.add_argument("--only", nargs="*", default=[], help="variant names to time (besides the list kernels)")
    parser.add_argument("--lm", action="store_true")
    parser.add_argument("--lm-only", action="store_true")
    parser.add_argument("--lm-steps", type=int, default=6)
    parser.add_argument("--lm-seq", type=int, default=32768)
    parser.add_argument("--json", default="sparse_sweep.json")
    parser.add_argument("--append", action="store_true", help="add to the rows already in --json")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args(argv)
    h, d = args.heads, args.head_dim
    if args.warm:
        share, shares = (int(x) for x in args.warm.split("/"))
        warm(share, shares, args.warm_seq, h, d)
        return
    results = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu", "torch": torch.__version__,
               "triton": triton.__version__, "dense": [], "variants": [], "flex": [], "lm": []}
    if args.append and os.path.exists(args.json):
        with open(args.json) as f:
            results.update(json.load(f))

    def save():
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if not (args.flex_only or args.lm_only):
        for n in args.seq:
            run_n(n, h, d, results, save, set(args.only))
    if args.lm or args.lm_only:
        bench.bench_lm(args.lm_seq, args.lm_steps, results, save, tiles=lm_tiles(results, args.lm_seq))
    if not (args.no_flex or args.lm_only):
        for n in args.seq:
            run_flex(n, h, d, results, save, args.go_file, args.patterns)


if __name__ == "__main__":
    main()
