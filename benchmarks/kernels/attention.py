"""Benchmark srl's Triton FlashAttention against torch SDPA backends on one GPU.

Training grid (bf16): B*N = 16k tokens, H*D = 2048, N = 512..16k, D = 64 and 128,
causal and not. Each point times forward and forward+backward for srl's kernel,
SDPA FLASH_ATTENTION and SDPA CUDNN_ATTENTION in the same process. FLOPs follow
the FlashAttention papers: forward 4*B*H*N^2*D (half when causal); backward
2.5x forward (two forward-sized matmul pairs plus recomputing P), so
forward+backward is 3.5x.

Decode grid: one query row (B, H=16, 1, D=128) against KV caches of 1k..128k
keys, batch 1..64; srl's split-KV kernel against SDPA (default dispatch and each
backend that accepts the shape); points whose cache exceeds --max-kv-gib are
skipped.

Times are medians of ``triton.testing.do_bench``. Prints tables and writes JSON.

    python benchmarks/kernels/attention.py --json attention.json
"""

from __future__ import annotations

import argparse
import json
import sys

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
    del q, k, v, do
    torch.cuda.empty_cache()
    return row


def bench_decode_point(batch, n_k, h=16, d=128, dtype=torch.bfloat16):
    gen = torch.Generator(device="cuda").manual_seed(batch * 7 + n_k)
    q = torch.randn(batch, h, 1, d, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(batch, h, n_k, d, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(batch, h, n_k, d, device="cuda", dtype=dtype, generator=gen)
    row = {"B": batch, "H": h, "D": d, "KV": n_k}
    with torch.no_grad():
        ours = flash_decode(q, k, v)
        row["srl_us"] = _median_ms(lambda: flash_decode(q, k, v)) * 1e3
        ref = F.scaled_dot_product_attention(q, k, v)
        row["err_vs_sdpa"] = _rel_err(ours, ref)
        row["sdpa_default_us"] = _median_ms(lambda: F.scaled_dot_product_attention(q, k, v)) * 1e3
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                              ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
            fn = _sdpa(backend)
            try:
                fn(q, k, v, False)
                row[f"sdpa_{name}_us"] = _median_ms(lambda: fn(q, k, v, False)) * 1e3
            except RuntimeError:
                pass
    sdpa = [row[c] for c in row if c.startswith("sdpa_") and c.endswith("_us")]
    row["sdpa_best_us"] = min(sdpa)
    row["speedup_vs_sdpa_default"] = row["sdpa_default_us"] / row["srl_us"]
    row["speedup_vs_sdpa_best"] = row["sdpa_best_us"] / row["srl_us"]
    # memory traffic floor: K and V read once
    row["srl_gbps"] = 2 * k.numel() * k.element_size() / (row["srl_us"] * 1e-6) * 1e-9
    del q, k, v
    torch.cuda.empty_cache()
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
    print("\nDecode latency (us), bf16, q (B, 16, 1, 128), KV cache (B, 16, KV, 128)")
    print(f"{'B':>3} {'KV':>7} | {'srl':>8} {'sdpa':>8} {'best':>8} {'x sdpa':>7} {'x best':>7} {'GB/s':>6}")
    for r in rows:
        print(f"{r['B']:>3} {r['KV']:>7} | {r['srl_us']:>8.1f} {r['sdpa_default_us']:>8.1f} "
              f"{r['sdpa_best_us']:>8.1f} {r['speedup_vs_sdpa_default']:>7.2f} "
              f"{r['speedup_vs_sdpa_best']:>7.2f} {r['srl_gbps']:>6.0f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="attention_benchmark.json")
    ap.add_argument("--seq", type=int, nargs="*", default=[512, 1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--head-dims", type=int, nargs="*", default=[64, 128])
    ap.add_argument("--kv", type=int, nargs="*", default=[1024, 4096, 16384, 65536, 131072])
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 4, 16, 64])
    ap.add_argument("--max-kv-gib", type=float, default=20.0)
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    args = ap.parse_args(argv)

    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "dtype": "bfloat16", "timer": "triton.testing.do_bench median"}
    print(meta)
    training, decode, skipped = [], [], []

    def save():  # after every point, so a run cut short still leaves its numbers
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "training": training, "decode": decode, "decode_skipped": skipped}, f,
                      indent=1)
    if not args.skip_training:
        for d in args.head_dims:
            for causal in (False, True):
                for n in args.seq:
                    training.append(bench_training_point(n, d, causal))
                    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in training[-1].items()},
                          flush=True)
                    save()
        print_training(training)
    if not args.skip_decode:
        for n_k in args.kv:
            for b in args.batch:
                gib = 2 * b * 16 * n_k * 128 * 2 / 2**30
                if gib > args.max_kv_gib:
                    skipped.append({"B": b, "KV": n_k, "kv_gib": gib})
                    continue
                decode.append(bench_decode_point(b, n_k))
                save()
        print_decode(decode)
        if skipped:
            print("skipped (cache over --max-kv-gib):", [(s["B"], s["KV"]) for s in skipped])
    save()


if __name__ == "__main__":
    main()
