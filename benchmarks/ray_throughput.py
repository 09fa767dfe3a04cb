"""Ray backend vs local mode: env steps/s of the CartPole job on one machine.

The same experiment (``configs/cartpole_ppo.yaml``, learning as it goes) runs once with local
processes and once as Ray actors on a Ray instance this script starts on this host (its own
temp dir, no dashboard). Ray runs always sign frames with a per-run HMAC secret; local runs do
not by default, so a third mode, ``local+hmac``, separates the cost of authentication from the
cost of Ray. The rate is taken from the run's metrics after a warm-up, and modes alternate within
each repeat so that load from other processes hits them alike.

    python benchmarks/ray_throughput.py [--seconds 10] [--repeats 2] [--out ray_throughput.json]

Target: Ray keeps >= 70% of local mode's env steps/s.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time

import yaml

from srl.config import experiment_from_dict
from srl.system.controller import Controller

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "cartpole_ppo.yaml")
SETUPS = {
    "config as is (1 actor, inline policy)": [],
    "2 actors, remote policy worker": ["workers.actors.count=2", "workers.actors.inline_policy=false",
                                       "workers.actors.ring=2", "workers.policies.count=1"],
}
MODES = ("local", "local+hmac", "ray")


def measure(mode: str, setup: list[str], seconds: float, warmup: float) -> dict:
    """One run; env steps/s over the metric rows after ``warmup`` seconds of stepping."""
    data = yaml.safe_load(open(CONFIG))
    tmp = tempfile.mkdtemp(prefix="srl-raybench-")
    try:
        overrides = setup + [
            f"stop.wall_s={seconds + warmup + 4}", "stop.env_steps=null", "stop.mean_return=null",
            f"log.dir={tmp}", "log.tensorboard=false", "log.console=false", "log.every_s=0.5",
            "checkpoint.every_seconds=3600", f"network.hmac={'true' if mode == 'local+hmac' else 'false'}",
            "workers.actors.num_cpus=0.5", "workers.policies.num_cpus=0.5", "workers.trainers.num_cpus=0.5",
        ]
        if mode == "ray":
            overrides.append("cluster.backend=ray")
        cfg = experiment_from_dict(data, overrides)
        scheduler = None
        if mode == "ray":
            from srl.system.ray_scheduler import RayScheduler

            scheduler = RayScheduler(cfg)
        t0 = time.time()
        try:
            result = Controller(cfg, os.path.join(tmp, "run"), scheduler=scheduler, launch_time=t0).run()
        finally:
            if scheduler is not None:
                scheduler.shutdown()
        rows = [json.loads(line) for line in open(os.path.join(result.run_dir, "metrics.jsonl"))]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    started = [r for r in rows if r["env_steps"] > 0]
    steady = [r for r in started if r["wall_s"] >= started[0]["wall_s"] + warmup] if started else []
    sps = float("nan")
    if len(steady) >= 2:
        sps = (steady[-1]["env_steps"] - steady[0]["env_steps"]) / (steady[-1]["wall_s"] - steady[0]["wall_s"])
    first = started[0]["wall_s"] if started else float("nan")
    return {"mode": mode, "env_steps_per_s": sps, "first_step_s": first, "env_steps": result.env_steps,
            "restarts": result.restarts, "dropped_frames": rows[-1].get("dropped_frames", 0)}


def start_ray(num_cpus: int) -> str:
    """A private one-machine Ray instance (own temp dir: other Ray users here are left alone)."""
    import ray

    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="srlray-", dir="/tmp"))
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return ray.__version__


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--ray-cpus", type=int, default=8, help="logical CPUs of the Ray instance")
    p.add_argument("--out", default="ray_throughput.json")
    args = p.parse_args()
    ray_version = start_ray(args.ray_cpus)
    runs = []
    for name, setup in SETUPS.items():
        for rep in range(args.repeats):
            for mode in MODES if rep % 2 == 0 else reversed(MODES):
                r = measure(mode, setup, args.seconds, args.warmup)
                r.update(setup=name, repeat=rep)
                runs.append(r)
                print(f"  {name:40s} {mode:11s} rep {rep}: {r['env_steps_per_s']:9,.0f} steps/s", flush=True)
    table = summarize(runs)
    print_table(table)
    import torch

    meta = {"host": platform.node(), "cpus": os.cpu_count(), "loadavg": os.getloadavg(), "ray": ray_version,
            "torch": torch.__version__, "python": platform.python_version(), "seconds": args.seconds,
            "warmup": args.warmup, "repeats": args.repeats, "config": os.path.relpath(CONFIG, ROOT)}
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump({"meta": meta, "table": table, "runs": runs}, fh, indent=1)
    print(f"wrote {args.out}")


def summarize(runs: list[dict]) -> list[dict]:
    table = []
    for name in SETUPS:
        med = {m: statistics.median(r["env_steps_per_s"] for r in runs if r["setup"] == name and r["mode"] == m)
               for m in MODES}
        table.append({"setup": name, **{f"{m}_sps": med[m] for m in MODES},
                      "ray_vs_local": med["ray"] / med["local"], "ray_vs_local_hmac": med["ray"] / med["local+hmac"]})
    return table


def print_table(table: list[dict]) -> None:
    print(f"\n| setup | local steps/s | local+hmac steps/s | ray steps/s | ray / local | ray / local+hmac |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in table:
        print(f"| {row['setup']} | {row['local_sps']:,.0f} | {row['local+hmac_sps']:,.0f} | {row['ray_sps']:,.0f} "
              f"| {row['ray_vs_local']:.0%} | {row['ray_vs_local_hmac']:.0%} |")


if __name__ == "__main__":
    main()
