"""Decode-step speed: the torch decode step against the fused one (srl.generation.fused_decode).

Sections (``--sections``):

- ``plain``: plain sampling tokens/s of the 123.6M policy of ``benchmarks/generation.py`` (random
  weights, bf16, vocab 50304; tokens/s does not depend on the weights) at several batch sizes,
  ``PlainSampler`` with CUDA graphs, 9-token prompts, 256 new tokens, prefill included, median
  of repeats; the torch step (``fused=False``) and the fused step side by side.
- ``cats``: the end-to-end CATS measurement of ``benchmarks/kernels/cats.py`` (d_model 4096,
  32 heads, SwiGLU 11008, vocab 32000, untied head, random weights, bf16, thresholds calibrated
  for 50% on random tokens, 16-token prompt, 128 new tokens, median of 5) for dense and CATS with
  the torch step and with the fused step (CATS's cast fused into the next norm, and not).
- ``check``: on the device, the fused step against the torch step from the same generator
  (bf16: the first tokens agree, log-probs close).
- ``profile``: device time per kernel of a few eager decode steps, torch and fused.

    PYTHONPATH=. python benchmarks/decode_step.py --json decode_step.json
    PYTHONPATH=. python benchmarks/decode_step.py --tiny   # CPU smoke run (Triton interpreter)
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import time

import torch

from bare_imports import bare_packages  # noqa: E402 - benchmarks/ is on sys.path when run

bare_packages("srl.envs", "srl.policies")

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from srl.generation.cats_calibration import apply_cats, calibrate_cats, measure_sparsity  # noqa: E402
from srl.generation.decode import PlainSampler  # noqa: E402
from srl.generation import fused_decode  # noqa: E402
from srl.generation.fused_decode import FusedDecodeStep  # noqa: E402
from srl.generation.sampling import SamplingParams  # noqa: E402
from srl.policies.lm import LMConfig, TransformerLM  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
POLICY = dict(vocab_size=50304, d_model=768, n_layers=12, n_heads=12, max_seq_len=1024)
WIDE = dict(vocab_size=32000, d_model=4096, n_heads=32, max_seq_len=512, tie_embeddings=False,
            mlp={"type": "swiglu", "hidden": 11008})


def log(*a):
    print(*a, flush=True)


def sync():
    if CUDA:
        torch.cuda.synchronize()


def tokens_per_s(*args, **kw) -> float:
    """``_tokens_per_s``, or NaN (logged) when that configuration fails."""
    try:
        return _tokens_per_s(*args, **kw)
    except Exception as exc:  # noqa: BLE001
        log(f"  FAILED {kw or ''}: {type(exc).__name__}: {str(exc)[:300]}")
        if CUDA:
            torch.cuda.synchronize()
        return float("nan")


def _tokens_per_s(model, batch, prompt_len, new_tokens, repeats, fused, steps_per_graph=8,
                  fuse_cats_cast=True) -> float:
    s = PlainSampler(model, batch, prompt_len + new_tokens + steps_per_graph + 16,
                     SamplingParams(temperature=1.0), cuda_graph=CUDA, fused=fused,
                     steps_per_graph=steps_per_graph) if fuse_cats_cast else None
    if s is None:  # the fused step with CATS's own cast launch: swap the step in before capture
        s = _sampler_without_cast_fusion(model, batch, prompt_len + new_tokens + steps_per_graph + 16,
                                         steps_per_graph)
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=DEV)
    s.generate(prompt, new_tokens)
    times = []
    for _ in range(repeats):
        sync()
        times.append(s.generate(prompt, new_tokens).seconds)
    s.close()
    return batch * new_tokens / statistics.median(times)


def _sampler_without_cast_fusion(model, batch, max_len, steps_per_graph):
    from srl.generation import decode

    s = PlainSampler(model, batch, max_len, SamplingParams(temperature=1.0), cuda_graph=False,
                     fused=True, steps_per_graph=steps_per_graph)
    s._fused = FusedDecodeStep(model, s.cache, s.state, s.params, fuse_cats_cast=False)
    s.steps_per_graph = steps_per_graph if CUDA else 1
    with torch.inference_mode():
        s._step = decode.capture(s, s._steps, CUDA)
    return s


def plain_section(batches, new_tokens, repeats, graph_steps, with_torch=True, candidates=()) -> dict:
    """Per batch: the torch step, the fused step (default path: the small-batch path up to
    ``fused_decode.FUSED_GEMV`` rows) with 8 / 32 steps per graph, and where the small-batch path
    is the default, the cuBLAS fused step for comparison."""
    torch.manual_seed(0)
    with torch.device(DEV):
        model = TransformerLM(LMConfig(**POLICY)).to(torch.bfloat16).eval()
    res = {"config": POLICY, "params": model.num_params(), "new_tokens": new_tokens,
           "fused_gemv_max_batch": fused_decode.FUSED_GEMV, "attend_proj": fused_decode.ATTEND_PROJ, "rows": []}
    log(f"plain: policy {model.num_params() / 1e6:.1f}M params")
    with torch.inference_mode():
        for b in batches:
            row = {"batch": b}
            if with_torch:
                row["torch"] = tokens_per_s(model, b, 9, new_tokens, repeats, False)
            for n in graph_steps:
                row[f"fused_g{n}"] = tokens_per_s(model, b, 9, new_tokens, repeats, True, n)
            if b <= fused_decode.FUSED_GEMV:
                default, fused_decode.FUSED_GEMV = fused_decode.FUSED_GEMV, 0
                try:
                    row["fused_cublas"] = tokens_per_s(model, b, 9, new_tokens, repeats, True)
                finally:
                    fused_decode.FUSED_GEMV = default
                for name in candidates:  # tiles of the small-batch path (TILE_CANDIDATES)
                    row[f"tiles_{name}"] = with_tiles(TILE_CANDIDATES[name], functools.partial(
                        tokens_per_s, model, b, 9, new_tokens, repeats, True))
            res["rows"].append(row)
            log(f"  batch {b}: " + ", ".join(f"{k} {v:.0f}" for k, v in row.items() if k != "batch")
                + " tok/s")
    del model
    if CUDA:
        torch.cuda.empty_cache()
    return res


def cats_section(layers, batches, new_tokens, repeats, wide=None, profile=False) -> dict:
    cfg = LMConfig(n_layers=layers, **copy.deepcopy(wide or WIDE))
    torch.manual_seed(0)
    with torch.device(DEV):
        dense = TransformerLM(cfg).to(torch.bfloat16).eval()
    T = min(128, cfg.max_seq_len)
    thresholds = calibrate_cats(dense, [torch.randint(0, cfg.vocab_size, (4, T), device=DEV)], 0.5)
    sparsity = measure_sparsity(dense, [torch.randint(0, cfg.vocab_size, (4, T), device=DEV)], thresholds)
    cats = copy.deepcopy(dense)
    apply_cats(cats, thresholds)
    res = {"layers": layers, "held_out_sparsity": sparsity, "new_tokens": new_tokens, "rows": []}
    with torch.inference_mode():
        for b in batches:
            row = {"batch": b,
                   "dense_torch": tokens_per_s(dense, b, 16, new_tokens, repeats, False),
                   "cats_torch": tokens_per_s(cats, b, 16, new_tokens, repeats, False),
                   "dense_fused": tokens_per_s(dense, b, 16, new_tokens, repeats, True),
                   "cats_fused": tokens_per_s(cats, b, 16, new_tokens, repeats, True),
                   "cats_fused_own_cast": tokens_per_s(cats, b, 16, new_tokens, repeats, True,
                                                       fuse_cats_cast=False)}
            row["speedup_torch"] = row["cats_torch"] / row["dense_torch"]
            row["speedup_fused"] = row["cats_fused"] / row["dense_fused"]
            row["speedup_fused_own_cast"] = row["cats_fused_own_cast"] / row["dense_fused"]
            res["rows"].append(row)
            log(f"  {layers} layers batch {b}: " + ", ".join(
                f"{k} {v:.0f}" if "speedup" not in k else f"{k} {v:.3f}x"
                for k, v in row.items() if k != "batch"))
    if profile:  # in-model candidates for the CATS down kernel's tiles (the table's came from the MLP alone)
        res["down_candidates"] = down_candidates(cats, new_tokens, repeats)
        res["profile"] = {name: profile_sampler(m, 1, True, label=f"{layers}-layer {name}")
                          for name, m in (("dense", dense), ("cats", cats))}
    del dense, cats
    if CUDA:
        torch.cuda.empty_cache()
    return res


DOWN_CANDIDATES = [dict(BLOCK_N=256, BLOCK_K=16, SPLIT=64, num_warps=4, num_stages=4),
                   dict(BLOCK_N=128, BLOCK_K=16, SPLIT=32, num_warps=4, num_stages=4),
                   dict(BLOCK_N=256, BLOCK_K=32, SPLIT=32, num_warps=4, num_stages=3)]


def down_candidates(cats_model, new_tokens, repeats) -> list:
    from srl.kernels import cats as cats_kernels

    default, rows = cats_kernels.DOWN_CONFIG, []
    try:
        for cfg in DOWN_CANDIDATES:
            cats_kernels.DOWN_CONFIG = cfg
            rows.append({"down_config": cfg,
                         "cats_fused": tokens_per_s(cats_model, 1, 16, new_tokens, repeats, True)})
            log(f"  CATS down {cfg}: {rows[-1]['cats_fused']:.0f} tok/s")
    finally:
        cats_kernels.DOWN_CONFIG = default
    return rows


def check_section(cfg_dict, batch=4, new_tokens=24) -> dict:
    torch.manual_seed(1)
    with torch.device(DEV):
        model = TransformerLM(LMConfig(**cfg_dict)).to(torch.bfloat16).eval()
    prompt = torch.randint(0, model.config.vocab_size, (batch, 9), device=DEV)
    outs = []
    for fused in (False, True):
        g = torch.Generator(device=DEV).manual_seed(3)
        s = PlainSampler(model, batch, 64, SamplingParams(1.0), cuda_graph=False, fused=fused, generator=g)
        with torch.inference_mode():
            outs.append(s.generate(prompt, new_tokens))
    same = (outs[0].tokens == outs[1].tokens).float()
    first_diff = int(same.min(0).values.argmin()) if same.min() < 1 else new_tokens
    n = max(first_diff, 1)
    res = {"batch": batch, "new_tokens": new_tokens, "tokens_equal_fraction": float(same.mean()),
           "first_differing_step": first_diff,
           "max_logp_diff_before_it": float((outs[0].logp[:, :n] - outs[1].logp[:, :n]).abs().max())}
    log(f"check: {res}")
    return res


def profile_sampler(model, batch, fused, steps=4, label="") -> dict:
    """Device time per kernel over one eager ``generate`` of ``steps`` tokens (prefill included)."""
    from torch.profiler import ProfilerActivity, profile

    s = PlainSampler(model, batch, 128, SamplingParams(1.0), cuda_graph=False, fused=fused)
    prompt = torch.randint(0, model.config.vocab_size, (batch, 9), device=DEV)
    with torch.inference_mode():
        s.generate(prompt, 8)
        sync()
        acts = [ProfilerActivity.CUDA] if CUDA else [ProfilerActivity.CPU]
        with profile(activities=acts) as prof:
            s.generate(prompt, steps)
            sync()
    key = "device_time_total" if CUDA else "cpu_time_total"
    evs = prof.key_averages()
    rows = sorted(evs, key=lambda e: -getattr(e, key, 0.0))[:25]
    table = [{"name": e.key[:80], "count": e.count, "us_total": getattr(e, key, 0.0)} for e in rows]
    log(f"profile {label} {'fused' if fused else 'torch'} batch {batch}, prefill + {steps} tokens:")
    for t in table[:18]:
        log(f"   {t['us_total']:9.1f} us  x{t['count']:4d}  {t['name']}")
    return {"kernels": table}


def profile_section(batch) -> dict:
    torch.manual_seed(0)
    with torch.device(DEV):
        model = TransformerLM(LMConfig(**POLICY)).to(torch.bfloat16).eval()
    res = {name: profile_sampler(model, batch, fused, label="policy")
           for name, fused in (("torch", False), ("fused", True))}
    del model
    return res


TILE_CANDIDATES = {
    "default": {},
    "rope_attend_then_split": {"attend_proj": False},
    "attend_s256w8": {"attend": dict(BLOCK_O=256, BLOCK_S=256, num_warps=8)},
    "attend_o128_s128w8": {"attend": dict(BLOCK_O=128, BLOCK_S=128, num_warps=8)},
    "norm8_split8": {"norm": dict(BLOCK_N=8, num_warps=4), "split": dict(BLOCK_N=8, BLOCK_K=256, num_warps=4)},
    "norm16w8_splitK512": {"norm": dict(BLOCK_N=16, num_warps=8), "split": dict(BLOCK_N=16, BLOCK_K=512, num_warps=8)},
}
"""Tiles of ``srl.kernels.decode_gemv`` timed in the model at batch 1 (section ``gemv``)."""


def with_tiles(overrides: dict, fn):
    from srl.kernels import decode_gemv

    saved, attend = copy.deepcopy(decode_gemv.TILES), fused_decode.ATTEND_PROJ
    overrides = dict(overrides)
    fused_decode.ATTEND_PROJ = overrides.pop("attend_proj", attend)
    decode_gemv.TILES.update(copy.deepcopy(overrides))
    try:
        return fn()
    finally:
        decode_gemv.TILES.clear()
        decode_gemv.TILES.update(saved)
        fused_decode.ATTEND_PROJ = attend


def kernel_trace(model, batch, fused_gemv, steps_per_graph=8, graph=True) -> list:
    """Device kernels of one CUDA-graph replay of ``steps_per_graph`` decode steps (or of as many
    eager steps), in order: [name, start us (from the first kernel), duration us]."""
    from torch.profiler import ProfilerActivity, profile

    default, fused_decode.FUSED_GEMV = fused_decode.FUSED_GEMV, batch if fused_gemv else 0
    try:
        s = PlainSampler(model, batch, 128, SamplingParams(1.0), cuda_graph=CUDA and graph, fused=True,
                         steps_per_graph=steps_per_graph)
        s.steps_per_graph = steps_per_graph
    finally:
        fused_decode.FUSED_GEMV = default
    prompt = torch.randint(0, model.config.vocab_size, (batch, 9), device=DEV)
    with torch.inference_mode():
        s.generate(prompt, 2 * steps_per_graph)
        s.state.reset(prompt, 2 * steps_per_graph)
        from srl.generation.decode import prefill
        prefill(model, s.cache, prompt)
        sync()
        acts = [ProfilerActivity.CUDA] if CUDA else [ProfilerActivity.CPU]
        with profile(activities=acts) as prof:
            s._step()
            sync()
    s.close()
    kern = [e for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA")]
    kern.sort(key=lambda e: e.time_range.start)
    if not kern:
        return []
    t0 = kern[0].time_range.start
    return [[e.name[:60], round(e.time_range.start - t0, 2), round(e.time_range.elapsed_us(), 2)]
            for e in kern]


def summarize_trace(trace: list, steps: int) -> dict:
    """Per step: wall span, sum of kernel durations, kernel count; per kernel name: mean us."""
    if not trace:
        return {}
    span = trace[-1][1] + trace[-1][2]
    busy = sum(t[2] for t in trace)
    by = {}
    for name, _, dur in trace:
        by.setdefault(name, []).append(dur)
    return {"us_per_step": span / steps, "busy_us_per_step": busy / steps,
            "kernels_per_step": len(trace) / steps,
            "mean_us": {k: round(statistics.mean(v), 2) for k, v in by.items()},
            "count": {k: len(v) for k, v in by.items()}}


def gemv_section(batches, repeats, new_tokens, res: dict, save) -> None:
    """The ``FUSED_GEMV`` path against the fused step with cuBLAS (batch 1 first), kernel traces
    of a graph replay for both, tile candidates at batch 1, then the other batches; ``res`` is
    filled and saved as it goes."""
    torch.manual_seed(0)
    with torch.device(DEV):
        model = TransformerLM(LMConfig(**POLICY)).to(torch.bfloat16).eval()
    res.update({"rows": [], "tiles": {}, "trace": {}})
    with torch.inference_mode():
        gemv_rows(model, batches[:1], repeats, new_tokens, res)
        save()
        for name, gemv, graph in (("cublas", False, True), ("gemv", True, True), ("gemv_eager", True, False)):
            tr = kernel_trace(model, 1, gemv, graph=graph)
            res["trace"][name] = {"summary": summarize_trace(tr, 8), "kernels": tr}
            log(f"  trace {name}: " + json.dumps({k: v for k, v in res["trace"][name]["summary"].items()
                                                   if k != "count"})[:1500])
        save()
        for name, tiles in TILE_CANDIDATES.items():
            if name == "default":
                continue
            res["tiles"][name] = {"tiles": tiles, "tok_s": with_tiles(
                tiles, functools.partial(tokens_per_s, model, 1, 9, new_tokens, repeats, True))}
            log(f"  tiles {name}: {res['tiles'][name]['tok_s']:.0f} tok/s")
            save()
        gemv_rows(model, batches[1:], repeats, new_tokens, res)
    del model


def gemv_rows(model, batches, repeats, new_tokens, res) -> None:
    for b in batches:
        fused_decode.FUSED_GEMV = 0
        row = {"batch": b, "fused_cublas": tokens_per_s(model, b, 9, new_tokens, repeats, True)}
        fused_decode.FUSED_GEMV = b
        row["fused_gemv"] = tokens_per_s(model, b, 9, new_tokens, repeats, True)
        row["fused_gemv_g32"] = tokens_per_s(model, b, 9, new_tokens, repeats, True, 32)
        res["rows"].append(row)
        log(f"  gemv batch {b}: " + ", ".join(f"{k} {v:.0f}" for k, v in row.items() if k != "batch"))


DRAFT = dict(vocab_size=50304, d_model=192, n_layers=2, n_heads=3, max_seq_len=1024)
SPEC_CONFIGS = ((1, 7, True, True, True), (1, 7, True, True, False), (1, 7, True, False, False),
                (1, 5, True, True, True), (1, 5, True, False, False))
"""(k, L, the draft's steps through the fused small-batch step, the target's verification pass and
the draft's re-feed through ``FusedChunk``, the fused draft race + selection) of the speculative
iterations timed by section ``spec`` (batch 1)."""


def _spec_sampler(policy, draft, k, L, fused_draft, fused_verify, batch=1, generator=None, graph=CUDA,
                  fused_select=True):
    from srl.generation import speculative
    from srl.generation.speculative import SpeculativeSampler

    saved = speculative.FUSED_DRAFT, speculative.FUSED_VERIFY, speculative.FUSED_SELECT
    speculative.FUSED_DRAFT, speculative.FUSED_VERIFY = fused_draft, batch if fused_verify else 0
    speculative.FUSED_SELECT = fused_select
    try:
        s = SpeculativeSampler(policy, draft, batch, 512, k=k, draft_len=L, cuda_graph=graph,
                               generator=generator)
        if not CUDA:  # --tiny: the fused pieces forced through the interpreter (code check)
            s.draft_step = speculative.fused_draft_step(draft, s.dcache, s.state, s.params, k, DEV,
                                                        force=fused_draft)
            s.fused = speculative.fused_standard(policy, draft, s.tcache, s.dcache, batch, k, L, DEV,
                                                 force=fused_verify, params=s.params, draft_step=s.draft_step)
        return s
    finally:
        speculative.FUSED_DRAFT, speculative.FUSED_VERIFY, speculative.FUSED_SELECT = saved


def spec_models(dtype=torch.bfloat16):
    torch.manual_seed(0)
    with torch.device(DEV):
        policy = TransformerLM(LMConfig(**POLICY)).to(dtype).eval()
        draft = TransformerLM(LMConfig(**DRAFT)).to(dtype).eval()
    return policy, draft


def spec_section(res: dict, save, iterations: int = 40, configs=SPEC_CONFIGS, batch: int = 1) -> None:
    """Milliseconds per speculative iteration (one CUDA graph: L draft steps, the target pass,
    selection, cache moves) and of its parts, each captured alone: the draft block (re-feed and
    L - 1 steps) and the target pass over 1 + L tokens with its probabilities; the rest
    (selection, log-probs, cache moves, state) is the difference. Random-weight policy and draft
    of ``benchmarks/generation.py`` (bf16): the time of an iteration does not depend on the
    weights; tokens/s is tokens per pass (acceptance) / time per iteration. The kernels of one
    graph replay of each iteration are traced (``summarize_trace``)."""
    from srl.generation.decode import GraphedStep, prefill, tree_slot_mask
    from srl.generation.sampling import probs_from_params
    from srl.generation.speculative import draft_blocks, fused_draft_block

    policy, draft = spec_models()
    prompt = torch.randint(0, min(100, POLICY["vocab_size"]), (batch, 9), device=DEV)
    with torch.inference_mode():
        for k, L, fused_draft, fused_verify, fused_select in configs:
            s = _spec_sampler(policy, draft, k, L, fused_draft, fused_verify, batch, fused_select=fused_select)
            sel = s.fused is not None and s.fused.work is not None
            s.state.reset(prompt, 400)
            prefill(policy, s.tcache, prompt)
            prefill(draft, s.dcache, prompt)
            row = {"batch": batch, "k": k, "L": L, "fused_draft": s.draft_step is not None,
                   "fused_verify": s.fused is not None and s.fused.verify is not None,
                   "fused_refeed": s.fused is not None and s.fused.refeed is not None, "fused_select": sel,
                   "ms_per_iteration": _ms_per_call(s._step, iterations)}
            lay = tree_slot_mask(s.tcache.lens, k, L, s.tcache.max_len)

            def draft_only(s=s, k=k, L=L, lay=lay, sel=sel):
                if sel:
                    return fused_draft_block(s.tcache.lens, s.state, L, s.params.temperature, s.generator,
                                             s.draft_step, s.fused)
                draft_blocks(draft, s.dcache, s.state, (lay[0], lay[1], lay[2].dense), k, L, s.params,
                             s.generator, s.draft_step, s.fused and s.fused.refeed)

            tin = torch.zeros(batch, 1 + k * L, dtype=torch.long, device=DEV)

            def target_only(s=s, lay=lay, tin=tin, sel=sel):
                if s.fused is not None and s.fused.verify is not None:
                    logits = s.fused.verify(tin, s.tcache.lens)
                    if sel:  # the selection reads the logits; no probabilities
                        return
                else:
                    logits = policy(tin, s.tcache, positions=lay[1], slots=lay[0], mask=lay[2])
                probs_from_params(logits, s.params)

            for name, fn in (("ms_draft_block", draft_only), ("ms_target_pass", target_only)):
                g = GraphedStep(fn, enabled=CUDA, generators=(s.generator,))
                row[name] = _ms_per_call(g, iterations)
                g.close()
            row["ms_rest"] = row["ms_per_iteration"] - row["ms_draft_block"] - row["ms_target_pass"]
            if CUDA:
                tr = _replay_trace(s._step)
                row["trace"] = summarize_trace(tr, 1)
                row["trace"]["top"] = sorted(row["trace"]["mean_us"].items(),
                                             key=lambda kv: -kv[1] * row["trace"]["count"][kv[0]])[:25]
                row["trace"].pop("mean_us")
                row["trace"].pop("count")
            s.close()
            res.setdefault("rows", []).append(row)
            log(f"  spec batch {batch} k={k} L={L}: " + json.dumps({a: b for a, b in row.items() if a != "trace"}))
            if "trace" in row:
                log("    trace: " + json.dumps(row["trace"])[:1800])
            save()


def _replay_trace(fn) -> list:
    """Kernels of one call of ``fn`` (a graph replay): [name, start us, duration us]."""
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    kern = [e for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA")]
    kern.sort(key=lambda e: e.time_range.start)
    if not kern:
        return []
    t0 = kern[0].time_range.start
    return [[e.name[:60], round(e.time_range.start - t0, 2), round(e.time_range.elapsed_us(), 2)] for e in kern]


def spec_check_section(new_tokens: int = 64, L: int = 7, batch: int = 1, dtype=torch.bfloat16) -> dict:
    """On the device: standard speculative sampling with the fused verification pass and re-feed
    (and with the fused selection too) against the torch pass, the same generator seed,
    random-weight models, no CUDA graph: the first position where the tokens differ, the log-probs
    before it. In bf16 the residual max(p - q, 0) of two near-uniform random models is mostly
    rounding, so the first rejection can draw another token; float32 is the exact check."""
    policy, draft = spec_models(dtype)
    prompt = torch.randint(0, min(100, POLICY["vocab_size"]), (batch, 9), device=DEV)
    outs = []
    for fused_verify, fused_select in ((False, False), (True, False), (True, True)):
        g = torch.Generator(device=DEV).manual_seed(5)
        s = _spec_sampler(policy, draft, 1, L, True, fused_verify, batch, generator=g, graph=False,
                          fused_select=fused_select)
        with torch.inference_mode():
            outs.append(s.generate(prompt, new_tokens))
    res = {"batch": batch, "L": L, "new_tokens": new_tokens, "dtype": str(dtype),
           "tokens_per_pass": [o.stats["tokens_per_pass"] for o in outs]}
    for name, o in (("fused_verify", outs[1]), ("fused_select", outs[2])):
        same = (outs[0].tokens == o.tokens).float()
        first_diff = int(same.min(0).values.argmin()) if same.min() < 1 else new_tokens
        n = max(first_diff, 1)
        res[name] = {"tokens_equal_fraction": float(same.mean()), "first_differing_position": first_diff,
                     "max_logp_diff_before_it": float((outs[0].logp[:, :n] - o.logp[:, :n]).abs().max())}
    log(f"spec check: {res}")
    return res


def _ms_per_call(fn, n: int) -> float:
    for _ in range(3):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t0) * 1e3 / n


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "decode_step.json"))
    ap.add_argument("--sections", default="check,plain,cats,profile")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--graph-steps", default="8,32", help="decode steps per CUDA graph (fused)")
    ap.add_argument("--cats-layers", default="4,8")
    ap.add_argument("--cats-batches", default="1")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile-batches", default="1,64")
    ap.add_argument("--tiny", action="store_true", help="small models on the CPU (code check)")
    ap.add_argument("--spec", default="1:7:1:1:1,1:7:1:1:0,1:7:1:0:0,1:5:1:1:1,1:5:1:0:0",
                    help="spec: k:L:fused-draft:fused-verify:fused-select (0/1) per speculative configuration")
    ap.add_argument("--spec-batches", default="1", help="spec: batch sizes")
    ap.add_argument("--plain-tiles", default="", help="plain: TILE_CANDIDATES names also timed "
                    "where the small-batch path is the default")
    ap.add_argument("--skip-torch", action="store_true", help="plain: no torch-step rows")
    args = ap.parse_args(argv)
    sections = args.sections.split(",")
    new_plain, new_cats, rep_cats = 256, 128, 5
    wide = None
    if args.tiny:
        POLICY.update(vocab_size=64, d_model=32, n_layers=2, n_heads=2)
        DRAFT.update(vocab_size=64, d_model=16, n_layers=1, n_heads=2)
        wide = dict(WIDE, vocab_size=64, d_model=64, n_heads=2, mlp={"type": "swiglu", "hidden": 96})
        new_plain, new_cats, rep_cats, args.repeats = 8, 8, 1, 1
        args.batches, args.cats_layers, args.graph_steps = "1,2", "2", "8"
        args.profile_batches = "1"
    out = {"meta": {"device": torch.cuda.get_device_name() if CUDA else "cpu (Triton interpreter)",
                    "torch": torch.__version__, "triton": __import__("triton").__version__,
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}}
    log(out["meta"])

    def save():
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1, default=str)

    steps = [int(n) for n in args.graph_steps.split(",")]
    for sec in sections:
        t0 = time.time()
        try:
            run_section(sec, out, args, steps, new_plain, new_cats, rep_cats, wide, save)
        except Exception:  # noqa: BLE001 - one failing section must not lose the others
            import traceback
            traceback.print_exc()
            out.setdefault("errors", {})[sec] = traceback.format_exc()[-2000:]
        log(f"section {sec}: {time.time() - t0:.0f} s")
        save()
    log(f"wrote {args.json}")


def run_section(sec, out, args, steps, new_plain, new_cats, rep_cats, wide, save) -> None:
    if sec == "check":
        default = fused_decode.FUSED_GEMV
        try:  # batch 4: the small-batch path forced, and the cuBLAS fused step
            for name, flag in (("check", 4), ("check_cublas", 0)):
                fused_decode.FUSED_GEMV = flag
                out[name] = check_section(POLICY)
        finally:
            fused_decode.FUSED_GEMV = default
    elif sec == "plain":
        out["plain"] = plain_section([int(b) for b in args.batches.split(",")], new_plain,
                                     args.repeats, steps, not args.skip_torch,
                                     [c for c in args.plain_tiles.split(",") if c])
    elif sec == "cats":
        out["cats"] = []
        for n in args.cats_layers.split(","):
            out["cats"].append(cats_section(int(n), [int(b) for b in args.cats_batches.split(",")],
                                            new_cats, rep_cats, wide, profile=n == "4"))
            save()
    elif sec == "spec":
        out["spec"] = {}
        configs = [tuple(int(v) for v in c.split(":")) for c in args.spec.split(",")]
        configs = [(c[0], c[1], bool(c[2]), bool(c[3]) if len(c) > 3 else False, bool(c[4]) if len(c) > 4 else True)
                   for c in configs]
        for b in [int(x) for x in args.spec_batches.split(",")]:
            spec_section(out["spec"], save, 3 if args.tiny else 40, configs, b)
    elif sec == "spec_check":
        out["spec_check"] = spec_check_section(8 if args.tiny else 64)
        out["spec_check_fp32"] = spec_check_section(8 if args.tiny else 64, dtype=torch.float32)
    elif sec == "gemv":
        out["gemv"], default = {}, fused_decode.FUSED_GEMV
        fused_decode.FUSED_GEMV = 1
        try:
            gemv_section([int(b) for b in args.batches.split(",")], args.repeats, new_plain, out["gemv"], save)
        finally:
            fused_decode.FUSED_GEMV = default
    elif sec == "profile":
        out["profile"] = {b: profile_section(b) for b in [int(x) for x in args.profile_batches.split(",")]}


if __name__ == "__main__":
    main()
