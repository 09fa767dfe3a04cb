"""Forward tiles of srl's FlashAttention for the LM's cached calls, against SDPA on the same masks.

Two shapes of the 123.6M policy (12 heads of width 64) decide what generation pays for attention:
the speculative tree pass (1 + k*L query rows over the cache, ``kv_lens`` + ``kv_start`` +
``kv_prefix``) and a batch's prefill (``kv_lens``). Each candidate tile is checked against the
float64 reference, then timed (median of CUDA-event times) beside SDPA with the dense additive
mask that the LM's SDPA path uses. ``--lm`` then sets the fastest tiles and runs
``benchmarks/lm_attention.py`` in the same process, so the end-to-end numbers use them.

    python benchmarks/kernels/attention_tiles.py --lm --json attention_tiles.json
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

fa = importlib.import_module("srl.kernels.flash_attention")  # the module (the package exports the function)
from srl.generation.decode import causal_slot_mask, tree_slot_mask  # noqa: E402

CANDIDATES = [(16, 64, 4, 3), (32, 64, 4, 2), (32, 64, 4, 3), (32, 128, 4, 2), (64, 64, 4, 3), (128, 64, 8, 4),
              (128, 128, 8, 3)]


def _time_us(fn, reps=30) -> float:
    fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return float(np.median(times))


def _case(name: str):
    """(q, k, v, slot mask, additive mask) of one cached call of the 123.6M policy (bf16)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    H, D = 12, 64
    if name.startswith("tree"):
        B, k, L, S = (1, 4, 5, 256) if name == "tree_b1" else (16, 4, 5, 256)
        lens = torch.randint(40, S - 1 - k * L, (B,), device="cuda", generator=g)
        _, _, m = tree_slot_mask(lens, k, L, S)
        T = 1 + k * L
    else:
        B, T, S = 16, 511, 576
        _, m = causal_slot_mask(torch.zeros(B, dtype=torch.long, device="cuda"), T, S)
    q = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    kk = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
    additive = torch.zeros(m.dense.shape, dtype=q.dtype, device="cuda").masked_fill_(~m.dense, float("-inf"))[:, None]
    return q, kk, v, m, additive


def sweep(names: list[str]) -> tuple[list[dict], dict]:
    rows, best = [], {}
    for name in names:
        q, k, v, m, additive = _case(name)
        args = dict(causal=True, kv_lens=m.kv_lens, kv_start=m.kv_start, kv_prefix=m.kv_prefix)
        ref = torch.softmax((q.double() @ k.double().transpose(-1, -2)) / 8 + additive.double(), -1) @ v.double()
        sdpa = _time_us(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=additive))
        table = fa._SHORT_Q_TILES if q.shape[2] <= fa._SHORT_Q else fa._FWD_TILES
        saved = dict(table[64])
        for bm, bn, w, st in CANDIDATES:
            table[64] = fa._tiles(bm, bn, w, st)
            try:
                out = fa.flash_attention(q, k, v, **args)
                err = float((out.double() - ref).norm() / ref.norm())
                us = _time_us(lambda: fa.flash_attention(q, k, v, **args)) if err < 2e-2 else float("nan")
            except Exception as exc:  # noqa: BLE001 - a tile that does not compile is skipped
                err, us = float("nan"), float("nan")
                print(f"{name} {bm}x{bn} w{w} s{st}: {type(exc).__name__}", flush=True)
            rows.append({"case": name, "tile": [bm, bn, w, st], "us": us, "sdpa_us": sdpa, "rel_err": err,
                         "sdpa_over_srl": sdpa / us if us == us else float("nan")})
            print(f"{name:<8} {bm:>3}x{bn:<3} w{w} s{st}  srl {us:8.1f} us  sdpa {sdpa:8.1f} us  "
                  f"x{sdpa / us if us == us else float('nan'):.2f}  err {err:.1e}", flush=True)
        table[64] = saved
        ok = [r for r in rows if r["case"] == name and r["us"] == r["us"]]
        best[name] = min(ok, key=lambda r: r["us"])["tile"] if ok else None
    return rows, best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", nargs="+", default=["tree_b1", "tree_b16", "prefill"])
    p.add_argument("--lm", action="store_true", help="then run benchmarks/lm_attention.py with the best tiles")
    p.add_argument("--json", default=None)
    args, rest = p.parse_known_args()
    rows, best = sweep(args.cases)
    # one short-query tile for both tree cases: the one with the lowest summed time
    short = [c for c in args.cases if c.startswith("tree")]
    if short:
        def total(tile):
            return sum(r["us"] for r in rows if r["case"] in short and r["tile"] == tile)
        tiles = {tuple(r["tile"]) for r in rows if r["case"] in short and r["us"] == r["us"]}
        chosen = min(tiles, key=lambda t: total(list(t)))
        fa._SHORT_Q_TILES[64] = fa._tiles(*chosen)
        best["short_q_chosen"] = list(chosen)
    if "prefill" in best and best["prefill"]:
        fa._FWD_TILES[64] = fa._tiles(*best["prefill"])
    print("chosen:", json.dumps(best), flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "sweep": rows, "chosen": best}
    if args.json:  # written now too: the LM part may be cut short
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    if args.lm:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
        import lm_attention

        sys.argv = [sys.argv[0], *rest, "--json", "/tmp/lm_attention_tuned.json"]
        lm_attention.main()
        result["lm"] = json.load(open("/tmp/lm_attention_tuned.json"))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
