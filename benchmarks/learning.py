"""Time-to-target of whole ``srl run`` processes, over seeds.

Each seed is a separate ``srl run CONFIG seed=N ...`` process, timed from launch (the ``final:``
line's ``wall_s``), stopping at the config's ``stop.mean_return``. Prints a table with the
median and writes JSON.

    python benchmarks/learning.py configs/cartpole_ppo.yaml --seeds 1 2 3 [--out f.json] [key=value ...]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

FINAL = re.compile(r"final: env_steps=(\d+) mean_return=(\S+) wall_s=(\S+)")


def run_seed(config: str, seed: int, overrides: list[str], log_dir: str, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "srl.cli", "run", config, f"seed={seed}", f"log.dir={log_dir}",
           "log.console=false", *overrides]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    shell_wall = time.time() - t0
    match = FINAL.search(proc.stdout)
    if proc.returncode != 0 or match is None:
        return {"seed": seed, "ok": False, "error": proc.stderr[-2000:], "shell_wall_s": shell_wall}
    steps, ret, wall = int(match.group(1)), float(match.group(2)), float(match.group(3))
    return {"seed": seed, "ok": True, "env_steps": steps, "mean_return": ret, "wall_s": wall,
            "shell_wall_s": shell_wall, "env_steps_per_s": steps / wall}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--out", default="learning.json")
    args = p.parse_intermixed_args()
    import yaml

    target = yaml.safe_load(open(args.config)).get("stop", {}).get("mean_return")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'seed':>4} {'reached':>8} {'env steps':>10} {'return':>8} {'wall s':>8} {'steps/s':>9}")
        for seed in args.seeds:
            r = run_seed(args.config, seed, args.overrides, tmp, args.timeout)
            r["reached"] = bool(r["ok"] and target is not None and r["mean_return"] >= target)
            rows.append(r)
            if r["ok"]:
                print(f"{seed:>4} {str(r['reached']):>8} {r['env_steps']:>10,d} {r['mean_return']:>8.1f} "
                      f"{r['wall_s']:>8.2f} {r['env_steps_per_s']:>9,.0f}", flush=True)
            else:
                print(f"{seed:>4} failed: {r['error'][-300:]}", flush=True)
    ok = [r for r in rows if r["ok"]]
    summary = {
        "config": args.config, "overrides": args.overrides, "target": target,
        "median_wall_s": statistics.median(r["wall_s"] for r in ok) if ok else None,
        "median_env_steps": statistics.median(r["env_steps"] for r in ok) if ok else None,
        "all_reached": all(r["reached"] for r in rows),
        "machine": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "runs": rows,
    }
    if ok:
        print(f"median wall_s={summary['median_wall_s']:.2f} median env_steps={summary['median_env_steps']:,.0f} "
              f"all reached={summary['all_reached']}")
    with open(args.out, "w") as fh:
        json.dump(summary, fh, indent=1)


if __name__ == "__main__":
    main()
