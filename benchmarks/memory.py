"""Memory policies side by side: transformer vs GRU vs MLP on tasks that need memory.

Each (task, policy, seed) is one ``srl run`` process (see ``learning.py``) with a wall-clock
budget; the MLP is the negative control (the task needs memory, so it should stay at chance).

- ``repeat_first``: ``configs/memory_transformer.yaml`` (name the cue 64 steps back; success
  rate, chance 0.25), stopping at success >= 0.95 over the last 200 episodes or at the budget;
- ``popgym``: ``configs/memory_popgym.yaml`` (POPGym RepeatPreviousEasy), at equal env steps.

    python benchmarks/memory.py --tasks repeat_first popgym --seeds 1 --minutes 8 --out memory.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from learning import run_seed  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = {
    "repeat_first": ("configs/memory_transformer.yaml", 0.95, []),
    "popgym": ("configs/memory_popgym.yaml", None, ["stop.env_steps=150000"]),
}
POLICIES = {
    "transformer": [],
    "gru": ["policy.type=gru"],
    "mlp": ["policy.type=mlp", "policy.hidden=[64,64]"],
}


def _reason(log_dir: str) -> str | None:
    """Why the run stopped (``result.json`` of the one run under ``log_dir``)."""
    for name in os.listdir(log_dir) if os.path.isdir(log_dir) else []:
        path = os.path.join(log_dir, name, "result.json")
        if os.path.exists(path):
            return json.load(open(path)).get("reason")
    return None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    p.add_argument("--seeds", type=int, nargs="+", default=[1])
    p.add_argument("--minutes", type=float, default=8.0, help="wall budget of one run")
    p.add_argument("--out", default="memory.json")
    args = p.parse_args()
    rows = []
    print(f"{'task':<13} {'policy':<12} {'seed':>4} {'reached':>8} {'env steps':>10} {'return':>7} {'wall s':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            config, target, extra = TASKS[task]
            for policy in args.policies:
                for seed in args.seeds:
                    over = [*extra, *POLICIES[policy], f"stop.wall_s={args.minutes * 60}"]
                    log_dir = os.path.join(tmp, f"{task}-{policy}-{seed}")
                    r = run_seed(os.path.join(ROOT, config), seed, over, log_dir, timeout=args.minutes * 60 + 120)
                    r.update(task=task, policy=policy, overrides=over, reason=_reason(log_dir))
                    r["reached"] = r["reason"] == "mean_return"  # the stop rule fired (window mean >= target)
                    rows.append(r)
                    if r["ok"]:
                        print(f"{task:<13} {policy:<12} {seed:>4} {str(r['reached']):>8} {r['env_steps']:>10,d} "
                              f"{r['mean_return']:>7.2f} {r['wall_s']:>7.1f}", flush=True)
                    else:
                        print(f"{task:<13} {policy:<12} {seed:>4} failed: {r['error'][-300:]}", flush=True)
    summary = {"minutes_per_run": args.minutes, "runs": rows,
               "machine": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}}
    with open(args.out, "w") as fh:
        json.dump(summary, fh, indent=1)


if __name__ == "__main__":
    main()
