"""Benchmark srl's sparse attention against FlexAttention on the same masks, in the same run.

Prefill (B=1, H=16, D=128, bf16, N = 32k and 128k): forward and forward+backward of
``srl.kernels.sparse_attention`` for LongGen's sink+window (sink 64, window 2048) and
S2-Attention's strided pattern (64-token blocks, 16 local blocks, stride 8), against
``torch.nn.attention.flex_attention`` compiled with block masks built from the same
mask functions (``create_block_mask(..., _compile=True)``, default 128x128 blocks), and srl's
dense causal FlashAttention for the block-count ideal: a kernel as efficient per visible block
as the dense causal one would take dense_time * visible_blocks / causal_blocks (64x64 blocks).

Decode (N = 128k): one query row per head against a sink+window cache (sink + ring buffer of the
window) against srl's dense split-KV decode over the full cache; eager and CUDA-graph medians,
and the KV memory of both caches.

LM (``--lm``): tokens/s of a LongGen hybrid TransformerLM (sparse layers, full attention in the
middle third) against the dense model, training on the text task at 32k context.

Times are medians of CUDA-event timings. Prints tables and writes JSON as it goes.

    PYTHONPATH=. python benchmarks/kernels/sparse_attention.py --json sparse.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import triton

from srl.kernels.flash_attention import flash_attention, flash_decode
from srl.kernels.sparse_attention import S2Strided, SinkWindow, SinkWindowCache, sparse_attention, sparse_decode

from srl.kernels._sparse_patterns import tile_classes

SA = sys.modules["srl.kernels.sparse_attention"]
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run under TRITON_INTERPRET=1
PATTERNS = {"sink_window": SinkWindow(sink=64, window=2048),
            "s2": S2Strided(block=64, local_blocks=16, stride=8)}
T0 = time.perf_counter()


def _t(**kw):
    return dict(kw)


# candidate tiles tried at the first N (forward, then backward), best kept for the rest
FWD_CANDIDATES = {
    "sink_window": [_t(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
                    _t(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, RUNS=True),
                    _t(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4, RUNS=True),
                    _t(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, TMA=True, RUNS=True)],
    "s2": [_t(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
           _t(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, TMA=True),
           _t(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4)]}
BWD_CANDIDATES = {  # (dK/dV tiles, dQ tiles)
    "sink_window": [(_t(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2),
                     _t(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)),
                    (_t(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=3),
                     _t(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3))],
    "s2": [(_t(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2), _t(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)),
           (_t(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3), _t(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3))]}


def log(msg):
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def time_ms(fn, budget_ms=600.0, max_reps=40):
    """Median of per-call CUDA-event times after one warm-up call (wall time on the CPU)."""
    if DEV == "cpu":
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    reps = int(max(3, min(max_reps, budget_ms / max(start.elapsed_time(end), 1e-3))))
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def flex_mask_mod(pattern):
    if isinstance(pattern, SinkWindow):
        def mask(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & ((kv_idx < pattern.sink) | (q_idx - kv_idx < pattern.window))
    else:
        def mask(b, h, q_idx, kv_idx):
            qb, kb = q_idx // pattern.block, kv_idx // pattern.block
            return (kv_idx <= q_idx) & ((qb - kb < pattern.local_blocks) | ((kb + h) % pattern.stride == 0))
    return mask


def block_fraction(pattern, heads, n, block=64):
    """Visible blocks / causal blocks at ``block`` granularity (the block-count ideal's ratio)."""
    classes = tile_classes(pattern, heads, n, n, block, block, DEV)  # (1 or heads, NB, NB)
    nb = classes.shape[-1]
    return ((classes > 0).sum() * heads / classes.shape[0] / (nb * (nb + 1) // 2 * heads)).item()


def grad_errors(ours, theirs, q, k, v, do):
    """Relative differences of O, dQ, dK, dV between two implementations (same inputs)."""
    outs = []
    for impl in (ours, theirs):
        for t in (q, k, v):
            t.grad = None
        o = impl(q, k, v)
        o.backward(do)
        outs.append([o.detach(), q.grad, k.grad, v.grad])
    for t in (q, k, v):
        t.grad = None
    return {f"err_vs_flex_{name}": rel_err(a, b) for name, a, b in zip(("o", "dq", "dk", "dv"), *outs)}


def timed_pair(impl, q, k, v, do):
    """(forward ms, forward+backward ms)."""
    with torch.no_grad():
        t_fwd = time_ms(lambda: impl(q, k, v))

    def step():
        for t in (q, k, v):
            t.grad = None
        impl(q, k, v).backward(do)
    return t_fwd, time_ms(step)


def sweep_tiles(name, pattern, q, k, v, do):
    """Try the candidate tiles on this pattern; keep the fastest forward and backward."""
    rows = []
    best_fwd = (float("inf"), None)
    for cand in FWD_CANDIDATES[name]:
        SA.TILE_OVERRIDE.clear()
        SA.TILE_OVERRIDE["fwd"] = cand
        try:
            with torch.no_grad():
                t = time_ms(lambda: sparse_attention(q, k, v, pattern))
        except Exception as err:  # a tile that does not compile
            print(f"  {name} fwd {cand}: {str(err).splitlines()[0][:120]}", file=sys.stderr)
            continue
        rows.append({"pattern": name, "stage": "fwd", "tiles": cand, "ms": t})
        best_fwd = min(best_fwd, (t, cand), key=lambda x: x[0])
    best_bwd = (float("inf"), None)
    for dkdv, dq in BWD_CANDIDATES[name]:
        SA.TILE_OVERRIDE.update(fwd=best_fwd[1], dkdv=dkdv, dq=dq)
        try:
            _, t = timed_pair(lambda a, b, c: sparse_attention(a, b, c, pattern), q, k, v, do)
        except Exception as err:
            print(f"  {name} bwd {dkdv} {dq}: {str(err).splitlines()[0][:120]}", file=sys.stderr)
            continue
        rows.append({"pattern": name, "stage": "fwd_bwd", "tiles": [dkdv, dq], "ms": t})
        best_bwd = min(best_bwd, (t, (dkdv, dq)), key=lambda x: x[0])
    for r in rows:
        log(f"  sweep {name} {r['stage']} {r['tiles']}: {r['ms']:.3f} ms")
    return {"fwd": best_fwd[1], "dkdv": best_bwd[1][0], "dq": best_bwd[1][1]}, rows


def bench_prefill(n, tiles, flex, results, save, h=16, d=128, dtype=torch.bfloat16):
    gen = torch.Generator(device=DEV).manual_seed(n)
    q, k, v = (torch.randn(1, h, n, d, device=DEV, dtype=dtype, generator=gen).requires_grad_() for _ in range(3))
    do = torch.randn(1, h, n, d, device=DEV, dtype=dtype, generator=gen)
    SA.TILE_OVERRIDE.clear()
    dense = timed_pair(lambda a, b, c: flash_attention(a, b, c, causal=True), q, k, v, do)
    results["prefill"].append({"N": n, "impl": "srl_dense_causal", "fwd_ms": dense[0], "fwd_bwd_ms": dense[1]})
    log(f"N={n} srl dense causal: fwd {dense[0]:.3f} ms, fwd+bwd {dense[1]:.3f} ms")
    for name, pattern in PATTERNS.items():
        if name not in tiles:
            tiles[name], rows = sweep_tiles(name, pattern, q, k, v, do)
            results["sweep"].extend(rows)
        SA.TILE_OVERRIDE.clear()
        SA.TILE_OVERRIDE.update(tiles[name])
        ours = timed_pair(lambda a, b, c: sparse_attention(a, b, c, pattern), q, k, v, do)
        frac = block_fraction(pattern, h, n)
        row = {"N": n, "pattern": name, "tiles": tiles[name], "srl_fwd_ms": ours[0], "srl_fwd_bwd_ms": ours[1],
               "block_fraction": frac,
               "ideal_fwd_ratio": dense[0] * frac / ours[0], "ideal_fwd_bwd_ratio": dense[1] * frac / ours[1]}
        if flex is not None:
            from torch.nn.attention.flex_attention import create_block_mask
            mask = create_block_mask(flex_mask_mod(pattern), None, h, n, n, device="cuda", _compile=True)
            fx = timed_pair(lambda a, b, c: flex(a, b, c, block_mask=mask), q, k, v, do)
            row.update(grad_errors(lambda a, b, c: sparse_attention(a, b, c, pattern),
                                   lambda a, b, c: flex(a, b, c, block_mask=mask), q, k, v, do))
            row.update(flex_fwd_ms=fx[0], flex_fwd_bwd_ms=fx[1], x_flex_fwd=fx[0] / ours[0],
                       x_flex_fwd_bwd=fx[1] / ours[1])
            del mask
        results["prefill"].append(row)
        save()
        log(f"N={n} {name}: " + ", ".join(f"{k_}={v_:.4g}" if isinstance(v_, float) else f"{k_}={v_}"
                                              for k_, v_ in row.items() if k_ not in ("tiles",)))
    SA.TILE_OVERRIDE.clear()


def graph_us(fn):
    if DEV == "cpu":
        return float("nan")
    return triton.testing.do_bench_cudagraph(fn, rep=30, return_mode="median") * 1e3


def bench_decode(n, results, h=16, d=128, dtype=torch.bfloat16):
    pattern = PATTERNS["sink_window"]
    gen = torch.Generator(device=DEV).manual_seed(7)
    k = torch.randn(1, h, n, d, device=DEV, dtype=dtype, generator=gen)
    v = torch.randn(1, h, n, d, device=DEV, dtype=dtype, generator=gen)
    q = torch.randn(1, h, 1, d, device=DEV, dtype=dtype, generator=gen)
    cache = SinkWindowCache(pattern, 1, h, d, max_new=1, device=DEV, dtype=dtype)
    cache.append(k, v)
    from srl.kernels.sparse_attention import sparse_attention_reference
    with torch.no_grad():
        err = rel_err(sparse_decode(q, cache), sparse_attention_reference(q, k, v, pattern))
        row = {"N": n, "err_vs_reference": err,
               "dense_us": time_ms(lambda: flash_decode(q, k, v)) * 1e3,
               "sparse_us": time_ms(lambda: sparse_decode(q, cache)) * 1e3,
               "sparse_1split_us": time_ms(lambda: sparse_decode(q, cache, num_splits=1)) * 1e3,
               "dense_graph_us": graph_us(lambda: flash_decode(q, k, v)),
               "sparse_graph_us": graph_us(lambda: sparse_decode(q, cache)),
               "sparse_1split_graph_us": graph_us(lambda: sparse_decode(q, cache, num_splits=1)),
               "dense_kv_bytes": k.nbytes + v.nbytes, "sparse_kv_bytes": cache.nbytes}
    row["x_eager"] = row["dense_us"] / min(row["sparse_us"], row["sparse_1split_us"])
    row["x_graph"] = row["dense_graph_us"] / min(row["sparse_graph_us"], row["sparse_1split_graph_us"])
    row["kv_reduction"] = 1 - row["sparse_kv_bytes"] / row["dense_kv_bytes"]
    results["decode"].append(row)
    log("decode: " + ", ".join(f"{k_}={v_:.4g}" for k_, v_ in row.items()))


def bench_lm(n, steps, results, save, layers=6, d_model=1024, heads=8, tiles=None):
    """Tokens/s of LongGen hybrid vs dense TransformerLM training on the text task at N tokens.

    ``tiles``: model name -> sparse kernel tiles (``TILE_OVERRIDE``) for that model, if given."""
    import importlib.util
    import os

    import numpy as np

    def load(name, *parts):
        """One srl module by path: the packages srl.envs and srl.policies import gymnasium."""
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "srl", *parts)
        spec = importlib.util.spec_from_file_location(name, path)
        module = sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    text, lm = load("_srl_text_task", "envs", "text.py"), load("_srl_lm", "policies", "lm.py")
    SortTask, Vocab, LMConfig, TransformerLM = text.SortTask, text.Vocab, lm.LMConfig, lm.TransformerLM
    vocab = 64 * triton.cdiv(len(Vocab()), 64)
    tokens = SortTask(length=8).stream(1, n + 1, np.random.default_rng(0)).to(DEV)
    for name, attention in (("dense", {}), ("longgen_sink_window", {"pattern": "sink_window", "sink": 64,
                                                                     "window": 2048, "hybrid": True}),
                            ("longgen_s2", {"pattern": "s2", "block": 64, "local_blocks": 16, "stride": 8,
                                            "hybrid": True})):
        torch.manual_seed(0)
        SA.TILE_OVERRIDE.clear()
        SA.TILE_OVERRIDE.update((tiles or {}).get(name, {}))
        cfg = LMConfig(vocab_size=vocab, d_model=d_model, n_layers=layers, n_heads=heads, max_seq_len=n,
                       attention=attention)
        model = TransformerLM(cfg).to(DEV)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
        losses, times = [], []
        for _ in range(steps):
            sync()
            t0 = time.perf_counter()
            with torch.autocast(DEV, dtype=torch.bfloat16):
                logits = model(tokens[:, :-1])
                loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
        step_s = statistics.median(times[2:] or times)
        SA.TILE_OVERRIDE.clear()
        row = {"model": name, "N": n, "layers": layers, "d_model": d_model, "heads": heads, "steps": steps,
               "tiles": (tiles or {}).get(name),
               "step_s": step_s, "tokens_per_s": n / step_s, "loss_first": losses[0], "loss_last": losses[-1]}
        results["lm"].append(row)
        save()
        log("lm: " + ", ".join(f"{k_}={v_:.4g}" if isinstance(v_, float) else f"{k_}={v_}" for k_, v_ in row.items()))
        del model, opt
        if DEV == "cuda":
            torch.cuda.empty_cache()


def seq_and_warm_args(parser):
    """--seq, and --warm / --warm-seq of the sweep and the probe (compile in K processes first)."""
    parser.add_argument("--seq", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--warm", default="", help="I/K: compile share I of K at --warm-seq, time nothing")
    parser.add_argument("--warm-seq", type=int, default=4096)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--decode-seq", type=int, default=131072)
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--skip-prefill", action="store_true")
    parser.add_argument("--lm", action="store_true", help="also train the LongGen hybrid LM against dense")
    parser.add_argument("--lm-seq", type=int, default=32768)
    parser.add_argument("--lm-steps", type=int, default=8)
    parser.add_argument("--lm-layers", type=int, default=6)
    parser.add_argument("--lm-dim", type=int, default=1024)
    parser.add_argument("--lm-heads", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--json", default="sparse_attention.json")
    args = parser.parse_args(argv)
    results = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu",
               "torch": torch.__version__, "triton": triton.__version__,
               "prefill": [], "sweep": [], "decode": [], "lm": []}

    def save():
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    flex = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention
        flex = torch.compile(flex_attention, dynamic=False)
    dtype = getattr(torch, args.dtype)
    if args.decode_seq:
        bench_decode(args.decode_seq, results, args.heads, args.head_dim, dtype)
        save()
    tiles = {}
    if not args.skip_prefill:
        for n in args.seq:
            bench_prefill(n, tiles, flex, results, save, args.heads, args.head_dim, dtype)
    if args.lm:
        bench_lm(args.lm_seq, args.lm_steps, results, save, args.lm_layers, args.lm_dim, args.lm_heads)


if __name__ == "__main__":
    main()
