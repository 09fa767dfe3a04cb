"""CATS sparse MLP (srl.kernels.cats) against the dense torch MLP, and what it does for decode.

Sections (``--sections``, all by default):

- ``kernel``: the Llama-7B MLP shape (4096 -> 11008 -> 4096), bf16, random weights (std 0.02),
  the threshold at the median |SiLU(gate)| of random inputs (50% sparsity per row). Checks the
  kernel against a float64 reference, sweeps tile configurations at batch 1, then times batch
  1..16: the dense torch MLP (three F.linear, SiLU, product) and the Triton decode path, both as
  CUDA-graph replays over 16 different inputs (a decode loop runs in a graph). Reports the
  speedup, the same-bandwidth bound 3 / (1 + 2 * active fraction) and the break-even batch.
- ``e2e``: decode tokens/s of a wide model (d_model 4096, 4 layers, 32 heads, SwiGLU 11008, vocab
  32000, random weights, bf16) with ``PlainSampler`` (CUDA graphs) at batch 1, 2, 4: dense
  against CATS with thresholds calibrated for 50% on random token text.
- ``quality``: a SwiGLU LM trained on the text task (``srl.envs.text.MixedTask``), greedy
  exact-match accuracy on held-out addition and sort prompts, dense against CATS at 30/50/70%
  with thresholds calibrated on the model's own completions of other prompts (no fine-tuning),
  and the sparsity those thresholds give on held-out text.

    PYTHONPATH=. python benchmarks/kernels/cats.py --json cats.json
    PYTHONPATH=. python benchmarks/kernels/cats.py --tiny   # CPU smoke run through the interpreter
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from srl.envs.text import MixedTask  # noqa: E402
from srl.generation.cats_calibration import (apply_cats, calibrate_cats, measure_sparsity,  # noqa: E402
                                             task_batches)
from srl.generation.decode import PlainSampler  # noqa: E402
from srl.generation.sampling import SamplingParams  # noqa: E402
from srl.kernels.cats import (DOWN_CONFIG, GATE_CONFIG, active_rows_reference,  # noqa: E402
                              cats_mlp_kernel, cats_mlp_reference, transpose_down_storage)
from srl.policies.lm import LMConfig, TransformerLM  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"

GATE_SWEEP = [dict(BLOCK_F=32, BLOCK_D=256, num_warps=4, num_stages=3),
              dict(BLOCK_F=16, BLOCK_D=512, num_warps=4, num_stages=3),
              dict(BLOCK_F=64, BLOCK_D=256, num_warps=8, num_stages=3),
              dict(BLOCK_F=32, BLOCK_D=512, num_warps=8, num_stages=3),
              dict(BLOCK_F=16, BLOCK_D=256, num_warps=4, num_stages=4),
              dict(BLOCK_F=32, BLOCK_D=128, num_warps=4, num_stages=5),
              dict(BLOCK_F=64, BLOCK_D=128, num_warps=4, num_stages=4)]
DOWN_SWEEP = [dict(BLOCK_N=256, BLOCK_K=32, SPLIT=16, num_warps=4, num_stages=3),
              dict(BLOCK_N=128, BLOCK_K=32, SPLIT=16, num_warps=4, num_stages=3),
              dict(BLOCK_N=256, BLOCK_K=64, SPLIT=8, num_warps=8, num_stages=3),
              dict(BLOCK_N=512, BLOCK_K=32, SPLIT=8, num_warps=8, num_stages=3),
              dict(BLOCK_N=128, BLOCK_K=64, SPLIT=32, num_warps=4, num_stages=3),
              DOWN_CONFIG,  # the sweep's winner on the H200: BLOCK_N=256, BLOCK_K=16, SPLIT=32
              dict(BLOCK_N=64, BLOCK_K=64, SPLIT=32, num_warps=4, num_stages=3)]


def log(*a):
    print(*a, flush=True)


def sync():
    if CUDA:
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- timing

def per_call_us(fns, reps: int = 15) -> float:
    """Median device time of one call: ``fns`` (one closure per input) replayed as a CUDA graph."""
    for f in fns:
        f()
    sync()
    if not CUDA:
        t0 = time.perf_counter()
        for f in fns:
            f()
        return (time.perf_counter() - t0) / len(fns) * 1e6
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(fns))
    del g
    return statistics.median(times)


def copy_bandwidth_tbs() -> float:
    """Device-to-device copy, bytes read + written per second (the ceiling for reading weights)."""
    if not CUDA:
        return float("nan")
    src = torch.randn(256 * 2**20, device=DEV)  # 1 GiB
    dst = torch.empty_like(src)
    us = per_call_us([lambda: dst.copy_(src)], reps=10)
    return 2 * src.numel() * 4 / (us * 1e-6) / 1e12


# --------------------------------------------------------------------------- kernel section

def median_threshold(x: torch.Tensor, wg: torch.Tensor) -> float:
    """A threshold between the two middle |SiLU(gate)| values of x: 50% kept, none exactly on it."""
    a = F.silu(F.linear(x, wg).float()).abs().flatten().sort().values
    mid = a.numel() // 2
    return float((a[mid - 1] + a[mid]) / 2)


def check_kernel(x, wg, wu, wd, wd_t, t) -> dict:
    ref = cats_mlp_reference(x.double(), wg.double(), wu.double(), wd.double(), t)
    y, active = cats_mlp_kernel(x, wg, wu, wd_t, t)
    err = float((y.double() - ref).norm() / ref.norm())
    return {"rows": x.shape[0], "rel_err": err, "active": int(active),
            "active_ref": int(active_rows_reference(x.double(), wg.double(), t))}


def kernel_section(D: int, Fh: int, batches: list[int], dtype=torch.bfloat16) -> dict:
    g = torch.Generator(device=DEV).manual_seed(0)
    w = lambda *s: (torch.randn(*s, device=DEV, generator=g) * 0.02).to(dtype)  # noqa: E731
    wg, wu, wd = w(Fh, D), w(Fh, D), w(D, Fh)
    wd_t = transpose_down_storage(wd)
    t = median_threshold(torch.randn(64, D, device=DEV, generator=g).to(dtype), wg)
    xs = {m: [torch.randn(m, D, device=DEV, generator=g).to(dtype) for _ in range(16)] for m in batches}
    res = {"shape": [D, Fh, D], "dtype": str(dtype), "threshold": t, "checks": [], "sweep": [], "rows": []}
    for m in sorted({batches[0], batches[len(batches) // 2], batches[-1]}):
        res["checks"].append(check_kernel(xs[m][0], wg, wu, wd, wd_t, t))
        log(f"  check {res['checks'][-1]}")

    def cats_us(m, gcfg=None, dcfg=None):
        return per_call_us([lambda x=x: cats_mlp_kernel(x, wg, wu, wd_t, t, gcfg, dcfg) for x in xs[m]])

    best_g, best_d = GATE_CONFIG, DOWN_CONFIG
    if CUDA:  # tile sweep at batch 1: gate+up configurations, then down configurations
        for kind, sweep in (("gate", GATE_SWEEP), ("down", DOWN_SWEEP)):
            scored = []
            for cfg in sweep:
                gc, dc = (cfg, best_d) if kind == "gate" else (best_g, cfg)
                try:
                    us = cats_us(batches[0], gc, dc)
                except Exception as exc:  # noqa: BLE001 - a config the compiler rejects is skipped
                    log(f"  {kind} {cfg}: failed {type(exc).__name__}: {str(exc)[:120]}")
                    continue
                scored.append((us, cfg))
                res["sweep"].append({"kind": kind, "config": cfg, "us": us})
                log(f"  {kind} {cfg}: {us:.1f} us")
            best = min(scored, key=lambda s: s[0])[1]
            best_g, best_d = (best, best_d) if kind == "gate" else (best_g, best)
    res["gate_config"], res["down_config"] = best_g, best_d
    dense_bytes = 3 * Fh * D * wg.element_size()
    for m in batches:
        dense = per_call_us([lambda x=x: F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)
                             for x in xs[m]])
        cats = cats_us(m, best_g, best_d)
        frac = statistics.mean(float(active_rows_reference(x, wg, t)) / Fh for x in xs[m])
        bound = 3 / (1 + 2 * frac)
        row = {"batch": m, "dense_us": dense, "cats_us": cats, "speedup": dense / cats,
               "active_fraction": frac, "bandwidth_bound": bound,
               "of_bound": dense / cats / bound,
               "dense_tbs": dense_bytes / (dense * 1e-6) / 1e12,
               "cats_tbs": dense_bytes * (1 + 2 * frac) / 3 / (cats * 1e-6) / 1e12}
        res["rows"].append(row)
        log(f"  batch {m:2d}: dense {dense:7.1f} us  cats {cats:7.1f} us  {dense / cats:4.2f}x  "
            f"active {frac:.3f}  bound {bound:.2f}x ({row['of_bound']:.0%} of it)")
    paying = [r["batch"] for r in res["rows"] if r["speedup"] > 1.0]
    res["break_even_batch"] = max(paying) if paying else 0
    res["first_losing_batch"] = next((r["batch"] for r in res["rows"] if r["speedup"] <= 1.0), None)
    return res


# --------------------------------------------------------------------------- e2e section

def decode_tokens_per_s(model, batch, prompt_len, new_tokens, repeats) -> float:
    s = PlainSampler(model, batch, prompt_len + new_tokens + 16, SamplingParams(temperature=1.0),
                     cuda_graph=CUDA)
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=DEV)
    s.generate(prompt, new_tokens)
    times = []
    for _ in range(repeats):
        sync()
        times.append(s.generate(prompt, new_tokens).seconds)
    s.close()
    return batch * new_tokens / statistics.median(times)


def e2e_section(cfg: LMConfig, batches, new_tokens: int, repeats: int, dtype=torch.bfloat16) -> dict:
    torch.manual_seed(0)
    with torch.device(DEV):
        dense = TransformerLM(cfg).to(dtype).eval()
    T = min(128, cfg.max_seq_len)
    calib = [torch.randint(0, cfg.vocab_size, (4, T), device=DEV)]
    thresholds = calibrate_cats(dense, calib, 0.5)
    held_out = [torch.randint(0, cfg.vocab_size, (4, T), device=DEV)]
    sparsity = measure_sparsity(dense, held_out, thresholds)
    cats = copy.deepcopy(dense)
    apply_cats(cats, thresholds)
    res = {"config": {k: v for k, v in vars(cfg).items()}, "thresholds": thresholds,
           "held_out_sparsity": sparsity, "new_tokens": new_tokens, "rows": []}
    log(f"  thresholds {[round(t, 4) for t in thresholds]}, held-out sparsity "
        f"{[round(s, 3) for s in sparsity]}")
    for b in batches:
        with torch.inference_mode():
            d = decode_tokens_per_s(dense, b, 16, new_tokens, repeats)
            c = decode_tokens_per_s(cats, b, 16, new_tokens, repeats)
        res["rows"].append({"batch": b, "dense_tok_s": d, "cats_tok_s": c, "speedup": c / d})
        log(f"  batch {b}: dense {d:.0f} tok/s, CATS {c:.0f} tok/s, {c / d:.2f}x")
    del dense, cats
    if CUDA:
        torch.cuda.empty_cache()
    return res


# --------------------------------------------------------------------------- quality section

def train_text_lm(model, task, steps, batch, seq, lr, rng) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    loss = torch.zeros(())
    for step in range(steps):
        frac = min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for grp in opt.param_groups:
            grp["lr"] = lr * frac
        x = task.stream(batch, seq + 1, rng).to(DEV)
        with torch.autocast(DEV, torch.bfloat16, enabled=CUDA):
            logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % max(1, steps // 4) == 0 or step == steps - 1:
            log(f"    step {step:5d} loss {loss.item():.4f}")
    model.eval()
    return loss.item()


@torch.no_grad()
def exact_match(model, task, prompts, answers) -> float:
    s = PlainSampler(model, prompts.shape[0], prompts.shape[1] + answers.shape[1] + 4,
                     SamplingParams(temperature=0.0), cuda_graph=False)
    out = s.generate(prompts.to(DEV), answers.shape[1] + 1)
    return float(task.rewards(answers, out.tokens.cpu()).mean())


def quality_section(cfg: LMConfig, steps: int, n_eval: int, sparsities=(0.3, 0.5, 0.7)) -> dict:
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    task = MixedTask()
    model = TransformerLM(cfg).to(DEV)
    t0 = time.time()
    loss = train_text_lm(model, task, steps, 64, 64, 2e-3, rng)
    log(f"  trained {steps} steps in {time.time() - t0:.0f}s, loss {loss:.4f}")
    evals = {name: sub.sample(n_eval, rng) for name, sub in (("addition", task.addition),
                                                              ("sort", task.sort))}
    calib = (task_batches(model, task.addition, 128, 64, rng)
             + task_batches(model, task.sort, 128, 64, rng))
    held = (task_batches(model, task.addition, 128, 64, rng)
            + task_batches(model, task.sort, 128, 64, rng))
    res = {"config": vars(cfg), "steps": steps, "final_loss": loss, "eval_prompts": n_eval, "rows": []}
    dense = {k: exact_match(model, getattr(task, k), *v) for k, v in evals.items()}
    res["dense"] = dense
    log(f"  dense exact match: {dense}")
    for s in sparsities:
        thresholds = calibrate_cats(model, calib, s)
        held_sp = measure_sparsity(model, held, thresholds)
        apply_cats(model, thresholds)
        acc = {k: exact_match(model, getattr(task, k), *v) for k, v in evals.items()}
        apply_cats(model, None)
        row = {"sparsity": s, "thresholds": thresholds, "held_out_sparsity": held_sp,
               "exact_match": acc, "drop_points": {k: 100 * (dense[k] - acc[k]) for k in acc}}
        res["rows"].append(row)
        log(f"  CATS {s:.0%}: exact match {acc}, drop (points) "
            f"{ {k: round(v, 2) for k, v in row['drop_points'].items()} }, held-out sparsity "
            f"{[round(x, 3) for x in held_sp]}")
    return res


# --------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "cats.json"))
    ap.add_argument("--sections", default="kernel,e2e,quality")
    ap.add_argument("--batches", default="1,2,3,4,6,8,12,16")
    ap.add_argument("--e2e-layers", default="4", help="comma-separated layer counts")
    ap.add_argument("--quality-steps", type=int, default=3000)
    ap.add_argument("--quality-width", type=int, default=256)
    ap.add_argument("--eval", type=int, default=2000, help="held-out prompts per task")
    ap.add_argument("--tiny", action="store_true", help="small shapes (CPU interpreter smoke run)")
    args = ap.parse_args(argv)
    sections = args.sections.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    D, Fh = 4096, 11008
    wides = [LMConfig(vocab_size=32000, d_model=4096, n_layers=int(n), n_heads=32, max_seq_len=512,
                      tie_embeddings=False, mlp={"type": "swiglu", "hidden": 11008})
             for n in args.e2e_layers.split(",")]
    width = args.quality_width
    small = LMConfig(vocab_size=64, d_model=width, n_layers=4, n_heads=width // 64, max_seq_len=128,
                     mlp={"type": "swiglu", "hidden": 3 * width})
    e2e_batches, new_tokens, repeats = [1, 2, 4], 128, 5
    if args.tiny:
        D, Fh, batches = 64, 200, [1, 2, 4]
        wides = [LMConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=2, max_seq_len=64,
                          mlp={"type": "swiglu", "hidden": 200})]
        small = LMConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=128,
                         mlp={"type": "swiglu", "hidden": 96})
        e2e_batches, new_tokens, repeats = [1], 8, 1
        args.quality_steps, args.eval = min(args.quality_steps, 30), min(args.eval, 64)
    meta = {"device": torch.cuda.get_device_name() if CUDA else "cpu (Triton interpreter)",
            "torch": torch.__version__, "triton": __import__("triton").__version__,
            "copy_tbs": copy_bandwidth_tbs()}
    log(f"{meta}")
    out = {"meta": meta}

    def save():
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1, default=str)

    if "kernel" in sections:
        log(f"kernel: {D} -> {Fh} -> {D}")
        out["kernel"] = kernel_section(D, Fh, batches)
        save()
    if "e2e" in sections:
        out["e2e"] = []
        for wide in wides:
            log(f"e2e decode: d_model {wide.d_model}, {wide.n_layers} layers")
            out["e2e"].append(e2e_section(wide, e2e_batches, new_tokens, repeats))
            save()
    if "quality" in sections:
        log(f"quality: SwiGLU LM d_model {small.d_model}, {small.n_layers} layers")
        out["quality"] = quality_section(small, args.quality_steps, args.eval)
        save()
    summary(out)
    log(f"wrote {args.json}")


def summary(out):
    if "kernel" in out:
        k = out["kernel"]
        log("\n| batch | dense us | CATS us | speedup | active rows | bound | of bound |")
        log("|---|---|---|---|---|---|---|")
        for r in k["rows"]:
            log(f"| {r['batch']} | {r['dense_us']:.1f} | {r['cats_us']:.1f} | {r['speedup']:.2f}x | "
                f"{r['active_fraction']:.3f} | {r['bandwidth_bound']:.2f}x | {r['of_bound']:.0%} |")
        log(f"break-even: CATS pays up to batch {k['break_even_batch']}; "
            f"tiles {k['gate_config']} / {k['down_config']}")
    for e in out.get("e2e", []):
        for r in e["rows"]:
            log(f"e2e {e['config']['n_layers']} layers, batch {r['batch']}: dense "
                f"{r['dense_tok_s']:.0f} tok/s, CATS {r['cats_tok_s']:.0f} tok/s, {r['speedup']:.2f}x")
    if "quality" in out:
        q = out["quality"]
        log(f"quality: dense {q['dense']}; " + "; ".join(
            f"CATS {r['sparsity']:.0%} {r['exact_match']}" for r in q["rows"]))


if __name__ == "__main__":
    main()
