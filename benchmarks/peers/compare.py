"""Run CartPole-v1 time-to-475 for each peer (and srl when available), 3 seeds each.

Each peer runs in its own virtual environment (created by ``<peer>.sh``); every
run is capped at 10 minutes. Prints a table and writes the results as JSON.

Usage (from the repository root):
    python3 benchmarks/peers/compare.py --out results.json [--install] [--peers sb3,rllib,sample_factory,srl] [--seeds 1,2,3]

Only the standard library is used here, so any Python 3.10+ can drive it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CAP_S = 600

PEERS = {
    "sb3": {"venv": ".venv-sb3", "install": "sb3.sh", "script": "sb3_cartpole.py", "package": "stable-baselines3"},
    "rllib": {"venv": ".venv-rllib", "install": "rllib.sh", "script": "rllib_cartpole.py", "package": "ray"},
    "sample_factory": {
        "venv": ".venv-sample_factory",
        "install": "sample_factory.sh",
        "script": "sample_factory_cartpole.py",
        "package": "sample-factory",
    },
}

FINAL_RE = re.compile(r"^final: env_steps=(\d+) mean_return=(\S+) wall_s=(\S+)", re.M)


def pkg_versions(python: Path, packages: list[str]) -> dict:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for p in sys.argv[1:]:\n"
        "    try: out[p] = m.version(p)\n"
        "    except m.PackageNotFoundError: out[p] = None\n"
        "print(json.dumps(out))\n"
    )
    try:
        res = subprocess.run([str(python), "-c", code, *packages], capture_output=True, text=True, timeout=120)
        return json.loads(res.stdout)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return {}


def rel(path) -> str:
    """A path as written into results: relative to the repository root when inside it."""
    try:
        return str(Path(os.path.abspath(path)).relative_to(REPO))
    except ValueError:
        return str(path)


def run_one(cmd: list[str], cwd: Path, log_path: Path) -> dict:
    """Run one training process; shell_wall_s covers launch to exit."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    load_before = os.getloadavg()[0]  # 1-minute load: other work sharing the CPUs
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=CAP_S)
            timed_out = False
        except BaseException as exc:  # the cap, or the driver itself being stopped
            if not isinstance(exc, subprocess.TimeoutExpired):
                os.killpg(proc.pid, 9)
                raise
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
            rc, timed_out = None, True
    shell_wall = time.monotonic() - t0
    # Reap anything the run left behind in its session (Ray, Sample Factory workers).
    try:
        os.killpg(proc.pid, 9)
    except (ProcessLookupError, PermissionError):
        pass
    text = log_path.read_text(errors="replace")
    out = {"cmd": " ".join(shlex.quote(rel(c) if os.sep in c else c) for c in cmd), "rc": rc, "timed_out": timed_out,
           "shell_wall_s": round(shell_wall, 2), "loadavg_1min_before": load_before,
           "loadavg_1min_after": os.getloadavg()[0], "log": rel(log_path)}
    m = FINAL_RE.search(text)
    if m:
        out.update(env_steps=int(m.group(1)), mean_return=float(m.group(2)), wall_s=float(m.group(3)))
    for line in text.splitlines():
        if line.startswith("stats: "):
            try:
                out["stats"] = json.loads(line[len("stats: "):])
            except ValueError:
                pass
    stats = out.get("stats", {})
    out["reached"] = bool(stats.get("reached", m is not None and out.get("mean_return", 0) >= 475))
    if "wall_s" in out:
        out["env_steps_per_s_wall"] = out["env_steps"] / max(out["wall_s"], 1e-9)
        out["env_steps_per_s_train"] = stats.get("env_steps_per_s_train")
    if not m:
        out["error_tail"] = text[-2000:]
    return out


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(name: str, version: str | None, runs: list[dict]) -> dict:
    ok = [r for r in runs if r.get("reached")]
    return {
        "peer": name,
        "version": version,
        "seeds_reached": f"{len(ok)}/{len(runs)}",
        "median_wall_s": median([r["wall_s"] for r in ok]) if len(ok) == len(runs) else None,
        "median_shell_wall_s": median([r["shell_wall_s"] for r in ok]) if len(ok) == len(runs) else None,
        "median_env_steps": median([r["env_steps"] for r in ok]),
        "median_env_steps_per_s_wall": median([r["env_steps_per_s_wall"] for r in ok]),
        "median_env_steps_per_s_train": median([r.get("env_steps_per_s_train") for r in ok]),
        "per_seed_wall_s": [r.get("wall_s") if r.get("reached") else None for r in runs],
        "per_seed_env_steps": [r.get("env_steps") for r in runs],
        "runs": runs,
    }


def fmt(v, spec="{:.1f}"):
    return "-" if v is None else spec.format(v)


def print_table(rows: list[dict]) -> None:
    head = ["peer", "version", "reached", "median s-to-475", "median shell s", "median steps",
            "steps/s (wall)", "steps/s (train)", "per-seed s"]
    lines = [head]
    for r in rows:
        lines.append([
            r["peer"], str(r["version"]), r["seeds_reached"], fmt(r["median_wall_s"]),
            fmt(r["median_shell_wall_s"]), fmt(r["median_env_steps"], "{:.0f}"),
            fmt(r["median_env_steps_per_s_wall"], "{:.0f}"), fmt(r["median_env_steps_per_s_train"], "{:.0f}"),
            " / ".join(fmt(s) for s in r["per_seed_wall_s"]),
        ])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    for i, row in enumerate(lines):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def prepare(name: str, install: bool, errors: dict) -> dict | None:
    """Check (or create) one peer's environment; return how to run it, or None."""
    if name == "srl":
        srl_bin = REPO / ".venv" / "bin" / "srl"
        py = REPO / ".venv" / "bin" / "python"
        check = subprocess.run([str(py), "-c", "import srl.cli"], capture_output=True, text=True) \
            if py.exists() else None
        if check is None or check.returncode != 0 or not srl_bin.exists():
            errors["srl"] = "srl is not importable from the repository's .venv"
            print(f"[skip] srl: {errors['srl']}", flush=True)
            return None
        versions = pkg_versions(py, ["srl", "torch", "gymnasium", "numpy"])
        return {"version": versions.get("srl"), "versions": versions, "cwd": REPO,
                "cmd": lambda seed: [str(srl_bin), "run", "configs/cartpole_ppo.yaml", f"seed={seed}"]}
    if name not in PEERS:
        errors[name] = "unknown peer"
        print(f"[skip] {name}: unknown peer (known: {', '.join(PEERS)}, srl)", flush=True)
        return None
    spec = PEERS[name]
    py = HERE / spec["venv"] / "bin" / "python"
    if not py.exists() and install:
        print(f"[install] {name}", flush=True)
        res = subprocess.run(["bash", str(HERE / spec["install"])], capture_output=True, text=True)
        if res.returncode != 0:
            errors[name] = "install failed: " + (res.stderr or res.stdout)[-2000:]
            print(f"[fail] {name}: {errors[name]}", flush=True)
            return None
    if not py.exists():
        errors[name] = f"virtual environment missing: run bash benchmarks/peers/{spec['install']}"
        print(f"[skip] {name}: {errors[name]}", flush=True)
        return None
    versions = pkg_versions(py, [spec["package"], "torch", "gymnasium", "numpy"])
    script = HERE / spec["script"]
    return {"version": versions.get(spec["package"]), "versions": versions, "cwd": HERE,
            "cmd": lambda seed: [str(py), str(script), "--seed", str(seed)]}


def main() -> int:
    # A SIGTERM to the driver ends the run in progress too (see run_one).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="path of the JSON results file")
    parser.add_argument("--peers", default="sb3,rllib,sample_factory,srl")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--install", action="store_true", help="create missing peer virtual environments first")
    parser.add_argument("--logs", default=str(HERE / "results" / "logs"), help="folder for per-run logs")
    parser.add_argument("--order", choices=["interleaved", "grouped"], default="interleaved",
                        help="interleaved (default): seed 1 of every peer, then seed 2, ...; so that load "
                             "from other work on a shared machine falls on all peers alike. grouped: "
                             "all seeds of one peer, then the next peer")
    args = parser.parse_args()

    seeds = [int(s) for s in args.seeds.split(",")]
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    errors: dict = {}
    ready = {}
    for name in args.peers.split(","):
        prepared = prepare(name, args.install, errors)
        if prepared is not None:
            ready[name] = prepared

    if args.order == "interleaved":
        plan = [(name, seed) for seed in seeds for name in ready]
    else:
        plan = [(name, seed) for name in ready for seed in seeds]
    runs: dict[str, dict[int, dict]] = {name: {} for name in ready}
    for name, seed in plan:
        peer = ready[name]
        print(f"[run] {name} seed={seed}", flush=True)
        r = run_one(peer["cmd"](seed), peer["cwd"], logs / f"{name}_seed{seed}.log")
        r["seed"] = seed
        print(f"      -> {r.get('wall_s', 'no final line')} s, {r.get('env_steps')} steps, "
              f"shell {r['shell_wall_s']} s, load {r['loadavg_1min_before']:.1f}", flush=True)
        runs[name][seed] = r

    rows = []
    for name, peer in ready.items():
        row = summarize(name, peer["version"], [runs[name][seed] for seed in seeds])
        row["versions"] = peer["versions"]
        rows.append(row)

    print()
    print_table(rows)
    result = {
        "task": "CartPole-v1, stop when the mean return of the last 20 finished episodes >= 475",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                    "loadavg_at_end": os.getloadavg()},
        "cap_s": CAP_S,
        "seeds": seeds,
        "order": args.order,
        "results": rows,
        "errors": errors,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
