"""RL with a language-model policy through the whole dataflow: plain vs speculative generation.

GPU (one H200; not run yet): ``configs/rlhf_addition.yaml`` (a ~100M policy warmed up by supervised
steps, GRPO, SpecTr K-SEQ with a ~10M draft kept aligned by the draft worker) in variants that
differ in one field each:

- ``spectr``: the config as it is;
- ``plain``: ``generation.mode=plain`` (no draft);
- ``spectr_stale_draft``: ``draft.align=false`` (the draft never follows the policy: acceptance
  should fall as the policy moves);
- ``sophia``: ``optimizer.type=sophia``.

Per variant it reports the time per RL step (median interval between weight versions), the
generation worker's busy share of the wall time, acceptance over training, the mean reward per
version, and exact-match accuracy (greedy) on held-out prompts for the warmed-up policy and for
the final checkpoint.

    PYTHONPATH=. python3 benchmarks/rlhf.py [--variants spectr,plain] [--wall-s 1800] [--out rlhf.json]
    PYTHONPATH=. python3 benchmarks/rlhf.py --smoke      # CPU, configs/rlhf_tiny.yaml, seconds
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

import numpy as np
import torch

from srl.algorithms.grpo import warm_up
from srl.config import load_experiment
from srl.envs.tokens import build_task, max_new_tokens, task_space
from srl.experiment import Experiment
from srl.generation import PlainSampler, SamplingParams
from srl.plan import build_policy
from srl.system.checkpoint import load_latest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {"spectr": [], "plain": ["generation.mode=plain"], "spectr_stale_draft": ["draft.align=false"],
            "sophia": ["optimizer.type=sophia", "optimizer.lr=1.0e-5"]}


@torch.no_grad()
def accuracy(cfg, weights: dict | None, n: int = 1024, seed: int = 10**6) -> float:
    """Exact-match accuracy of greedy completions on n held-out prompts (a seed no actor uses)."""
    task = build_task(cfg)
    exact = type(task)(**{**cfg.env.kwargs, "partial": False}) if "partial" in cfg.env.kwargs else task
    info = task_space(cfg, task)
    device = cfg.workers.policies.device
    torch.manual_seed(cfg.seed)
    policy = build_policy(info, cfg.policy).to(device)
    if weights is None:
        if cfg.algorithm.warmup_steps:
            with torch.enable_grad():
                warm_up(policy, task, cfg.algorithm.warmup_steps, cfg.algorithm.warmup_lr, device, cfg.seed)
    else:
        policy.load_state_dict(weights)
    policy.eval()
    prompts = task.sample_prompts(n, np.random.default_rng(seed))
    N = max_new_tokens(cfg, task)
    sampler = PlainSampler(policy, n, prompts.shape[1] + N + 16, SamplingParams(temperature=0.0),
                           cuda_graph=device != "cpu")
    out = sampler.generate(torch.from_numpy(prompts).to(device), N).tokens.cpu().numpy()
    from srl.envs.tokens import finish_completions

    tokens, _, _ = finish_completions(out, np.zeros(out.shape, np.float32), task.eos_id, task.pad_id)
    return float(np.mean(exact.reward(prompts, tokens)))


def summarize(run_dir: str) -> dict:
    rows = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    steps = [(r["wall_s"], r["version"]) for r in rows if r.get("version")]
    per_step = [(t1 - t0) / (v1 - v0) for (t0, v0), (t1, v1) in zip(steps, steps[1:]) if v1 > v0]
    gen_busy = [r.get("rates/generation/0/batches_per_s", 0.0) * r.get("generation/batch_s", 0.0) for r in rows]
    return {
        "rl_step_s": statistics.median(per_step) if per_step else None,
        "generation_busy_share": statistics.mean(gen_busy) if gen_busy else None,
        "trainer_busy_share": statistics.mean(r.get("perf/trainer_busy", 0.0) for r in rows),
        "versions": rows[-1]["version"],
        "curve": [{k: r.get(k) for k in ("wall_s", "version", "charts/reward", "generation/acceptance_rate",
                                          "generation/tokens_per_pass", "draft/acceptance_rate")} for r in rows],
    }


def run_variant(config: str, name: str, overrides: list[str], out_dir: str) -> dict:
    cfg = load_experiment(config, overrides)
    run_dir = os.path.join(out_dir, name)
    result = Experiment(cfg, run_dir=run_dir).run()
    ckpt = load_latest(run_dir)
    summary = summarize(run_dir)
    summary.update(final=result.final_line(), reason=result.reason,
                   accuracy_start=accuracy(cfg, None), accuracy_end=accuracy(cfg, ckpt.weights if ckpt else None))
    print(name, json.dumps({k: v for k, v in summary.items() if k != "curve"}), flush=True)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "rlhf_addition.yaml"))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--wall-s", type=float, default=1800.0)
    ap.add_argument("--smoke", action="store_true", help="CPU: configs/rlhf_tiny.yaml for a few seconds")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    config, extra = args.config, [f"stop.wall_s={args.wall_s}", "log.console=false"]
    if args.smoke:
        config = os.path.join(ROOT, "configs", "rlhf_tiny.yaml")
        extra = ["stop.wall_s=20", "stop.mean_return=null", "log.console=false", "log.every_s=1.0"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants.split(","):
            results[name] = run_variant(config, name, VARIANTS[name] + extra, tmp)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
