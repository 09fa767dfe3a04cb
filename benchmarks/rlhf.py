"""RL with a language-model policy through the whole dataflow: plain vs speculative generation.

GPU (one H200): ``configs/rlhf_addition.yaml`` (a policy warmed up by supervised steps, GRPO,
SpecTr K-SEQ with a small draft kept aligned by the draft worker) in variants that differ in one
field each:

- ``spectr``: the config as it is;
- ``plain``: ``generation.mode=plain`` (no draft);
- ``spectr_stale_draft``: ``draft.align=false`` (the draft, warmed up like the policy, never follows
  it: acceptance should fall as the policy moves);
- ``spectr_frozen_draft``: ``draft.align_updates=150`` (the draft worker aligns the draft for its
  first 150 updates, about 25 s of RL on the H200 with three runs sharing it, then only measures:
  from the same aligned start, acceptance should hold with the draft worker and fall without it);
- ``spectr_tv``: ``draft.loss=tv`` (the draft worker minimizes total variation, 1 - acceptance,
  instead of KL); ``spectr_tv_frozen``: the same, frozen after 80 updates;
- ``standard``: ``generation.mode=standard`` (one draft, speculative sampling of Leviathan et al.);
- ``sophia``: ``optimizer.type=sophia``;
- ``spectr_lr6e-5``: ``optimizer.lr=6e-5`` (3x the config's RL learning rate: a tenth of the
  warm-up's 6e-4, the ratio that learned at CPU scale, where the warm-up's own lr collapsed RL).
- ``plain_fp32``, ``spectr_fp32``: ``policy.autocast=none`` (learner and generation in float32,
  as before the config took bf16);
- ``standard_stale_draft``: standard speculative sampling with no draft worker (its GPU time out
  of the step);
- ``plain_b16``, ``standard_b16``: 16 completions per generation call (one prompt's group)
  instead of up to 256, where the generation benchmark finds speculation paying.

Every variant runs as its own ``srl run``-like child process (``--run-one``), so this process may
use the GPU while they run. Two phases:

- ``--phase time``: the variants one after another, alone on the GPU, with no checkpoints until
  the stop: time per RL step (median interval between weight versions), the generation worker's
  busy share of the wall time, acceptance and the sampled reward per log row;
- ``--phase learn``: the variants at once (learning curves need no clean timing); this process
  scores every checkpoint as it appears: greedy exact-match accuracy on held-out prompts (a seed
  no actor draws from) against RL steps. The first checkpoint is written right after the first
  RL step, so it stands for the warmed-up policy.

``--probe-warmup STEPS`` measures the supervised warm-up alone: accuracy every ``--every`` steps
and seconds per step, to size ``algorithm.warmup_steps``; with ``algorithm.warmup_cache`` it keeps
the weights of each probe there, so runs warmed up to one of those steps load them.
``--prepare-policy`` and ``--prepare-draft`` build the warmed-up policy (to ``algorithm.warmup_target``)
and draft into that cache the same way, so variants started at once share them.

    PYTHONPATH=. python3 benchmarks/rlhf.py --phase time --variants spectr,plain --wall-s 120
    PYTHONPATH=. python3 benchmarks/rlhf.py --smoke      # CPU, configs/rlhf_tiny.yaml, seconds
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from srl.algorithms.grpo import warm_up  # noqa: E402
from srl.config import load_experiment  # noqa: E402
from srl.envs.tokens import build_task, finish_completions, max_new_tokens, task_space  # noqa: E402
from srl.generation import PlainSampler, SamplingParams  # noqa: E402
from srl.plan import build_policy  # noqa: E402

SMALL_CALLS = ["workers.actors.envs_per_actor=1", "workers.actors.ring=1", "workers.actors.count=8",
               "workers.policies.max_batch=16"]
"""16 completions (one prompt's group) per generation call instead of 256."""
VARIANTS = {"spectr": [], "plain": ["generation.mode=plain"], "spectr_stale_draft": ["draft.align=false"],
            "spectr_frozen_draft": ["draft.align_updates=150"], "standard": ["generation.mode=standard"],
            "spectr_tv": ["draft.loss=tv"], "spectr_tv_frozen": ["draft.loss=tv", "draft.align_updates=80"],
            "sophia": ["optimizer.type=sophia"], "spectr_lr6e-5": ["optimizer.lr=6e-5"],
            "plain_fp32": ["generation.mode=plain", "policy.autocast=none"],
            "spectr_fp32": ["policy.autocast=none"], "standard_stale_draft": ["generation.mode=standard", "draft.align=false"],
            "plain_b16": ["generation.mode=plain"] + SMALL_CALLS, "standard_b16": ["generation.mode=standard"] + SMALL_CALLS}
CURVE_KEYS = ("wall_s", "version", "env_steps", "mean_return", "charts/reward", "generation/acceptance_rate",
              "generation/tokens_per_pass", "generation/batch", "generation/batch_s", "generation/busy_s", "draft/acceptance_rate",
              "generation/draft_version", "losses/kl", "losses/approx_kl", "losses/logp_gap", "perf/train_s",
              "charts/policy_lag", "rates/generation/0/batches_per_s", "rates/trainer/0/batches_per_s")


class Evaluator:
    """Greedy exact-match accuracy of a policy on ``n`` held-out prompts."""

    def __init__(self, cfg, n: int = 1024, seed: int = 10**6, model: torch.nn.Module | None = None):
        task = build_task(cfg)
        self.task = type(task)(**{**cfg.env.kwargs, "partial": False}) if "partial" in cfg.env.kwargs else task
        self.device = cfg.workers.trainers.device
        torch.manual_seed(cfg.seed)
        if model is None:
            model = build_policy(task_space(cfg, task), cfg.policy)
        self.policy = model.to(self.device).eval()
        self.prompts = np.asarray(task.sample_prompts(n, np.random.default_rng(seed)), np.int64)
        self.N = max_new_tokens(cfg, task)
        self.sampler = PlainSampler(self.policy, n, self.prompts.shape[1] + self.N + 16,
                                    SamplingParams(temperature=0.0), cuda_graph=False)

    @torch.no_grad()
    def __call__(self, weights: dict | None = None) -> float:
        if weights is not None:
            self.policy.load_state_dict(weights)
        self.policy.eval()
        out = self.sampler.generate(torch.from_numpy(self.prompts).to(self.device), self.N).tokens.cpu().numpy()
        tokens, _, _ = finish_completions(out, np.zeros(out.shape, np.float32), self.task.eos_id, self.task.pad_id)
        return float(np.mean(self.task.reward(self.prompts, tokens)))


class _Enough(Exception):
    """The warm-up probe reached ``--stop-at``."""


def probe_warmup(cfg, steps: int, every: int, out: str = "", stop_at: float = 2.0) -> dict:
    """Accuracy of the supervised warm-up every ``every`` steps, and its seconds per step (the rows
    so far are saved to ``out`` at each probe). With ``algorithm.warmup_cache`` the weights at each
    probe are kept there, under the key a run with ``warmup_steps`` = that step and no
    ``warmup_target`` looks up. Stops once the accuracy reaches ``stop_at``."""
    from srl.algorithms.grpo import save_warmup, warmup_path

    a = cfg.algorithm
    ev = Evaluator(cfg)
    task = build_task(cfg)
    torch.manual_seed(cfg.seed)
    policy = ev.policy.train()
    rows, t_train, t0 = [], 0.0, time.perf_counter()

    def note(step: int, loss) -> None:
        nonlocal t_train, t0
        if step % every == 0 or step == steps:
            if ev.device != "cpu":
                torch.cuda.synchronize()
            t_train += time.perf_counter() - t0
            if a.warmup_cache:
                save_warmup(warmup_path(a.warmup_cache, policy, task, step, a.warmup_lr, cfg.seed, a.warmup_batch,
                                        target=None), policy)
            rows.append({"step": step, "loss": float(loss), "accuracy": ev(), "train_s": t_train})
            policy.train()
            print("warmup", json.dumps(rows[-1]), flush=True)
            save(out, {"curve": rows, "partial": True})
            t0 = time.perf_counter()
            if rows[-1]["accuracy"] >= stop_at:
                raise _Enough

    try:
        warm_up(policy, task, steps, a.warmup_lr, ev.device, cfg.seed, batch=a.warmup_batch, callback=note)
    except _Enough:
        pass
    done = rows[-1]["step"] if rows else steps
    return {"curve": rows, "s_per_step": t_train / max(done, 1), "params": sum(p.numel() for p in policy.parameters())}


def prepare_policy(cfg) -> dict:
    """Warm the policy up as the trainer does (``algorithm.warmup_*``, the trainer's seed), into
    ``algorithm.warmup_cache``, so variants run at once start from the same weights: the steps
    taken, the seconds, and the held-out accuracy reached."""
    from srl.algorithms.grpo import warm_up

    a, ev = cfg.algorithm, Evaluator(cfg)
    steps: list[int] = []  # the steps taken (none on a cache hit)
    t0 = time.perf_counter()
    warm_up(ev.policy.train(), build_task(cfg), a.warmup_steps, a.warmup_lr,
            ev.device, cfg.seed, batch=a.warmup_batch, cache=a.warmup_cache, target=a.warmup_target,
            callback=lambda step, loss: steps.append(step))
    return {"policy_warmup_steps": len(steps), "policy_warmup_s": time.perf_counter() - t0,
            "policy_accuracy": ev(), "warmup_target": a.warmup_target}


def prepare_draft(cfg) -> dict:
    """Build (and with ``algorithm.warmup_cache``, keep) the warmed-up draft the workers build."""
    from srl.workers.generation import build_draft

    t0 = time.perf_counter()
    draft = build_draft(cfg, build_task(cfg).vocab_size, cfg.workers.policies.device)
    seconds = time.perf_counter() - t0
    return {"draft_warmup_s": seconds, "draft_accuracy": Evaluator(cfg, model=draft)()}


def summarize(run_dir: str) -> dict:
    """Time per RL step, the generation worker's busy share, and the logged curve of one run."""
    rows = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    steps = [(r["wall_s"], r["version"]) for r in rows if r.get("version")]
    per_step = [(t1 - t0) / (v1 - v0) for (t0, v0), (t1, v1) in zip(steps, steps[1:]) if v1 > v0]
    # skip the first intervals: samplers are captured (CUDA graphs) for each new batch size there
    steady = per_step[len(per_step) // 4:] if len(per_step) >= 4 else per_step
    busy = [(r["wall_s"], r["generation/busy_s"]) for r in rows if "generation/busy_s" in r]
    busy = busy[len(busy) // 4:]  # the steady part, as for the step time
    train_s = [r["perf/train_s"] for r in rows[len(rows) // 4:] if "perf/train_s" in r]
    return {
        "rl_step_s": statistics.median(steady) if steady else None,
        "rl_step_s_all": per_step,
        "generation_busy_share": ((busy[-1][1] - busy[0][1]) / (busy[-1][0] - busy[0][0])
                                  if len(busy) >= 2 and busy[-1][0] > busy[0][0] else None),
        "train_s": statistics.median(train_s) if train_s else None,
        "versions": rows[-1].get("version") if rows else None,
        "curve": [{k: r.get(k) for k in CURVE_KEYS if k in r} for r in rows],
    }


def run_one(config: str, run_dir: str, overrides: list[str]) -> None:
    """Child process: one run of the dataflow (no CUDA here: the workers are forked from it)."""
    from srl.experiment import Experiment

    cfg = load_experiment(config, overrides)
    result = Experiment(cfg, run_dir=run_dir).run()
    summary = {"final": result.final_line(), "reason": result.reason, **summarize(run_dir)}
    with open(os.path.join(run_dir, "summary.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh)
    print(os.path.basename(run_dir), json.dumps({k: v for k, v in summary.items()
                                                  if k not in ("curve", "rl_step_s_all")}), flush=True)


def launch(args, name: str, run_dir: str, extra: list[str]) -> subprocess.Popen:
    overrides = VARIANTS[name] + extra + list(args.set)
    cmd = [sys.executable, os.path.abspath(__file__), "--run-one", run_dir, "--config", args.config,
           *[f"--set={o}" for o in overrides]]
    print("launch", name, " ".join(overrides), flush=True)
    return subprocess.Popen(cmd)


def score_checkpoints(ev: Evaluator, run_dir: str, seen: dict) -> None:
    """Accuracy of every checkpoint of ``run_dir`` not scored yet (``seen``: version -> row)."""
    from safetensors.torch import load_file

    from srl.system.checkpoint import FILES, checkpoint_root, list_checkpoints

    for version, name in list_checkpoints(run_dir):
        if version in seen:
            continue
        path = os.path.join(checkpoint_root(run_dir), name)
        try:
            weights = load_file(os.path.join(path, FILES[0]))
            counters = json.load(open(os.path.join(path, FILES[2])))
        except (OSError, ValueError, RuntimeError) as exc:  # pruned under us, or not complete
            print("skip checkpoint", path, exc, flush=True)
            continue
        seen[version] = {"version": version, "env_steps": counters.get("env_steps"), "accuracy": ev(weights)}
        print("accuracy", os.path.basename(run_dir), json.dumps(seen[version]), flush=True)


def run_phase(args, phase: str, tmp: str) -> dict:
    names = args.variants.split(",")
    extra = [f"stop.wall_s={args.wall_s}", "stop.mean_return=null", "log.console=false",
             f"log.every_s={args.log_every}", "log.tensorboard=false"]
    if phase == "time" and not args.score:  # no checkpoint I/O inside the timed window: only the final one
        extra += ["checkpoint.every_seconds=100000", "checkpoint.keep=1"]
    else:
        extra += [f"checkpoint.every_seconds={args.ckpt_every}", "checkpoint.keep=3"]
    dirs = {n: os.path.join(tmp, f"{phase}-{n}") for n in names}
    results: dict = {n: {} for n in names}
    seen: dict = {n: {} for n in names}
    ev = Evaluator(load_experiment(args.config, list(args.set))) if phase == "learn" or args.score else None
    if phase == "time":  # one after another, alone on the GPU
        for n in names:
            watch(args, phase, {n: launch(args, n, dirs[n], extra)}, dirs, seen, ev)
    else:
        watch(args, phase, {n: launch(args, n, dirs[n], extra) for n in names}, dirs, seen, ev)
    ev = ev or Evaluator(load_experiment(args.config, list(args.set)))
    for n in names:
        score_checkpoints(ev, dirs[n], seen[n])
        path = os.path.join(dirs[n], "summary.json")
        results[n] = json.load(open(path)) if os.path.exists(path) else {"error": "no summary (run failed)"}
        acc = [seen[n][v] for v in sorted(seen[n])]
        results[n]["accuracy"] = acc
        if acc:
            results[n]["accuracy_first"], results[n]["accuracy_last"] = acc[0]["accuracy"], acc[-1]["accuracy"]
        print(phase, n, json.dumps({k: v for k, v in results[n].items()
                                    if k not in ("curve", "rl_step_s_all", "accuracy")}), flush=True)
    return results


def watch(args, phase: str, procs: dict, dirs: dict, seen: dict, ev) -> None:
    """Wait for ``procs`` (variant -> process); with an evaluator, score checkpoints as they appear.
    The results so far are saved every ``--save-every`` seconds and at the end."""
    last_save = time.monotonic()
    while any(p.poll() is None for p in procs.values()):
        scored = sum(len(seen[n]) for n in procs)
        for n in procs:
            if ev is not None:
                score_checkpoints(ev, dirs[n], seen[n])
        fresh = sum(len(seen[n]) for n in procs) > scored
        if fresh or time.monotonic() - last_save > args.save_every:  # a cut run keeps what it measured
            save(args.out, {"phase": phase, "partial": True, "variants": partial(dirs, seen)})
            last_save = time.monotonic()
        time.sleep(1.0)
    for n in procs:
        if ev is not None:
            score_checkpoints(ev, dirs[n], seen[n])
    save(args.out, {"phase": phase, "partial": True, "variants": partial(dirs, seen)})


def partial(dirs: dict, seen: dict) -> dict:
    """What the running variants have measured so far: the logged curve and the scored checkpoints."""
    out = {}
    for n, run_dir in dirs.items():
        path = os.path.join(run_dir, "summary.json")
        try:
            out[n] = json.load(open(path)) if os.path.exists(path) else summarize(run_dir)
        except (OSError, ValueError):  # no metrics yet (not started), or a line being written
            out[n] = {}
        out[n]["accuracy"] = [seen[n][v] for v in sorted(seen[n])]
    return out


def save(path: str, results: dict) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "rlhf_addition.yaml"))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--phase", choices=("time", "learn"), default="time")
    ap.add_argument("--wall-s", type=float, default=300.0)
    ap.add_argument("--log-every", type=float, default=2.0)
    ap.add_argument("--ckpt-every", type=float, default=20.0)
    ap.add_argument("--score", action="store_true",
                    help="time phase: checkpoint every --ckpt-every s too and score the checkpoints")
    ap.add_argument("--save-every", type=float, default=10.0, help="learn phase: partial results this often (s)")
    ap.add_argument("--set", action="append", default=[], help="a config override for every variant")
    ap.add_argument("--probe-warmup", type=int, default=0, help="only the supervised warm-up, this many steps")
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--stop-at", type=float, default=2.0, help="warm-up probe: stop at this accuracy")
    ap.add_argument("--prepare-policy", action="store_true",
                    help="only warm the policy up (kept in algorithm.warmup_cache for the runs)")
    ap.add_argument("--prepare-draft", action="store_true",
                    help="only build the warmed-up draft (kept in algorithm.warmup_cache for the runs)")
    ap.add_argument("--run-one", default="", help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="CPU: configs/rlhf_tiny.yaml for a few seconds")
    ap.add_argument("--out", default="")
    ap.add_argument("--keep", default="", help="write the runs here and keep them (default: a temporary folder)")
    args = ap.parse_args()
    if args.run_one:
        return run_one(args.config, args.run_one, list(args.set))
    if args.smoke:
        args.config = os.path.join(ROOT, "configs", "rlhf_tiny.yaml")
        args.wall_s, args.log_every, args.ckpt_every = 15.0, 1.0, 4.0
    if args.prepare_policy:
        results = prepare_policy(load_experiment(args.config, list(args.set)))
    elif args.prepare_draft:
        results = prepare_draft(load_experiment(args.config, list(args.set)))
    elif args.probe_warmup:
        results = probe_warmup(load_experiment(args.config, list(args.set)), args.probe_warmup, args.every, args.out,
                               args.stop_at)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            if args.keep:
                os.makedirs(args.keep, exist_ok=True)
            results = {"phase": args.phase, "settings": vars(args),
                       "variants": run_phase(args, args.phase, args.keep or tmp)}
    results["torch"], results["date"] = torch.__version__, time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    if torch.cuda.is_available():
        results["device"] = torch.cuda.get_device_name()
    save(args.out, results)


if __name__ == "__main__":
    main()
