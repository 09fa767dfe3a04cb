"""Ray backend vs local mode: env steps/s of the CartPole job on one machine.

The same experiment (``configs/cartpole_ppo.yaml``, learning as it goes) runs once with local
processes and once as Ray actors on a Ray instance this script starts on this host (its own
temp dir, no dashboard). Ray runs always sign frames with a per-run HMAC secret; local runs do
not by default, so a third mode, ``local+hmac``, separates the cost of authentication from the
cost of Ray. The rate is taken from the run's metrics after a warm-up, and modes alternate within
each repeat so that load from other processes hits them alike. Besides env steps per second,
it reports env steps per CPU-second (all processes of the run, Ray's daemons included in Ray
mode): on a machine shared with other work the wall-clock rate follows everybody's load, the
CPU cost per step much less so.

    python benchmarks/ray_throughput.py [--seconds 10] [--repeats 2] [--out ray_throughput.json]

Target: Ray keeps >= 70% of local mode's env steps/s.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import tempfile
import threading
import time

import yaml

from srl.config import experiment_from_dict
from srl.experiment import controller_for as Controller

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "cartpole_ppo.yaml")
SETUPS = {
    "config as is (1 actor, inline policy)": [],
    "2 actors, remote policy worker": ["workers.actors.count=2", "workers.actors.inline_policy=false",
                                       "workers.actors.ring=2", "workers.policies.count=1"],
}
MODES = ("local", "local+hmac", "ray")


def measure(mode: str, setup: list[str], seconds: float, warmup: float) -> dict:
    """One run. Once env steps flow and ``warmup`` seconds have passed, a side thread counts env
    steps, wall time and CPU time for ``seconds``: CPU of this process and its descendants (local
    workers; or Ray's workers and Ray's own daemons), so steps per CPU-second holds up on a busy
    machine where wall-clock rates swing with other people's load."""
    data = yaml.safe_load(open(CONFIG))
    tmp = tempfile.mkdtemp(prefix="srl-raybench-")
    overrides = setup + [
        f"stop.wall_s={seconds + warmup + 60}", "stop.env_steps=null", "stop.mean_return=null",
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

        scheduler = RayScheduler(cfg.cluster.address)
    controller = Controller(cfg, os.path.join(tmp, "run"), scheduler=scheduler, launch_time=time.time())
    window: dict = {}

    def sample() -> tuple[float, int, float]:
        return time.monotonic(), controller.counters["env_steps"], _tree_cpu_s(os.getpid(), ray_too=mode == "ray")

    def side() -> None:
        while not getattr(controller, "counters", {}).get("env_steps"):
            time.sleep(0.05)
        window["first_step_s"] = time.time() - controller.launch_time
        time.sleep(warmup)
        window["start"] = sample()
        time.sleep(seconds)
        window["end"] = sample()
        os.kill(os.getpid(), signal.SIGINT)  # a clean stop of the run

    thread = threading.Thread(target=side, daemon=True)
    thread.start()
    try:
        result = controller.run()
    finally:
        if scheduler is not None:
            scheduler.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    thread.join(timeout=5)
    (t0, s0, c0), (t1, s1, c1) = window["start"], window["end"]
    return {"mode": mode, "env_steps_per_s": (s1 - s0) / (t1 - t0), "steps_per_cpu_s": (s1 - s0) / max(c1 - c0, 1e-9),
            "cpus_busy": (c1 - c0) / (t1 - t0), "first_step_s": window["first_step_s"], "env_steps": result.env_steps,
            "restarts": result.restarts}


def _tree_cpu_s(root: int, ray_too: bool) -> float:
    """User + system CPU seconds of ``root`` and all its descendants, from /proc. Without
    ``ray_too``, Ray's processes (an idle Ray instance started by this script) are left out."""
    tick = os.sysconf("SC_CLK_TCK")
    parent, cpu, ray_proc = {}, {}, set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read().decode(errors="replace")
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().decode(errors="replace")
        except OSError:
            continue
        name, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        pid = int(entry)
        parent[pid] = int(fields[1])
        cpu[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        if name.startswith("ray::") or "/ray/" in cmd or name in ("raylet", "gcs_server"):
            ray_proc.add(pid)
    total, frontier = 0.0, [root]
    seen = set()
    while frontier:
        pid = frontier.pop()
        if pid in seen:
            continue
        seen.add(pid)
        if pid == root or ray_too or pid not in ray_proc:
            total += cpu.get(pid, 0.0)
            frontier.extend(child for child, par in parent.items() if par == pid)
    return total


def start_ray(num_cpus: int, niceness: int) -> str:
    """A private one-machine Ray instance (own temp dir: other Ray users here are left alone).

    Ray starts its worker processes at niceness 15 by default, so on a machine shared with other
    work they get a fraction of the CPU that local-mode processes (niceness 0) get. ``niceness``
    0 compares the two on equal terms; 15 measures Ray's default on a busy machine."""
    import ray

    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="srlray-", dir="/tmp"))
    os.environ["RAY_worker_niceness"] = str(niceness)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return ray.__version__


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--ray-cpus", type=int, default=8, help="logical CPUs of the Ray instance")
    p.add_argument("--ray-niceness", type=int, default=0,
                   help="niceness of Ray's worker processes (Ray's own default is 15)")
    p.add_argument("--out", default="ray_throughput.json")
    args = p.parse_args()
    import ray

    ray_version = start_ray(args.ray_cpus, args.ray_niceness)
    runs = []
    try:
        for name, setup in SETUPS.items():
            for rep in range(args.repeats):
                for mode in MODES if rep % 2 == 0 else reversed(MODES):
                    r = measure(mode, setup, args.seconds, args.warmup)
                    r.update(setup=name, repeat=rep)
                    runs.append(r)
                    print(f"  {name:40s} {mode:11s} rep {rep}: {r['env_steps_per_s']:9,.0f} steps/s "
                          f"{r['steps_per_cpu_s']:9,.0f} steps/CPU-s  {r['cpus_busy']:.2f} CPUs", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)
    table = summarize(runs)
    print_table(table)
    import torch

    meta = {"host": platform.node(), "cpus": os.cpu_count(), "loadavg": os.getloadavg(), "ray": ray_version,
            "torch": torch.__version__, "python": platform.python_version(), "seconds": args.seconds,
            "ray_worker_niceness": args.ray_niceness,
            "warmup": args.warmup, "repeats": args.repeats, "config": os.path.relpath(CONFIG, ROOT)}
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump({"meta": meta, "table": table, "runs": runs}, fh, indent=1)
    print(f"wrote {args.out}")


def summarize(runs: list[dict]) -> list[dict]:
    table = []
    for name in SETUPS:
        def median(key, mode):
            return statistics.median(r[key] for r in runs if r["setup"] == name and r["mode"] == mode)

        med = {m: median("env_steps_per_s", m) for m in MODES}
        eff = {m: median("steps_per_cpu_s", m) for m in MODES}
        table.append({"setup": name, **{f"{m}_sps": med[m] for m in MODES},
                      **{f"{m}_steps_per_cpu_s": eff[m] for m in MODES},
                      "ray_vs_local": med["ray"] / med["local"], "ray_vs_local_hmac": med["ray"] / med["local+hmac"],
                      "ray_vs_local_per_cpu": eff["ray"] / eff["local"]})
    return table


def print_table(table: list[dict]) -> None:
    print("\n| setup | local steps/s | local+hmac steps/s | ray steps/s | ray / local | ray / local+hmac "
          "| steps per CPU-s: local / local+hmac / ray | ray / local per CPU-s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in table:
        print(f"| {row['setup']} | {row['local_sps']:,.0f} | {row['local+hmac_sps']:,.0f} | {row['ray_sps']:,.0f} "
              f"| {row['ray_vs_local']:.0%} | {row['ray_vs_local_hmac']:.0%} "
              f"| {row['local_steps_per_cpu_s']:,.0f} / {row['local+hmac_steps_per_cpu_s']:,.0f} / "
              f"{row['ray_steps_per_cpu_s']:,.0f} | {row['ray_vs_local_per_cpu']:.0%} |")


if __name__ == "__main__":
    main()
