"""Where the sink+window time goes: host against device time, and each backward kernel's tiles.

Four timers per measurement (milliseconds):

* per call: median of CUDA-event times around one call on an idle GPU; the host's work before
  the first kernel is included (the issue's targets use this one);
* queued: mean of back-to-back calls between two events (the host runs ahead, as in training);
* device: the GPU sleeps while the host queues one call, so the events time the device work only;
* host: wall time of the call's Python and launches (measured in the same calls as "device").

Probe (default): forward tile variants, the dK/dV and dQ kernels alone per tile choice (dQ with
rowsum(dO * O) in its own pass or fused), then the defaults and the best forward + dK/dV + dQ, at
each N, with a profile of the default call's host work. ``--final``: a few sink+window dK/dV and
dQ candidates alone (FINAL_DKDV, FINAL_DQ; the fastest kept, unless --no-pick), then both
patterns end to end with the four timers. ``--flex``: FlexAttention on one pattern, compiled first, timed
once ``--go-file`` exists (so compiling can overlap other work and timing cannot); errors of O,
dQ, dK, dV against srl's defaults. ``--warm I/K``: compile share I of K of the probe's kernels at
a short N (same specializations) so that K processes fill the kernel cache in parallel.

    PYTHONPATH=. python benchmarks/kernels/sparse_attention_probe.py --json probe.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sparse_attention as bench  # noqa: E402  - this folder's benchmark (its helpers and patterns)

from srl.kernels.sparse_attention import sparse_attention  # noqa: E402

SA = bench.SA
DEV = bench.DEV  # cpu: a dry run under TRITON_INTERPRET=1
PATTERNS = bench.PATTERNS
rel_err, block_fraction, flex_mask_mod = bench.rel_err, bench.block_fraction, bench.flex_mask_mod
T0 = time.perf_counter()


def _t(bm, bn, warps, stages, **extra):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages, "RANGES": True, **extra}


HF = {"HEADS_FAST": True}
DEV_TMA = {"TMA": True, "DESC_DEV": True}  # descriptors built by the kernel (no host encoding per launch)
FWD = {"default": None, "dev": _t(128, 64, 8, 3, **DEV_TMA), "dev_s4": _t(128, 64, 8, 4, **DEV_TMA),
       "ptr_s3": _t(128, 64, 8, 3)}
DKDV = {"default": None, "tma": _t(64, 64, 4, 2, TMA=True, **HF), "dev": _t(64, 64, 4, 2, **DEV_TMA, **HF),
        "dev_s3": _t(64, 64, 4, 3, **DEV_TMA, **HF), "dev_m32_s3": _t(32, 64, 4, 3, **DEV_TMA, **HF),
        "dev_m128_w8": _t(128, 64, 8, 2, **DEV_TMA, **HF), "dev_m128_w8_s3": _t(128, 64, 8, 3, **DEV_TMA, **HF),
        "dev_n128_w8": _t(64, 128, 8, 2, **DEV_TMA, **HF)}
DQ = {"default": None, "tma": _t(128, 64, 8, 3, FUSE_DELTA=True, TMA=True, **HF),
      "dev": _t(128, 64, 8, 3, FUSE_DELTA=True, **DEV_TMA, **HF),
      "dev_s2": _t(128, 64, 8, 2, FUSE_DELTA=True, **DEV_TMA, **HF),
      "dev_m64_w4": _t(64, 64, 4, 3, FUSE_DELTA=True, **DEV_TMA, **HF)}


# --final: the candidates measured before the final rows (sink+window); the fastest (device time
# summed over the Ns) serve the final rows unless --no-pick
FINAL_DKDV = {"default": None, "m32": _t(32, 64, 4, 2, **DEV_TMA, **HF)}
# Candidates with two programs per SM. The defaults' forward and dQ (8 warps, 128x64 tiles) hold
# one: their two warp groups meet at block-wide barriers every key tile, so the softmax of one
# does not overlap the other's matrix products, and nothing covers the loads of q and of each
# loop's first tiles. Two programs fit with 64-row tiles and 4 warps, or with 128 rows, 8 warps
# and at most 128 registers a thread (maxnreg; sm_90 compiles spill only in the masked loop of
# the 128x64 forward, nowhere in the 128x32 tiles) and ~96-115 KB of shared memory.
DQ_M64 = _t(64, 64, 4, 2, FUSE_DELTA=True, TMA=True, **HF)
DQ_N32_S3 = _t(128, 32, 8, 3, FUSE_DELTA=True, TMA=True, maxnreg=128, **HF)
FINAL_DQ = {"default": None, "m64_tma": DQ_M64, "n32_s3": DQ_N32_S3,
            "n32_s2": _t(128, 32, 8, 2, FUSE_DELTA=True, TMA=True, maxnreg=128, **HF)}
F_M64_S3 = _t(64, 64, 4, 3, TMA=True)
F_R128 = _t(128, 64, 8, 2, TMA=True, maxnreg=128)
# --final --extra: other settings timed end to end after the defaults: pattern, (fwd, dK/dV, dQ)
# tiles, module settings of sparse_attention.py (DIRECT_LAUNCH False: every launch through Triton's
# own path, as before the cached launches)
FINAL_EXTRA = {"triton_launch": ("sink_window", (None, None, None), {"DIRECT_LAUNCH": False}),
               "fwd_dev": ("sink_window", (_t(128, 64, 8, 3, **DEV_TMA), None, None), {}),
               "dkdv_host": ("sink_window", (None, _t(64, 64, 4, 2, TMA=True, **HF), None), {}),
               "dq_s4": ("sink_window", (None, None, _t(128, 64, 8, 4, FUSE_DELTA=True, **HF)), {}),
               "dq_n128": ("sink_window", (None, None, _t(128, 128, 8, 2, FUSE_DELTA=True, **HF)), {}),
               # dQ with the query tiles fastest (heads slowest)
               "dq_tiles_fast": ("sink_window", (None, None, _t(128, 64, 8, 3, FUSE_DELTA=True)), {}),
               # sink+window's forward before round F: 128x64 tiles, 8 warps, 3 stages
               "fwd_prev": ("sink_window", (_t(128, 64, 8, 3, TMA=True), None, None), {}),
               "fwd_m64_s3": ("sink_window", (F_M64_S3, None, None), {}),
               "fwd_m64_s2": ("sink_window", (_t(64, 64, 4, 2, TMA=True), None, None), {}),
               "fwd_r128": ("sink_window", (F_R128, None, None), {}),
               "fwd_n32_s4": ("sink_window", (_t(128, 32, 8, 4, TMA=True, maxnreg=128), None, None), {}),
               "dq_m64": ("sink_window", (None, None, DQ_M64), {}),
               "dq_n32_s3": ("sink_window", (None, None, DQ_N32_S3), {}),
               "dq_n32_s2": ("sink_window", (None, None, FINAL_DQ["n32_s2"]), {}),
               "dkdv_m32": ("sink_window", (None, FINAL_DKDV["m32"], None), {}),
               "r128_dq_n32_s3": ("sink_window", (F_R128, None, DQ_N32_S3), {}),
               "m64_s3_dq_m64": ("sink_window", (F_M64_S3, None, DQ_M64), {}),
               # dQ on 64x32 tiles, 4 warps: ~130 registers, 99 KB (4 stages, two programs per SM) or
               # 66 KB (2 stages, three programs per SM) of shared memory
               "dq_m64_n32_s4": ("sink_window", (None, None, _t(64, 32, 4, 4, FUSE_DELTA=True, TMA=True, **HF)), {}),
               "dq_m64_n32_s2": ("sink_window", (None, None, _t(64, 32, 4, 2, FUSE_DELTA=True, TMA=True, **HF)), {})}


def log(msg):
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def _events():
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def queued_ms(fn, per_ms, budget_ms=120.0, max_reps=25):
    if DEV == "cpu":
        return per_ms
    reps = int(max(3, min(max_reps, budget_ms / max(per_ms, 1e-3))))
    start, end = _events()
    sync()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


_CYCLES_PER_MS = []


def _sleep_cycles(ms):
    """GPU clock cycles of ``ms`` milliseconds of ``torch.cuda._sleep`` (calibrated once)."""
    if not _CYCLES_PER_MS:
        start, end = _events()
        sync()
        start.record()
        torch.cuda._sleep(1_000_000)
        end.record()
        end.synchronize()
        _CYCLES_PER_MS.append(1_000_000 / start.elapsed_time(end))
    return int(ms * _CYCLES_PER_MS[0])


def device_host_ms(fn, reps=5, sleep_ms=3.0):
    """(device ms, host ms): medians over calls queued behind a GPU sleep of ``sleep_ms``; the
    device time is only clean when the host time stays below the sleep (flagged in the log)."""
    if DEV == "cpu":
        t = bench.time_ms(fn)
        return t, t
    fn()
    dev, host = [], []
    start, end = _events()
    for _ in range(reps):
        sync()
        torch.cuda._sleep(_sleep_cycles(sleep_ms))
        start.record()
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e3)
        end.record()
        end.synchronize()
        dev.append(start.elapsed_time(end))
    d, h = statistics.median(dev), statistics.median(host)
    if h > 0.8 * sleep_ms:
        log(f"  warning: host {h:.3f} ms is near the {sleep_ms} ms sleep: the device time includes host time")
    return d, h


def four_timers(fn, budget_ms=200.0):
    per = bench.time_ms(fn, budget_ms, 25)  # median of per-call times, host work included
    dev, host = device_host_ms(fn)
    return {"per_call_ms": per, "queued_ms": queued_ms(fn, per), "device_ms": dev, "host_ms": host}


def inputs(n, h, d, seed):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    q, k, v = (torch.randn(1, h, n, d, device=DEV, dtype=torch.bfloat16, generator=gen).requires_grad_()
               for _ in range(3))
    return q, k, v, torch.randn(1, h, n, d, device=DEV, dtype=torch.bfloat16, generator=gen)


def use(fwd=None, dkdv=None, dq=None):
    SA.TILE_OVERRIDE.clear()
    for stage, tiles in (("fwd", fwd), ("dkdv", dkdv), ("dq", dq)):
        if tiles is not None:
            SA.TILE_OVERRIDE[stage] = tiles


def fwd_bwd_fns(impl, q, k, v, do):
    def fwd():
        with torch.no_grad():
            return impl(q, k, v)

    def step():
        for t in (q, k, v):
            t.grad = None
        impl(q, k, v).backward(do)
    return fwd, step


def outputs(impl, q, k, v, do):
    for t in (q, k, v):
        t.grad = None
    o = impl(q, k, v)
    o.backward(do)
    got = [o.detach().clone(), q.grad.clone(), k.grad.clone(), v.grad.clone()]
    for t in (q, k, v):
        t.grad = None
    return got


# --------------------------------------------------------------------------
# backward kernels one at a time
# --------------------------------------------------------------------------
class Bwd:
    """Forward outputs of the default kernels and buffers, to launch one backward kernel alone."""

    def __init__(self, pattern, q, k, v, do):
        self.pattern, self.scale = pattern, q.shape[-1] ** -0.5
        self.q, self.k, self.v, self.do = q.detach(), k.detach(), v.detach(), do
        SA.TILE_OVERRIDE.clear()
        self.o, self.lse = SA._forward(self.q, self.k, self.v, pattern, self.scale)
        self.dq, self.dk, self.dv = (torch.empty_like(t) for t in (self.q, self.k, self.v))
        B, H, N, _ = q.shape
        self.delta = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
        self.preprocess()

    def preprocess(self):
        B, H, N, D = self.q.shape
        SA._bwd_preprocess[(triton.cdiv(N, 64), B * H)](
            self.o, self.do, self.delta, *SA._strides(self.o), *SA._strides(self.do), H, N, HEAD_DIM=D, BLOCK_M=64)

    def dkdv(self):
        SA._backward_dkdv(self.do, self.q, self.k, self.v, self.dk, self.dv, self.lse, self.delta, self.pattern,
                          self.scale)

    def dq_kernel(self, fused):
        SA._backward_dq(self.do, self.q, self.k, self.v, self.dq, self.lse, self.delta, self.pattern, self.scale,
                        self.o if fused else None)


def probe_backward(n, pattern, qkvd, rows, save, dkdv_tiles=None, dq_tiles=None):
    """Device time of each dK/dV and dQ tile choice alone; errors against the default tiles'."""
    dkdv_tiles, dq_tiles = dkdv_tiles or DKDV, dq_tiles or DQ
    bwd = Bwd(pattern, *qkvd)
    SA.TILE_OVERRIDE.clear()
    pre = device_host_ms(bwd.preprocess)[0]
    rows.append({"N": n, "stage": "preprocess", "variant": "default", "device_ms": pre})
    bwd.dkdv()
    ref = (bwd.dk.clone(), bwd.dv.clone())
    for name, tiles in dkdv_tiles.items():
        use(dkdv=tiles)
        try:
            bwd.dkdv()
            errs = {"err_dk": rel_err(bwd.dk, ref[0]), "err_dv": rel_err(bwd.dv, ref[1])}
            dev = device_host_ms(bwd.dkdv)[0]
        except Exception as err:  # a tile that does not compile or run
            log(f"N={n} dkdv {name} failed: {str(err).splitlines()[0][:160]}")
            continue
        rows.append({"N": n, "stage": "dkdv", "variant": name, "tiles": tiles, "device_ms": dev, **errs})
        log(f"N={n} dkdv {name:10s} {dev:8.3f} ms " + " ".join(f"{a}={b:.1e}" for a, b in errs.items()))
        save()
    SA.TILE_OVERRIDE.clear()
    bwd.dq_kernel(False)
    ref = bwd.dq.clone()
    for name, tiles in dq_tiles.items():
        use(dq=tiles)
        fused = bool(SA._stage_tiles("dq", qkvd[0].shape[-1], pattern.kernel_params()[0]).get("FUSE_DELTA"))
        try:
            bwd.preprocess()
            bwd.dq_kernel(fused)
            err = rel_err(bwd.dq, ref)
            dev = device_host_ms(lambda: bwd.dq_kernel(fused))[0] + (0.0 if fused else pre)
        except Exception as exc:
            log(f"N={n} dq {name} failed: {str(exc).splitlines()[0][:160]}")
            continue
        rows.append({"N": n, "stage": "dq", "variant": name, "tiles": tiles, "device_ms": dev, "err_dq": err,
                     "with_preprocess": not fused})
        log(f"N={n} dq   {name:10s} {dev:8.3f} ms (incl. the delta pass) err_dq={err:.1e}")
        save()
    SA.TILE_OVERRIDE.clear()


def probe_forward(n, pattern, qkvd, rows, save):
    q, k, v, _ = qkvd
    with torch.no_grad():
        SA.TILE_OVERRIDE.clear()
        ref = sparse_attention(q, k, v, pattern)
        for name, tiles in FWD.items():
            use(fwd=tiles)
            impl = (lambda: sparse_attention(q, k, v, pattern))
            try:
                err = rel_err(impl(), ref)
                t = four_timers(impl)
            except Exception as exc:
                log(f"N={n} fwd {name} failed: {str(exc).splitlines()[0][:160]}")
                continue
            rows.append({"N": n, "stage": "fwd", "variant": name, "tiles": tiles, **t, "err_o": err})
            log(f"N={n} fwd  {name:10s} " + " ".join(f"{a}={b:.3f}" for a, b in t.items()) + f" err_o={err:.1e}")
            save()
    SA.TILE_OVERRIDE.clear()


def best(rows, n, stage):
    """Tiles of the fastest variant of a stage at N (None = the default): per-call time for the
    forward (host work included), device time for the backward kernels (their host work overlaps
    the forward's device time)."""
    cands = [r for r in rows if r["N"] == n and r["stage"] == stage]
    key = "per_call_ms" if stage == "fwd" else "device_ms"
    return min(cands, key=lambda r: r[key]) if cands else None


def host_profile(fn, calls=20):
    """Top of a cProfile of ``calls`` calls (host side; the GPU runs as usual)."""
    prof = cProfile.Profile()
    for _ in range(calls):
        sync()
        prof.enable()
        fn()
        prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(14)
    return out.getvalue()


def time_combo(n, name, pattern, qkvd, tiles, ref, frac, settings=None):
    """Four timers of forward and forward+backward with these tiles and module settings."""
    use(*tiles)
    before = {key: getattr(SA, key) for key in settings or {}}
    for key, value in (settings or {}).items():
        setattr(SA, key, value)
    try:
        impl = (lambda a, b, c: sparse_attention(a, b, c, pattern))
        got = outputs(impl, *qkvd)
        errs = {f"err_{x}": rel_err(a, b) for x, a, b in zip(("o", "dq", "dk", "dv"), got, ref)} if ref else {}
        fwd, step = fwd_bwd_fns(impl, *qkvd)
        row = {"N": n, "pattern": name, "tiles": tiles, "settings": settings or {}, "block_fraction": frac,
               "fwd": four_timers(fwd), "fwd_bwd": four_timers(step, 400.0), **errs}
    finally:
        for key, value in before.items():
            setattr(SA, key, value)
        SA.TILE_OVERRIDE.clear()
    log(f"N={n} {name} {tiles if any(tiles) else 'defaults'} {settings or ''}: fwd {row['fwd']} "
        f"fwd+bwd {row['fwd_bwd']} {errs}")
    return row, got


def probe(args, results, save):
    h, d = args.heads, args.head_dim
    pattern = PATTERNS["sink_window"]
    for n in args.seq:
        qkvd = inputs(n, h, d, n)
        frac = block_fraction(pattern, h, n)
        probe_forward(n, pattern, qkvd, results["kernels"], save)
        probe_backward(n, pattern, qkvd, results["kernels"], save)
        row, ref = time_combo(n, "sink_window", pattern, qkvd, (None, None, None), None, frac)
        results["combos"].append(dict(row, variant="defaults"))
        picks = [best(results["kernels"], n, s) for s in ("fwd", "dkdv", "dq")]
        tiles = tuple(p["tiles"] if p else None for p in picks)
        row, _ = time_combo(n, "sink_window", pattern, qkvd, tiles, ref, frac)
        results["combos"].append(dict(row, variant="best", best_of=[p["variant"] if p else None for p in picks]))
        save()
        if n == args.seq[0]:
            fwd, step = fwd_bwd_fns(lambda a, b, c: sparse_attention(a, b, c, pattern), *qkvd)
            for label, fn in (("fwd", fwd), ("fwd_bwd", step)):
                text = host_profile(fn)
                results["host_profile"][f"{n}_{label}"] = text
                log(f"host profile N={n} {label} (defaults, 20 calls):\n{text}")
        del qkvd
        if DEV == "cuda":
            torch.cuda.empty_cache()


def _extras(args):
    """FINAL_EXTRA, or the variants --extras names, when --extra."""
    if not args.extra:
        return {}
    return {k: v for k, v in FINAL_EXTRA.items() if not args.extras or k in args.extras}


def profile_defaults(n, pattern, qkvd, results):
    """cProfile of 20 default calls (forward; forward+backward) and of 20 through Triton's own launch."""
    impl = (lambda a, b, c: sparse_attention(a, b, c, pattern))
    fwd, step = fwd_bwd_fns(impl, *qkvd)
    for direct in (True, False):
        SA.DIRECT_LAUNCH = direct
        try:
            for label, fn in (("fwd", fwd), ("fwd_bwd", step)):
                fn()
                text = host_profile(fn)
                key = f"{n}_{label}" + ("" if direct else "_triton_launch")
                results["host_profile"][key] = text
                log(f"host profile {key} (20 calls):\n{text}")
        finally:
            SA.DIRECT_LAUNCH = True


def pick(rows, stage, seq):
    """Tiles of the variant with the least device time summed over ``seq`` (None: the default)."""
    total = {}
    for r in rows:
        if r["stage"] == stage and r["N"] in seq:
            total.setdefault(r["variant"], [0.0, 0, r["tiles"]])
            total[r["variant"]][0] += r["device_ms"]
            total[r["variant"]][1] += 1
    full = {name: t for name, t in total.items() if t[1] == len(seq)}
    if not full:
        return "default", None
    name = min(full, key=lambda x: full[x][0])
    return name, full[name][2]


def settle(ms, pattern, qkvd):
    """Run the defaults' forward+backward back to back for ``ms`` milliseconds before a sequence
    length's first timed row (in round B of round F the first row's per-call forward at 128k was
    0.2-0.7 ms above its own queued time, every later row's 0.1-0.3 ms)."""
    if ms <= 0 or DEV != "cuda":
        return
    SA.TILE_OVERRIDE.clear()
    step = fwd_bwd_fns(lambda a, b, c: sparse_attention(a, b, c, pattern), *qkvd)[1]
    sync()
    t0 = time.perf_counter()
    while (time.perf_counter() - t0) * 1e3 < ms:
        step()
        sync()
    for t in qkvd[:3]:
        t.grad = None


def final(args, results, save):
    """Unless --no-pick: the sink+window dK/dV and dQ candidates alone at each N, the fastest kept;
    then both patterns end to end with the four timers (errors against FlexAttention are in the
    flex rows)."""
    sw = PATTERNS["sink_window"]
    picks = {}
    if not args.no_pick or args.bwd_kernels:
        for n in args.seq:
            qkvd = inputs(n, args.heads, args.head_dim, n)
            probe_backward(n, sw, qkvd, results["kernels"], save, FINAL_DKDV, FINAL_DQ)
            del qkvd
    if not args.no_pick:
        picks = {stage: pick(results["kernels"], stage, args.seq) for stage in ("dkdv", "dq")}
        results["picks"] = picks
        log(f"picks: {picks}")
    for n in args.seq:
        qkvd = inputs(n, args.heads, args.head_dim, n)
        settle(args.settle_ms, PATTERNS[(args.patterns or list(PATTERNS))[0]], qkvd)
        refs = {}  # O, dQ, dK, dV of each pattern's final row: the extras' errors are against them
        for name in args.patterns or PATTERNS:
            tiles = (None, picks["dkdv"][1], picks["dq"][1]) if picks and name == "sink_window" else (None,) * 3
            frac = block_fraction(PATTERNS[name], args.heads, n)
            row, refs[name] = time_combo(n, name, PATTERNS[name], qkvd, tiles, None, frac)
            results["final"].append(row)
            save()
        for variant, (name, tiles, settings) in _extras(args).items():
            frac = block_fraction(PATTERNS[name], args.heads, n)
            row, _ = time_combo(n, name, PATTERNS[name], qkvd, tiles, refs.get(name), frac, settings)
            results["final_extra"].append(dict(row, variant=variant))
            save()
        if args.profile and n == args.seq[0]:
            profile_defaults(n, sw, qkvd, results)
        del qkvd


def flex(args, results, save):
    """FlexAttention on one pattern per N: compile all first, wait for --go-file, time, then touch
    --next-go (so that several flex processes take turns on the GPU)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    fx = torch.compile(flex_attention, dynamic=False)
    name = args.patterns[0]
    pattern = PATTERNS[name]
    ready = []
    try:
        for n in args.seq:
            qkvd = inputs(n, args.heads, args.head_dim, n)
            mask = create_block_mask(flex_mask_mod(pattern), None, args.heads, n, n, device=DEV, _compile=True)
            impl = (lambda a, b, c, m=mask: fx(a, b, c, block_mask=m))
            outputs(impl, *qkvd)
            with torch.no_grad():  # the compiled function guards on grad mode: compile this one now too
                impl(*qkvd[:3])
            log(f"flex compiled {name} N={n}")
            ready.append((n, qkvd, impl))
    except Exception as err:  # still take (and pass on) the turn on the GPU
        log(f"flex {name} failed to compile: {str(err).splitlines()[0][:160]}")
    if args.compiled_file:
        open(args.compiled_file, "w").close()
    while args.go_file and not os.path.exists(args.go_file):
        time.sleep(0.05)
    try:
        for n, qkvd, impl in ready:
            fwd, step = fwd_bwd_fns(impl, *qkvd)
            row = {"N": n, "pattern": name, "fwd": four_timers(fwd), "fwd_bwd": four_timers(step, 400.0)}
            if args.flex_repeat:  # a second timing of the same compiled function
                row.update(fwd_repeat=four_timers(fwd), fwd_bwd_repeat=four_timers(step, 400.0))
            ref = outputs(impl, *qkvd)
            got = outputs(lambda a, b, c: sparse_attention(a, b, c, pattern), *qkvd)
            row.update({f"err_vs_flex_{x}": rel_err(a, b) for x, a, b in zip(("o", "dq", "dk", "dv"), got, ref)})
            results["flex"].append(row)
            save()
            log(f"N={n} {name} flex: fwd {row['fwd']} fwd+bwd {row['fwd_bwd']}")
    finally:
        if args.next_go:
            open(args.next_go, "w").close()


def warm(share, shares, n, h, d, patterns, round_b=False, extra=None, probe=True):
    """Compile share ``share`` of the kernels at N = n: the defaults of ``patterns`` (forward, delta
    pass, dK/dV, dQ), and the candidates of --final (``round_b``) or, for sink+window alone, the
    probe's variants (``probe``: the probe's run, not --final); the ``extra`` variants (of FINAL_EXTRA) too."""
    pattern = PATTERNS["sink_window"]
    q, k, v, do = inputs(n, h, d, 0)
    jobs = [("defaults", name) for name in patterns]
    if round_b:
        jobs += [("dkdv", t) for t in FINAL_DKDV.values() if t] + [("dq", t) for t in FINAL_DQ.values() if t]
    elif probe and patterns == ["sink_window"]:
        jobs += [("fwd", t) for t in FWD.values() if t] + [("dkdv", t) for t in DKDV.values() if t] + \
                [("dq", t) for t in DQ.values() if t]
    jobs += [("extra", v[:2]) for v in (extra or {}).values()]
    for i, (stage, tiles) in enumerate(jobs):
        if i % shares != share:
            continue
        try:
            if stage == "extra":
                use(*tiles[1])
                outputs(lambda a, b, c: sparse_attention(a, b, c, PATTERNS[tiles[0]]), q, k, v, do)
            elif stage == "defaults":
                SA.TILE_OVERRIDE.clear()
                outputs(lambda a, b, c: sparse_attention(a, b, c, PATTERNS[tiles]), q, k, v, do)
                Bwd(PATTERNS[tiles], q, k, v, do)  # the delta pass
            elif stage == "fwd":
                use(fwd=tiles)
                with torch.no_grad():
                    sparse_attention(q, k, v, pattern)
            else:
                use(**{stage: tiles})
                outputs(lambda a, b, c: sparse_attention(a, b, c, pattern), q, k, v, do)
            log(f"warm {stage} {tiles}")
        except Exception as err:  # reported again by the timed run
            log(f"warm {stage} {tiles} failed: {str(err).splitlines()[0][:160]}")
    SA.TILE_OVERRIDE.clear()
    log("warm done")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.seq_and_warm_args(parser)
    parser.add_argument("--final", action="store_true", help="defaults of both patterns only")
    parser.add_argument("--no-pick", action="store_true", help="with --final: no backward candidates")
    parser.add_argument("--extra", action="store_true", help="with --final: also time FINAL_EXTRA")
    parser.add_argument("--bwd-kernels", action="store_true",
                        help="with --final --no-pick: still time the FINAL_DKDV / FINAL_DQ kernels alone")
    parser.add_argument("--extras", nargs="*", default=[], help="with --extra: only these FINAL_EXTRA variants")
    parser.add_argument("--profile", action="store_true", help="with --final: cProfile the defaults' host work")
    parser.add_argument("--settle-ms", type=float, default=0.0,
                        help="with --final: forward+backward calls for this long before each N's first timed row")
    parser.add_argument("--flex", action="store_true", help="FlexAttention on --patterns[0] only")
    parser.add_argument("--patterns", nargs="*", default=[])
    parser.add_argument("--go-file", default="")
    parser.add_argument("--next-go", default="", help="with --flex: touched after timing")
    parser.add_argument("--compiled-file", default="", help="with --flex: touched once compiled")
    parser.add_argument("--flex-repeat", action="store_true", help="with --flex: time everything twice")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--skip-dev", action="store_true", help="leave out the variants with kernel-built descriptors")
    parser.add_argument("--json", default="sparse_probe.json")
    args = parser.parse_args(argv)
    if args.skip_dev:
        for table in (FWD, DKDV, DQ, FINAL_DKDV, FINAL_DQ):
            for name in [name for name, tiles in table.items() if tiles and tiles.get("DESC_DEV")]:
                del table[name]
    if args.warm:
        share, shares = (int(x) for x in args.warm.split("/"))
        bwd_candidates = args.final and (not args.no_pick or args.bwd_kernels)
        warm(share, shares, args.warm_seq, args.heads, args.head_dim, args.patterns or list(PATTERNS),
             bwd_candidates, _extras(args) if args.final else {}, not args.final)
        return
    results = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu", "torch": torch.__version__,
               "triton": triton.__version__, "kernels": [], "combos": [], "final": [], "final_extra": [], "flex": [],
               "host_profile": {}, "picks": {}}

    def save():
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.flex:
        flex(args, results, save)
    elif args.final:
        final(args, results, save)
    else:
        probe(args, results, save)
    save()


if __name__ == "__main__":
    main()
