"""Soak: a long null-env run with a remote policy; every worker's memory and the run's rate at
the start and the end, and whether any worker got stuck.

    python benchmarks/soak.py --minutes 60 --out soak.json

A worker is "stuck" if it went longer than 5 s without a heartbeat while the run was live. RSS is
read from /proc for every worker process at the end of the first and of the last window.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time

import yaml

from srl.config import experiment_from_dict
from srl.experiment import controller_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WINDOW_S = 60.0


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def snapshot(ctl) -> dict:
    out = {}
    for name in ctl.specs:
        try:
            out[name] = rss_mib(ctl.scheduler.pid(name))
        except (OSError, TypeError):
            out[name] = float("nan")
    return out


def watch(ctl, minutes: float, report: dict) -> None:
    while not ctl.counters.get("env_steps"):
        time.sleep(0.1)
    start = time.monotonic()
    marks, gaps = [], {}
    end = start + minutes * 60
    while time.monotonic() < end:
        now = time.monotonic()
        marks.append((now - start, ctl.counters["env_steps"]))
        for name, seen in ctl.last_seen.items():
            gaps[name] = max(gaps.get(name, 0.0), now - seen)
        if len(marks) == int(WINDOW_S) + 1:
            report["rss_start_mib"] = snapshot(ctl)
        time.sleep(1.0)
    report["rss_end_mib"] = snapshot(ctl)
    report["longest_silence_s"] = gaps
    first, last = marks[: int(WINDOW_S) + 1], marks[-int(WINDOW_S) - 1:]
    report["sps_start"] = (first[-1][1] - first[0][1]) / (first[-1][0] - first[0][0])
    report["sps_end"] = (last[-1][1] - last[0][1]) / (last[-1][0] - last[0][0])
    ctl.request_stop()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=60.0)
    p.add_argument("--out", default="soak.json")
    args = p.parse_args()
    data = yaml.safe_load(open(os.path.join(ROOT, "configs", "null_throughput.yaml")))
    report: dict = {"minutes": args.minutes}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = experiment_from_dict(data, ["stop.wall_s=null", f"stop.env_steps={10**13}", f"log.dir={tmp}",
                                          "log.console=false", "log.every_s=5", "checkpoint.every_seconds=30"])
        ctl = controller_for(cfg, os.path.join(tmp, "run"))
        threading.Thread(target=watch, args=(ctl, args.minutes, report), daemon=True).start()
        result = ctl.run()
        report.update(env_steps=result.env_steps, restarts=result.restarts, reason=result.reason)
    growth = {n: report["rss_end_mib"][n] / report["rss_start_mib"][n] - 1 for n in report["rss_end_mib"]}
    report["rss_growth"] = growth
    report["stuck"] = [n for n, g in report["longest_silence_s"].items() if g > 5.0]
    print(f"{'worker':12} {'rss start MiB':>14} {'rss end MiB':>12} {'growth':>8} {'longest silence s':>18}")
    for n in sorted(growth):
        print(f"{n:12} {report['rss_start_mib'][n]:>14.1f} {report['rss_end_mib'][n]:>12.1f} {growth[n]:>8.1%} "
              f"{report['longest_silence_s'].get(n, float('nan')):>18.2f}")
    print(f"steps/s start {report['sps_start']:,.0f} end {report['sps_end']:,.0f}; restarts {report['restarts']}; "
          f"stuck {report['stuck'] or 'none'}")
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
