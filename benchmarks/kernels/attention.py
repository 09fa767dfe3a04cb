"""Benchmark srl's Triton FlashAttention against torch SDPA backends on one GPU.

Training grid (bf16): B*N = 16k tokens, H*D = 2048, N = 512..16k, D = 64 and 128,
causal and not. Each point times forward and forward+backward for srl's kernel,
SDPA FLASH_ATTENTION and SDPA CUDNN_ATTENTION in the same process. FLOPs follow
the FlashAttention papers: forward 4*B*H*N^2*D (half when causal); backward
2.5x forward (two forward-sized matmul pairs plus recomputing P), so
forward+backward is 3.5x.

Decode grid: one query row (B, H, 1, D=128) against KV caches (B, H_kv, KV, 128)
of 1k..128k keys, batch 1..64, for MHA (H = H_kv = 16) and GQA (H = 32, H_kv = 8);
srl's split-KV kernel against SDPA (default dispatch and each backend that
accepts the shape), timed eagerly and as CUDA-graph replays (device time only:
what a decode loop captured in a graph pays), plus the host time of one eager call
(srl and default SDPA). Points whose cache exceeds --max-kv-gib are skipped.

Times are medians of ``triton.testing.do_bench``. Prints tables and writes JSON.

    python benchmarks/kernels/attention.py --json attention.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from srl.kernels.flash_attention import flash_attention, flash_decode

TOKENS = 16 * 1024
HIDDEN = 2048


def attention_flops(b, h, n_q, n_k, d, causal, mode):
    """4*B*H*Nq*Nk*D forward, halved when causal; backward is 2.5x forward."""
    fwd = 4.0 * b * h * n_q * n_k * d * (0.5 if causal else 1.0)
    return {"fwd": fwd, "fwd_bwd": 3.5 * fwd}[mode]


def _sdpa(backend):
    def fn(q, k, v, causal):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return fn


IMPLS = {
    "srl": lambda q, k, v, causal: flash_attention(q, k, v, causal=causal),
    "sdpa_flash": _sdpa(SDPBackend.FLASH_ATTENTION),
    "sdpa_cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION),
}


def _median_ms(fn, grad_to_none=None):
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench_training_point(n, d, causal, dtype=torch.bfloat16):
    b, h = TOKENS // n, HIDDEN // d
    gen = torch.Generator(device="cuda").manual_seed(n * 1000 + d)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype, generator=gen).requires_grad_()
               for _ in range(3))
    do = torch.randn(b, h, n, d, device="cuda", dtype=dtype, generator=gen)
    row = {"B": b, "H": h, "N": n, "D": d, "causal": causal}
    ref = None
    for name, impl in IMPLS.items():
        try:
            with torch.no_grad():
                out = impl(q, k, v, causal)
            if ref is None:
                ref = out
            else:
                row[f"err_{name}_vs_srl"] = _rel_err(out, ref)
            t_fwd = _median_ms(lambda: impl(q, k, v, causal))

            def step():
                impl(q, k, v, causal).backward(do)
            t_all = _median_ms(step, grad_to_none=[q, k, v])
        except RuntimeError as err:  # backend refuses the shape
            print(f"  {name} failed at N={n} D={d} causal={causal}: {str(err).splitlines()[0]}", file=sys.stderr)
            continue
        row[f"{name}_fwd_ms"] = t_fwd
        row[f"{name}_fwd_bwd_ms"] = t_all
        row[f"{name}_fwd_tflops"] = attention_flops(b, h, n, n, d, causal, "fwd") / t_fwd * 1e-9
        row[f"{name}_fwd_bwd_tflops"] = attention_flops(b, h, n, n, d, causal, "fwd_bwd") / t_all * 1e-9
    for base in ("sdpa_flash", "sdpa_cudnn"):
        for mode in ("fwd", "fwd_bwd"):
            if f"{base}_{mode}_tflops" in row and f"srl_{mode}_tflops" in row:
                row[f"{mode}_vs_{base}"] = row[f"srl_{mode}_tflops"] / row[f"{base}_{mode}_tflops"]
    return row


def _graph_us(fn):
    """Device time of fn replayed from a CUDA graph (what a decode loop under graphs pays)."""
    return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3


def _host_us(fn, calls=300):
    """Host (Python + launch) time per call: calls queued without synchronising."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return host


def bench_decode_point(batch, n_k, h=16, h_kv=16, d=128, dtype=torch.bfloat16):
    gen = torch.Generator(device="cuda").manual_seed(batch * 7 + n_k)
    q = torch.randn(batch, h, 1, d, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(batch, h_kv, n_k, d, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(batch, h_kv, n_k, d, device="cuda", dtype=dtype, generator=gen)
    gqa = h != h_kv
    row = {"B": batch, "H": h, "H_kv": h_kv, "D": d, "KV": n_k}

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)

    def ours():
        return flash_decode(q, k, v)

    with torch.no_grad():
        row["err_vs_sdpa"] = _rel_err(ours(), sdpa())
        row["srl_us"] = _median_ms(ours) * 1e3
        row["srl_graph_us"] = _graph_us(ours)
        row["sdpa_default_us"] = _median_ms(sdpa) * 1e3
        row["sdpa_default_graph_us"] = _graph_us(sdpa)
        row["srl_host_us"] = _host_us(ours)
        row["sdpa_default_host_us"] = _host_us(sdpa)
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                              ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
            def one(backend=backend):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
            try:
                one()
                row[f"sdpa_{name}_us"] = _median_ms(one) * 1e3
                row[f"sdpa_{name}_graph_us"] = _graph_us(one)
            except RuntimeError:
                pass
    for mode in ("", "_graph"):
        sdpa_t = [row[c] for c in row if c.startswith("sdpa_") and c.endswith(f"{mode}_us")
                  and (mode or not c.endswith(("_graph_us", "_host_us")))]
        row[f"sdpa_best{mode}_us"] = min(sdpa_t)
        row[f"speedup{mode}_vs_sdpa_default"] = row[f"sdpa_default{mode}_us"] / row[f"srl{mode}_us"]
        row[f"speedup{mode}_vs_sdpa_best"] = row[f"sdpa_best{mode}_us"] / row[f"srl{mode}_us"]
    # K and V read once: the memory floor
    row["srl_graph_gbps"] = 2 * k.numel() * k.element_size() / (row["srl_graph_us"] * 1e-6) * 1e-9
    return row


def _fmt(x, spec=".0f"):
    return "-" if x is None else format(x, spec)


def print_training(rows):
    print("\nTFLOP/s, bf16, B*N=16k, H*D=2048 (fwd | fwd+bwd); ratio = srl / SDPA backend")
    print(f"{'D':>4} {'causal':>6} {'N':>6} | {'srl':>5} {'flash':>5} {'cudnn':>5} {'x fl':>5} {'x cu':>5} |"
          f" {'srl':>5} {'flash':>5} {'cudnn':>5} {'x fl':>5} {'x cu':>5}")
    for r in rows:
        g = r.get
        print(f"{r['D']:>4} {str(r['causal']):>6} {r['N']:>6} | "
              f"{_fmt(g('srl_fwd_tflops')):>5} {_fmt(g('sdpa_flash_fwd_tflops')):>5} "
              f"{_fmt(g('sdpa_cudnn_fwd_tflops')):>5} {_fmt(g('fwd_vs_sdpa_flash'), '.2f'):>5} "
              f"{_fmt(g('fwd_vs_sdpa_cudnn'), '.2f'):>5} | "
              f"{_fmt(g('srl_fwd_bwd_tflops')):>5} {_fmt(g('sdpa_flash_fwd_bwd_tflops')):>5} "
              f"{_fmt(g('sdpa_cudnn_fwd_bwd_tflops')):>5} {_fmt(g('fwd_bwd_vs_sdpa_flash'), '.2f'):>5} "
              f"{_fmt(g('fwd_bwd_vs_sdpa_cudnn'), '.2f'):>5}")


def print_decode(rows):
    print("\nDecode latency (us), bf16, q (B, H, 1, 128) against a KV cache (B, H_kv, KV, 128);"
          " eager, CUDA-graph replay, host time per eager call; x = SDPA time / srl time")
    print(f"{'H/Hkv':>6} {'B':>3} {'KV':>7} | {'srl':>7} {'sdpa':>7} {'best':>7} {'x sdpa':>6} {'x best':>6} |"
          f" {'srl':>7} {'sdpa':>7} {'best':>7} {'x sdpa':>6} {'x best':>6} {'GB/s':>5} |"
          f" {'srl':>6} {'sdpa':>6}")
    for r in rows:
        print(f"{r['H']:>3}/{r['H_kv']:<2} {r['B']:>3} {r['KV']:>7} | {r['srl_us']:>7.1f} {r['sdpa_default_us']:>7.1f}"
              f" {r['sdpa_best_us']:>7.1f} {r['speedup_vs_sdpa_default']:>6.2f} {r['speedup_vs_sdpa_best']:>6.2f} |"
              f" {r['srl_graph_us']:>7.1f} {r['sdpa_default_graph_us']:>7.1f} {r['sdpa_best_graph_us']:>7.1f}"
              f" {r['speedup_graph_vs_sdpa_default']:>6.2f} {r['speedup_graph_vs_sdpa_best']:>6.2f}"
              f" {r['srl_graph_gbps']:>5.0f} | {r['srl_host_us']:>6.1f} {r['sdpa_default_host_us']:>6.1f}")


SWEEP_TILES = {
    # fwd entries may carry flags: (BLOCK_M, BLOCK_N, warps, stages, LAZY_RESCALE, WARP_SPEC, TMA)
    "fwd": [(128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 8, 3, True, False), (128, 64, 8, 4, True, False),
            (128, 128, 8, 3, True, False), (128, 64, 8, 3, False, True), (128, 64, 8, 3, True, True),
            (128, 128, 8, 3, False, True), (128, 128, 8, 2, True, True), (128, 128, 8, 2),
            (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3),
            (128, 128, 8, 3, False, False, True), (128, 64, 8, 3, False, False, True),
            (128, 128, 8, 2, False, False, True), (128, 64, 8, 4, False, False, True),
            (128, 128, 8, 3, False, True, True), (128, 64, 8, 3, True, False, True),
            (128, 128, 8, 2, True, False, True), (128, 64, 8, 3, False, True, True)],
    "dkdv": [(64, 128, 8, 3), (64, 128, 8, 2), (32, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 3),
             (64, 128, 4, 3), (128, 128, 8, 2), (32, 128, 8, 3)],
    "dq": [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (128, 128, 8, 2), (128, 32, 4, 3),
           (64, 128, 8, 3), (64, 32, 4, 3)],
}


def sweep_point(n, d, causal, kernels=("fwd", "dkdv", "dq"), dtype=torch.bfloat16):
    """Time each candidate tile of each kernel (the others at their table values)."""
    fa = importlib.import_module("srl.kernels.flash_attention")  # the module: srl.kernels.flash_attention is the function

    tables = {"fwd": fa._FWD_TILES, "dkdv": fa._DKDV_TILES, "dq": fa._DQ_TILES}
    b, h = TOKENS // n, HIDDEN // d
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype).requires_grad_() for _ in range(3))
    do = torch.randn_like(q)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    out = {}
    cudnn_ms = _sdpa_cudnn_fwd_ms(q, k, v, causal) if "fwd" in kernels else None
    for kernel in kernels:
        cands = SWEEP_TILES[kernel]
        table = tables[kernel]
        keep = dict(table[d])
        results = []
        for cand in cands:
            bm, bn, w, st = cand[:4]
            flags = dict(zip(("LAZY_RESCALE", "WARP_SPEC", "TMA"), cand[4:]))
            table[d] = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st, **flags}
            if flags.get("TMA") and fa._tma_descriptors(q, k, v, q, bm, bn) is None:
                print(f"  {kernel} {cand}: the inputs do not qualify for TMA; this times the pointer path")
            try:
                if kernel == "fwd":
                    with torch.no_grad():
                        err = _rel_err(flash_attention(q, k, v, causal=causal), ref)
                    t = _median_ms(lambda: flash_attention(q, k, v, causal=causal))
                else:
                    flash_attention(q, k, v, causal=causal).backward(do)
                    err = 0.0
                    t = _median_ms(lambda: flash_attention(q, k, v, causal=causal).backward(do),
                                   grad_to_none=[q, k, v])
            except Exception as e:  # out of resources, compile failure
                print(f"  {kernel} {cand} failed: {type(e).__name__}: {str(e)[:100]}")
                continue
            results.append((cand, t, err))
        table[d] = keep
        results.sort(key=lambda r: r[1])
        out[kernel] = [{"tiles": r[0], "ms": r[1], "err": r[2]} for r in results]
        base = cudnn_ms if kernel == "fwd" else None
        print(f"sweep D={d} N={n} causal={causal} {kernel}: " +
              ", ".join(f"{r[0]}={r[1]:.3f}ms{_vs_cudnn(base, r[1])} err {r[2]:.1e}" for r in results), flush=True)
    return {"N": n, "D": d, "causal": causal, "sdpa_cudnn_fwd_ms": cudnn_ms, "results": out}


def _vs_cudnn(cudnn_ms, ms):
    return "" if cudnn_ms is None else f" (x cudnn {cudnn_ms / ms:.2f})"


def _sdpa_cudnn_fwd_ms(q, k, v, causal):
    """cuDNN's forward time on the same inputs (None if it refuses them), for the ratios a sweep prints."""
    try:
        return _median_ms(lambda: IMPLS["sdpa_cudnn"](q, k, v, causal))
    except RuntimeError as err:
        print(f"  sdpa_cudnn failed: {str(err).splitlines()[0]}", file=sys.stderr)
        return None


def sweep_decode(points=((1, 1024, 16, 16), (16, 1024, 16, 16), (1, 16384, 16, 16), (1, 131072, 16, 16),
                         (16, 1024, 32, 8), (16, 16384, 32, 8), (1, 131072, 32, 8), (4, 65536, 16, 16))):
    """CUDA-graph time of the decode kernel per split target and tile."""
    import srl.kernels._flash_decode as dec

    out = []
    keep_waves, keep_tiles = dec._WAVES, dict(dec._DECODE_TILES[128])
    for b, n_k, h, h_kv in points:
        q = torch.randn(b, h, 1, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, h_kv, n_k, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        with torch.no_grad():
            sdpa = _graph_us(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=h != h_kv))
            res = []
            for waves in (1, 2, 4, 8):
                for bn, w, st in ((64, 4, 3), (128, 4, 3), (128, 8, 3), (64, 4, 4), (128, 4, 4), (256, 8, 3), (32, 4, 4)):
                    dec._WAVES = waves
                    dec._DECODE_TILES[128] = {"BLOCK_N": bn, "num_warps": w, "num_stages": st}
                    try:
                        res.append(((waves, bn, w, st), _graph_us(lambda: flash_decode(q, k, v))))
                    except Exception as e:
                        print(f"  decode {(waves, bn, w, st)} failed: {type(e).__name__}")
        dec._WAVES, dec._DECODE_TILES[128] = keep_waves, dict(keep_tiles)
        res.sort(key=lambda r: r[1])
        with torch.no_grad():
            host = {"srl": _host_us(lambda: flash_decode(q, k, v)),
                    "sdpa": _host_us(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=h != h_kv))}
        print(f"decode sweep B={b} KV={n_k} H={h}/{h_kv}: host us per call {host}; sdpa {sdpa:.1f}us; " +
              ", ".join(f"{r[0]}={r[1]:.1f}" for r in res[:6]), flush=True)
        out.append({"B": b, "KV": n_k, "H": h, "H_kv": h_kv, "sdpa_graph_us": sdpa, "host_us": host,
                    "results": [{"cfg": r[0], "us": r[1]} for r in res]})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="attention_benchmark.json")
    ap.add_argument("--seq", type=int, nargs="*", default=[512, 1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--head-dims", type=int, nargs="*", default=[64, 128])
    ap.add_argument("--kv", type=int, nargs="*", default=[1024, 4096, 16384, 65536, 131072])
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 4, 16, 64])
    ap.add_argument("--max-kv-gib", type=float, default=24.0)
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--sweep-kernels", nargs="*", default=["fwd", "dkdv", "dq"])
    ap.add_argument("--sweep-decode", action="store_true")
    ap.add_argument("--sweep", nargs="*", default=[], metavar="D:N:causal",
                    help="time candidate tiles at these points (e.g. 128:4096:1) instead of the grid")
    args = ap.parse_args(argv)

    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "dtype": "bfloat16", "timer": "triton.testing.do_bench median"}
    print(meta)
    training, decode, skipped = [], [], []
    if args.sweep or args.sweep_decode:
        sweeps = []
        for spec in args.sweep:
            d, n, causal = (int(x) for x in spec.split(":"))
            sweeps.append(sweep_point(n, d, bool(causal), kernels=args.sweep_kernels))
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "sweep": sweeps}, f, indent=1)
        if args.sweep_decode:
            sweeps.append(sweep_decode())
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "sweep": sweeps}, f, indent=1)
        return

    def save():  # after every point, so a run cut short still leaves its numbers
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "training": training, "decode": decode, "decode_skipped": skipped}, f,
                      indent=1)
    if not args.skip_training:
        for d in args.head_dims:
            for causal in (False, True):
                for n in args.seq:
                    training.append(bench_training_point(n, d, causal))
                    torch.cuda.empty_cache()
                    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in training[-1].items()},
                          flush=True)
                    save()
        print_training(training)
    if not args.skip_decode:
        for h, h_kv in ((16, 16), (32, 8)):
            for n_k in args.kv:
                for b in args.batch:
                    gib = 2 * b * h_kv * n_k * 128 * 2 / 2**30
                    if gib > args.max_kv_gib:
                        skipped.append({"B": b, "H": h, "H_kv": h_kv, "KV": n_k, "kv_gib": gib})
                        continue
                    decode.append(bench_decode_point(b, n_k, h=h, h_kv=h_kv))
                    torch.cuda.empty_cache()
                    save()
        print_decode(decode)
        if skipped:
            print("skipped (cache over --max-kv-gib):", [(s["H"], s["H_kv"], s["B"], s["KV"]) for s in skipped])
    save()


if __name__ == "__main__":
    main()
