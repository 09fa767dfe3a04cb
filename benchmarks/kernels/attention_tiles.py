"""Paths and tiles of srl's FlashAttention for the LM's calls, against SDPA on the same inputs.

The 123.6M policy of ``benchmarks/lm_attention.py`` (12 heads of width 64, bf16), two kinds of call:

- ``tree_k{1,4}_b{1,16}``: the speculative tree pass, 1 + k*L query rows (L = 5) over the sampler's
  256-slot cache with per-row lengths (32..160 filled), per-token starts and a shared prefix, int64
  indices as the samplers make them. Device time per call inside one CUDA graph of 12 calls, one
  per layer each on its own cache (what the graphed speculative iteration pays). Paths: ``sdpa``
  (the dense additive mask, the LM's SDPA side); ``main_cast`` (the forward kernel with the indices
  converted to int32 on every call, as before); ``main`` (the forward kernel reading int64 indices,
  tile swept); ``decode`` (the split-KV kernel, key tile and number of splits swept).
- ``train``: the causal B16 x T512 forward and backward, in the LM's (B, T, 3, H, D) layout; each
  kernel's tile swept with the others at the committed tile; SDPA (default backend) beside it.

Every candidate is checked against a float64 reference before it is timed. ``--warm N`` first
compiles every candidate in N processes (Triton's disk cache), so the sweep itself only loads them.

    python benchmarks/kernels/attention_tiles.py --warm 12 --json attention_tiles.json
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib
import json
import multiprocessing
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bare_imports import bare_packages  # noqa: E402

bare_packages("srl.envs", "srl.policies")  # the GPU image has no gymnasium
import triton  # noqa: E402
from attention import _host_us as host_us  # noqa: E402 - benchmarks/kernels/ is on sys.path when run
fa = importlib.import_module("srl.kernels.flash_attention")  # the module (the package exports the function)
dec = importlib.import_module("srl.kernels._flash_decode")

DEV = "cuda"
H, D, L, LAYERS = 12, 64, 5, 12
TREE = {"tree_k1_b1": (1, 1), "tree_k4_b1": (1, 4), "tree_k1_b16": (16, 1), "tree_k4_b16": (16, 4)}
MAIN_TILES = [(16, 64, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2)]
DECODE_TILES = [(32, 4, 2), (64, 4, 2), (128, 4, 2), (64, 2, 2)]  # BLOCK_N, warps, stages
SPLITS = [1, 2, 4]
FWD_TILES = [(128, 64, 8, 4), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3)]
# dK/dV: (BLOCK_M query step, BLOCK_N keys owned, warps, stages); dQ: (BLOCK_M queries owned, BLOCK_N key step, ...)
DKDV_TILES = [(64, 64, 4, 3), (32, 128, 4, 3), (32, 64, 4, 3), (64, 128, 8, 3), (16, 128, 4, 3)]
DQ_TILES = [(64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3), (128, 64, 4, 3)]


# --------------------------------------------------------------------------- inputs
def tree_case(B: int, k: int, seed: int = 0) -> dict:
    from srl.generation.decode import tree_slot_mask

    g = torch.Generator(device=DEV).manual_seed(seed)
    S, T = 256, 1 + k * L
    lens = torch.randint(32, 161, (B,), device=DEV, generator=g)
    _, _, m = tree_slot_mask(lens, k, L, S)
    q = torch.randn(B, T, 3, H, D, device=DEV, generator=g).to(torch.bfloat16)[:, :, 0].transpose(1, 2)
    kv = [tuple(torch.randn(B, H, S, D, device=DEV, generator=g).to(torch.bfloat16) for _ in range(2))
          for _ in range(LAYERS)]
    additive = torch.zeros(m.dense.shape, device=DEV, dtype=q.dtype).masked_fill_(~m.dense, float("-inf"))
    return {"q": q, "kv": kv, "mask": m, "additive": additive[:, None]}


def tree_call(c: dict, path: str, tile, splits=None):
    """fn(layer) -> output of one tree-pass call on ``path`` with ``tile``."""
    q, m, scale = c["q"], c["mask"], D ** -0.5
    if path == "sdpa":
        return lambda i: F.scaled_dot_product_attention(q, *c["kv"][i], attn_mask=c["additive"])
    if path == "decode":
        bn, w, st = tile
        dec._DECODE_TILES[D] = {"BLOCK_N": bn, "num_warps": w, "num_stages": st}
        return lambda i: dec._decode_launch(q, *c["kv"][i], True, scale, m.kv_lens, m.kv_start, m.kv_prefix, splits)
    fa._SHORT_Q_TILES[D] = fa._tiles(*tile)
    if path == "main_cast":
        return lambda i: fa._forward(q, *c["kv"][i], True, scale, m.kv_start.int(), m.kv_lens.int(),
                                     m.kv_prefix.int())[0]
    return lambda i: fa._forward(q, *c["kv"][i], True, scale, m.kv_start, m.kv_lens, m.kv_prefix)[0]


def tree_candidates():
    for name in TREE:
        yield name, "sdpa", None, None
        yield name, "main_cast", (32, 64, 4, 2), None
        for tile in MAIN_TILES:
            yield name, "main", tile, None
        for tile in DECODE_TILES:
            for splits in SPLITS:
                yield name, "decode", tile, splits


def train_case(seed: int = 0) -> dict:
    g = torch.Generator(device=DEV).manual_seed(seed)
    B, T = 16, 512
    qkv = torch.randn(B, T, 3, H, D, device=DEV, generator=g).to(torch.bfloat16)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    do = torch.randn(B, H, T, D, device=DEV, generator=g).to(torch.bfloat16)
    return {"q": q, "k": k, "v": v, "do": do}


def train_candidates():
    base = (FWD_TILES[0], DKDV_TILES[0], DQ_TILES[0])
    yield "train", "sdpa", base
    for t in FWD_TILES:
        yield "train", "fwd", (t, base[1], base[2])
    for t in DKDV_TILES[1:]:
        yield "train", "dkdv", (base[0], t, base[2])
    for t in DQ_TILES[1:]:
        yield "train", "dq", (base[0], base[1], t)


def set_train_tiles(tiles) -> None:
    fa._FWD_TILES[D], fa._DKDV_TILES[D], fa._DQ_TILES[D] = (fa._tiles(*t) for t in tiles)


# --------------------------------------------------------------------------- timing
def graph_us(fn_layer) -> float:
    """Device time per call: LAYERS calls (one per layer, each on its own cache) replayed from one CUDA graph."""
    calls = lambda: [fn_layer(i) for i in range(LAYERS)]  # noqa: E731
    return triton.testing.do_bench_cudagraph(calls, rep=20, return_mode="median") * 1e3 / LAYERS


def event_us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median") * 1e3


def tree_reference(c: dict) -> torch.Tensor:
    q, (k, v) = c["q"].double(), c["kv"][0]
    s = q @ k.double().transpose(-1, -2) * D ** -0.5 + c["additive"].double()
    return torch.softmax(s, -1) @ v.double()


def rel_err(out, ref) -> float:
    return float((out.detach().double() - ref.detach()).norm() / ref.detach().norm())


# --------------------------------------------------------------------------- sweeps
def sweep_tree(out: list, deadline: float) -> None:
    saved = dict(fa._SHORT_Q_TILES), dict(dec._DECODE_TILES)
    try:
        _sweep_tree(out, deadline)
    finally:
        fa._SHORT_Q_TILES.update(saved[0])
        dec._DECODE_TILES.update(saved[1])


def _sweep_tree(out: list, deadline: float) -> None:
    cases = {}
    for name, path, tile, splits in tree_candidates():
        if time.time() > deadline:
            print("tree sweep: out of time", flush=True)
            return
        if name not in cases:
            cases = {name: tree_case(*TREE[name])}
            cases["ref"] = tree_reference(cases[name])
        c = cases[name]
        row = {"case": name, "path": path, "tile": tile, "splits": splits, "rows": c["q"].shape[2]}
        try:
            fn = tree_call(c, path, tile, splits)
            row["rel_err"] = rel_err(fn(0), cases["ref"])
            row["us"] = graph_us(fn) if row["rel_err"] < 2e-2 else float("nan")
        except Exception as exc:  # noqa: BLE001 - a tile that does not compile is recorded and skipped
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        out.append(row)
        print(json.dumps(row), flush=True)


def train_times(c: dict, path: str, tiles) -> dict:
    q, k, v, do, scale = c["q"], c["k"], c["v"], c["do"], D ** -0.5
    if path == "sdpa":
        with torch.no_grad():
            fwd = event_us(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        total = event_us(lambda: F.scaled_dot_product_attention(*leaves, is_causal=True).backward(do))
        return {"fwd_us": fwd, "bwd_us": total - fwd, "total_us": total}
    set_train_tiles(tiles)
    o, lse = fa._forward(q, k, v, True, scale)
    ref = fa.attention_reference(q.double(), k.double(), v.double(), causal=True)
    err = rel_err(o, ref)
    if err > 2e-2:
        return {"rel_err": err}
    fwd = event_us(lambda: fa._forward(q, k, v, True, scale))
    bwd = event_us(lambda: fa._backward(do, q, k, v, o, lse, True, scale))
    return {"rel_err": err, "fwd_us": fwd, "bwd_us": bwd, "total_us": fwd + bwd}


def sweep_train(out: list, deadline: float) -> None:
    c = train_case()
    for name, path, tiles in train_candidates():
        if time.time() > deadline:
            print("train sweep: out of time", flush=True)
            return
        row = {"case": name, "path": path, "tiles": tiles}
        try:
            row.update(train_times(c, path, tiles))
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        out.append(row)
        print(json.dumps(row), flush=True)
    set_train_tiles((FWD_TILES[0], DKDV_TILES[0], DQ_TILES[0]))


def checks_and_host(out: dict) -> None:
    """int64 starts through the forward and backward kernels (GPU compile and values), and the
    host time per call of the wrapper against SDPA (eager)."""
    g = torch.Generator(device=DEV).manual_seed(3)
    q, k, v = (torch.randn(2, 4, 300, 64, device=DEV, generator=g).to(torch.bfloat16).requires_grad_()
               for _ in range(3))
    start = torch.randint(0, 200, (2, 300), device=DEV, generator=g)
    o = fa.flash_attention(q, k, v, causal=True, kv_start=start)
    do = torch.randn_like(o)
    o.backward(do)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = fa.attention_reference(*leaves, causal=True, kv_start=start)
    ref.backward(do.double())
    got, want = (o, q.grad, k.grad, v.grad), (ref, *(t.grad for t in leaves))
    out["int64_start_rel_err"] = {n: rel_err(a, b) for n, a, b in zip(("o", "dq", "dk", "dv"), got, want)}
    c = tree_case(16, 4)
    m = c["mask"]
    k0, v0 = c["kv"][0]
    host = {"srl_tree": host_us(lambda: fa.flash_attention(c["q"], k0, v0, causal=True, kv_lens=m.kv_lens,
                                                            kv_start=m.kv_start, kv_prefix=m.kv_prefix)),
            "sdpa_tree": host_us(lambda: F.scaled_dot_product_attention(c["q"], k0, v0, attn_mask=c["additive"]))}
    t = train_case()
    with torch.no_grad():
        host["srl_train_fwd"] = host_us(lambda: fa.flash_attention(t["q"], t["k"], t["v"], causal=True))
        host["sdpa_train_fwd"] = host_us(lambda: F.scaled_dot_product_attention(t["q"], t["k"], t["v"],
                                                                                is_causal=True))
    out["host_us"] = host
    print(json.dumps({k: out[k] for k in ("int64_start_rel_err", "host_us")}), flush=True)


# --------------------------------------------------------------------------- compile ahead
def _warm(jobs: list) -> int:
    """Run each candidate once (compiles it into Triton's disk cache); returns how many ran."""
    done, cases = 0, {}
    for job in jobs:
        try:
            if job[0] == "train":
                c = cases.setdefault("train", train_case())
                if job[1] != "sdpa":
                    set_train_tiles(job[2])
                    o, lse = fa._forward(c["q"], c["k"], c["v"], True, D ** -0.5)
                    fa._backward(c["do"], c["q"], c["k"], c["v"], o, lse, True, D ** -0.5)
            elif job[0] == "checks":
                checks_and_host({})
            else:
                name, path, tile, splits = job
                c = cases.setdefault(name, tree_case(*TREE[name]))
                tree_call(c, path, tile, splits)(0)
            torch.cuda.synchronize()
            done += 1
        except Exception as exc:  # noqa: BLE001 - the sweep records the failure
            print(f"warm {job}: {type(exc).__name__}", flush=True)
    return done


def warm(workers: int) -> None:
    jobs = [j for j in tree_candidates() if j[1] != "sdpa"] + list(train_candidates()) + [("checks",)]
    chunks = [jobs[i::workers] for i in range(workers)]
    ctx = multiprocessing.get_context("spawn")
    t0 = time.time()
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        done = sum(pool.map(_warm, chunks))
    print(f"warm: {done}/{len(jobs)} candidates compiled in {time.time() - t0:.1f} s", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--warm", type=int, default=0, help="compile the candidates first in this many processes")
    p.add_argument("--budget-s", type=float, default=70.0, help="stop starting new candidates after this")
    p.add_argument("--parts", nargs="+", default=["tree", "train", "checks"])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    t0 = time.time()
    deadline = t0 + args.budget_s
    if args.warm:
        try:
            warm(args.warm)
        except Exception as exc:  # noqa: BLE001 - the sweep still runs, compiling as it goes
            print(f"warm failed: {type(exc).__name__}: {exc}", flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "tree": [], "train": []}

    def save():
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=1)
    if "tree" in args.parts:
        sweep_tree(result["tree"], deadline)
        save()
    if "train" in args.parts:
        sweep_train(result["train"], deadline)
        save()
    if "checks" in args.parts and time.time() < deadline:
        checks_and_host(result)
    result["wall_s"] = time.time() - t0
    save()


if __name__ == "__main__":
    main()
