"""Whole-system throughput: env steps/s of the full actor -> (policy) -> trainer loop.

Runs the null environment (measures srl's own overhead) and CartPole while learning with the
main job's PPO settings (20 epochs over minibatches of 256; ``cartpole4``: 4 epochs), over actors x envs per actor x
inline / remote policy. Each point is a real ``srl`` run on this host; rates are taken after a
warm-up, from the run's metrics. The training batch is one trajectory per actor, so every step
collected can be learned from: ``env steps/s`` counts steps collected, ``learned/s`` the steps
the trainer actually trained on (the rest arrived too stale and were dropped). ``busy`` is the
fraction of wall time the trainer spent in its learner: near 1 means the trainer bounds the run.

    python benchmarks/throughput.py [--seconds 8] [--quick] [--out throughput.json]
    python benchmarks/throughput.py --grid gpu --device cuda     # the GPU machine's grid
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time

import yaml

from srl.config import experiment_from_dict
from srl.experiment import controller_for as Controller

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"null": "configs/null_throughput.yaml", "cartpole": "configs/cartpole_ppo.yaml",
           "cartpole4": "configs/cartpole_ppo.yaml"}
EXTRA = {"cartpole4": ["algorithm.epochs=4"]}  # the main job's PPO with a common 4 epochs per batch


def measure(env: str, actors: int, envs_per_actor: int, inline: bool, seconds: float, warmup: float,
            device: str = "cpu", minibatches: int | None = None, trainers: int = 1, policies: int = 1) -> dict:
    data = yaml.safe_load(open(os.path.join(ROOT, CONFIGS[env])))
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            f"workers.actors.count={actors}", f"workers.actors.envs_per_actor={envs_per_actor}",
            f"workers.actors.inline_policy={'true' if inline else 'false'}",
            f"workers.actors.ring={1 if inline else 2}", f"workers.policies.count={policies}",
            f"workers.policies.device={device}", f"workers.trainers.device={device}",
            f"workers.trainers.count={trainers}",
            f"stop.wall_s={seconds + warmup + 120}", "stop.env_steps=null", "stop.mean_return=null",
            f"log.dir={tmp}", "log.tensorboard=false", "log.console=false", "log.every_s=0.5",
            "checkpoint.every_seconds=3600",
            f"algorithm.batch_size={actors * envs_per_actor * 32}", "workers.actors.rollout_len=32",
            f"algorithm.minibatches={minibatches or max(1, actors * envs_per_actor * 32 // 256)}",
        ]
        cfg = experiment_from_dict(data, overrides + EXTRA.get(env, []))
        t0 = time.time()
        controller = Controller(cfg, os.path.join(tmp, "run"), launch_time=t0)
        threading.Thread(target=_stop_after_window, args=(controller, warmup + seconds), daemon=True).start()
        result = controller.run()
        rows = [json.loads(line) for line in open(os.path.join(result.run_dir, "metrics.jsonl"))]
    started = [r for r in rows if r["env_steps"] > 0]
    steady = [r for r in started if r["wall_s"] >= started[0]["wall_s"] + warmup] if started else []
    if len(steady) < 2:
        sps = learned = float("nan")
    else:
        span = steady[-1]["wall_s"] - steady[0]["wall_s"]
        sps = (steady[-1]["env_steps"] - steady[0]["env_steps"]) / span
        learned = (steady[-1].get("learned_steps", 0) - steady[0].get("learned_steps", 0)) / span
    return {"env": env, "actors": actors, "envs_per_actor": envs_per_actor, "policy": "inline" if inline else "remote",
            "device": device, "trainers": trainers, "policies": policies,
            "env_steps_per_s": sps, "learned_env_steps_per_s": learned, "env_steps": result.env_steps,
            "versions": rows[-1].get("version", 0), "mean_return": result.mean_return,
            "trainer_busy": _median([r.get("perf/trainer_busy") for r in steady]),
            "train_s": _median([r.get("perf/train_s") for r in steady]),
            "policy_lag": _median([r.get("charts/policy_lag") for r in steady])}


def _stop_after_window(controller, window_s: float) -> None:
    """Stop the run ``window_s`` after its first env step: startup time is not in the window."""
    while not controller.counters.get("env_steps"):
        time.sleep(0.05)
    time.sleep(window_s + 0.6)
    controller.request_stop()


def _median(values: list) -> float:
    values = [v for v in values if isinstance(v, (int, float))]
    return float(sorted(values)[len(values) // 2]) if values else float("nan")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--quick", action="store_true", help="a 4-point grid")
    p.add_argument("--out", default="throughput.json")
    p.add_argument("--grid", choices=("cpu", "gpu"), default="cpu",
                   help="gpu: actors 1-14, inline and remote, null and CartPole (4 epochs), fixed minibatch count")
    p.add_argument("--device", default="cpu", help="device of the policy workers and the trainer")
    p.add_argument("--minibatches", type=int, default=None, help="fixed minibatch count (default: 256-step minibatches)")
    p.add_argument("--policies", type=int, default=1)
    p.add_argument("--actors", default="1,2,4,8,14", help="gpu grid: actor counts")
    p.add_argument("--envs", default="null,cartpole4", help="gpu grid: environments")
    args = p.parse_args()
    grid = [(e, a, n, i) for e in ("null", "cartpole", "cartpole4") for a in (1, 2) for n in (16, 64)
            for i in (True, False)]
    if args.grid == "gpu":
        grid = [(e, a, 64, i) for e in args.envs.split(",") for i in (True, False)
                for a in (int(x) for x in args.actors.split(","))]
    if args.quick:
        grid = [("null", 2, 64, False), ("null", 1, 64, True), ("cartpole", 1, 8, True), ("cartpole", 2, 64, False)]
    results = []
    print(f"{'env':9} {'actors':>6} {'envs':>5} {'policy':>7} {'env steps/s':>12} {'learned/s':>10} {'versions':>9} "
          f"{'busy':>5} {'lag':>5}")
    for env, actors, n, inline in grid:
        r = measure(env, actors, n, inline, args.seconds, args.warmup, args.device, args.minibatches,
                    policies=args.policies)
        results.append(r)
        print(f"{env:9} {actors:>6} {n:>5} {r['policy']:>7} {r['env_steps_per_s']:>12,.0f} "
              f"{r['learned_env_steps_per_s']:>10,.0f} {r['versions']:>9} {r['trainer_busy']:>5.2f} "
              f"{r['policy_lag']:>5.2f}", flush=True)
        with open(args.out, "w") as fh:  # as we go: a run cut short still leaves its points
            json.dump({"results": results}, fh, indent=1)
    meta = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}
    with open(args.out, "w") as fh:
        json.dump({"meta": meta, "results": results}, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
