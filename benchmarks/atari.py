"""Atari on one machine, side by side: frames/s of the env alone, of srl while learning, of Sample
Factory 2.1.1 on the same game and cores, and the time srl takes to reach Pong +18.

Frames are counted the way EnvPool and Sample Factory count them: env (agent) steps x frame skip 4.

1. ``ceiling``: ale-py's C++ vector env (the one srl's actors step) with random actions on
   ``--threads`` threads, nothing else: the box's limit for this game.
2. ``srl``: ``configs/atari_pong.yaml`` (APPO, Nature CNN) over ``--actors`` actor counts, policy
   worker and trainer on ``--device``; rates from the run's metrics after a warm-up, as
   ``benchmarks/throughput.py`` takes them (collected frames/s and learned frames/s).
3. ``sf``: Sample Factory 2.1.1 APPO with ``sf_examples/atari``'s settings and ``--threads``
   rollout workers (``benchmarks/peers/sample_factory_atari.py``), from its own ``--target``
   folder (``benchmarks/atari_setup.sh``) on the subprocess's PYTHONPATH.
4. ``pong18``: ``configs/atari_pong.yaml`` until the last 20 games average +18: frames, minutes
   (and Sample Factory's with ``--sf-pong18``).

    python benchmarks/atari.py --device cuda --out benchmarks/results/atari_h200.json
    python benchmarks/atari.py --parts ceiling,srl --actors 1,2 --seconds 10 --device cpu   # a laptop
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import _median, _stop_after_window  # noqa: E402

from srl.config import experiment_from_dict  # noqa: E402
from srl.envs.atari import frame_skip, make_atari_vector_env  # noqa: E402
from srl.experiment import controller_for  # noqa: E402
from srl.monitor import WORKER_SECONDS  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PONG = os.path.join(ROOT, "configs", "atari_pong.yaml")
SF_RUNNER = os.path.join(ROOT, "benchmarks", "peers", "sample_factory_atari.py")
SF_TARGET = os.environ.get("SF_TARGET", "/tmp/sf-atari")  # benchmarks/atari_setup.sh install


def ceiling(env_id: str, kwargs: dict, threads: int, envs: int, seconds: float) -> dict:
    """Frames/s of the vector env alone, random actions drawn in advance."""
    env = make_atari_vector_env(env_id, {**kwargs, "num_threads": threads}, envs)
    env.reset(seed=0)
    n = env.single_action_space.n
    actions = np.random.default_rng(0).integers(0, n, (256, envs))
    for i in range(20):  # warm-up: threads started, first resets done
        env.step(actions[i])
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        env.step(actions[steps % 256])
        steps += 1
    elapsed = time.perf_counter() - t0
    env.close()
    fps = steps * envs * frame_skip(kwargs) / elapsed
    return {"part": "ceiling", "env": env_id, "threads": threads, "envs": envs, "frames_per_s": fps}


def _ceiling_worker(args: tuple) -> tuple[int, float]:
    env_id, kwargs, envs, seconds, barrier, seed = args
    env = make_atari_vector_env(env_id, {**kwargs, "num_threads": 1}, envs)
    env.reset(seed=seed)
    actions = np.random.default_rng(seed).integers(0, env.single_action_space.n, (256, envs))
    for i in range(20):
        env.step(actions[i])
    barrier.wait()  # every process steps over the same interval
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        env.step(actions[steps % 256])
        steps += 1
    return steps * envs, time.perf_counter() - t0


def ceiling_processes(env_id: str, kwargs: dict, processes: int, envs: int, seconds: float) -> dict:
    """Frames/s of ``processes`` processes, each one vector env of ``envs`` games on one ALE
    thread, random actions: srl's actor layout with nothing but the envs (built in parallel; one
    vector env of hundreds of games takes about 0.1 s per game to build, one after another)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    barrier = ctx.Manager().Barrier(processes)
    with ctx.Pool(processes) as pool:
        out = pool.map(_ceiling_worker, [(env_id, kwargs, envs, seconds, barrier, i) for i in range(processes)])
    fps = sum(steps / elapsed for steps, elapsed in out) * frame_skip(kwargs)
    return {"part": "ceiling", "mode": "processes", "env": env_id, "threads": processes, "processes": processes,
            "envs": envs * processes, "envs_per_process": envs, "frames_per_s": fps,
            "per_process_frames_per_s": [s / e * frame_skip(kwargs) for s, e in out]}


def srl_point(config: str, actors: int, device: str, seconds: float, warmup: float, extra: list[str]) -> dict:
    """One srl run at ``actors`` actors, measured like benchmarks/throughput.py."""
    data = yaml.safe_load(open(config))
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"workers.actors.count={actors}", f"workers.policies.device={device}",
                     f"workers.trainers.device={device}", f"stop.wall_s={seconds + warmup + 300}",
                     "stop.env_steps=null", "stop.mean_return=null", f"log.dir={tmp}", "log.tensorboard=false",
                     "log.console=false", "log.every_s=1.0", "checkpoint.every_seconds=3600", *extra]
        cfg = experiment_from_dict(data, overrides)
        controller = controller_for(cfg, os.path.join(tmp, "run"), launch_time=time.time())
        threading.Thread(target=_stop_after_window, args=(controller, warmup + seconds), daemon=True).start()
        with _WorkerTally() as tally:
            result = controller.run()
        rows = [json.loads(line) for line in open(os.path.join(result.run_dir, "metrics.jsonl"))]
    skip = frame_skip(cfg.env.kwargs)
    started = [r for r in rows if r["env_steps"] > 0]
    steady = [r for r in started if r["wall_s"] >= started[0]["wall_s"] + warmup] if started else []
    fps = learned = float("nan")
    if len(steady) >= 2:
        span = steady[-1]["wall_s"] - steady[0]["wall_s"]
        fps = (steady[-1]["env_steps"] - steady[0]["env_steps"]) / span * skip
        learned = (steady[-1].get("learned_steps", 0) - steady[0].get("learned_steps", 0)) / span * skip
    a = cfg.workers.actors
    return {"part": "srl", "actors": actors, "envs_per_actor": a.envs_per_actor, "ring": a.ring, "device": device,
            "frames_per_s": fps, "learned_frames_per_s": learned, "versions": rows[-1].get("version", 0) if rows else 0,
            "trainer_busy": _median([r.get("perf/trainer_busy") for r in steady]),
            **{k.split("/")[1]: _median([r.get(k) for r in steady]) for k in WORKER_SECONDS.values()},
            "policy_lag": _median([r.get("charts/policy_lag") for r in steady]), "overrides": overrides,
            "workers": tally.summary(), "steady_rows": [_slim(r) for r in steady]}


class _WorkerTally:
    """Counts what each worker reported during a run (policy workers' requests per forward pass,
    each actor's env steps), by wrapping the monitor's report handler for the run's duration."""

    def __init__(self):
        self.by_worker: dict[str, dict[str, float]] = {}

    def __enter__(self):
        from srl.monitor import RLMonitor

        self._cls, self._orig = RLMonitor, RLMonitor.on_report
        tally = self

        def on_report(monitor, worker, role, event, meta):
            out = tally._orig(monitor, worker, role, event, meta)
            t = tally.by_worker.setdefault(worker, {})
            for key in ("requests", "forward_passes", "env_steps", "learned_steps"):
                if isinstance(meta.get(key), (int, float)):
                    t[key] = t.get(key, 0) + meta[key]
            return out

        RLMonitor.on_report = on_report
        return self

    def __exit__(self, *exc):
        self._cls.on_report = self._orig

    def summary(self) -> dict:
        out = dict(self.by_worker)
        for name, t in out.items():
            if t.get("forward_passes"):
                t["requests_per_forward"] = t["requests"] / t["forward_passes"]
        return out


def _slim(row: dict) -> dict:
    keep = ("env_steps", "wall_s", "charts/SPS", "charts/learned_SPS", "version", "charts/policy_lag",
            "perf/trainer_busy", "perf/train_s", "trainer/dropped_stale", "mean_return", *WORKER_SECONDS.values())
    return {k: row[k] for k in keep if k in row}


def sample_factory(game: str, workers: int, device: str, seconds: float, warmup: float, target: float | None,
                   max_seconds: float, sf_target: str, extra: str, grace: float = 60.0) -> dict:
    """Sample Factory in a subprocess with its own packages first on the path."""
    cmd = [sys.executable, SF_RUNNER, "--game", game, "--workers", str(workers), "--device",
           "gpu" if device.startswith("cuda") else "cpu", "--seconds", str(seconds), "--warmup", str(warmup),
           "--max-seconds", str(max_seconds), "--grace", str(grace), f"--extra={extra}"]
    if target is not None:
        cmd += ["--target", str(target)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([sf_target, os.path.dirname(SF_RUNNER)])}
    t0 = time.time()
    limit = (max_seconds if target is not None else warmup + seconds) + grace + 30
    returncode, stdout, stderr = _run_group(cmd, env, limit)
    lines = [line for line in stdout.splitlines() if line.startswith("stats: ")]
    tail = {"stdout_tail": stdout[-3000:], "stderr_tail": stderr[-3000:]}
    if not lines:
        return {"part": "sf", "error": f"exit {returncode}", "cmd": cmd, **tail}
    stats = json.loads(lines[-1][len("stats: "):])
    return {"part": "sf", "workers": workers, "device": device, "shell_wall_s": time.time() - t0, **stats, **tail}


def _run_group(cmd: list[str], env: dict, limit_s: float) -> tuple[int | None, str, str]:
    """Run ``cmd`` in a process group of its own, output to files (Sample Factory's worker
    processes can outlive its main process and would hold pipes open); the whole group is killed
    when the main process ends or after ``limit_s``."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True, start_new_session=True)
        try:
            proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            pass
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read(), err.read()


def pong18(config: str, device: str, max_minutes: float, extra: list[str]) -> dict:
    """srl until the last 20 games average +18 (the config's stop rule), or ``max_minutes``."""
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"workers.policies.device={device}", f"workers.trainers.device={device}",
                     f"stop.wall_s={max_minutes * 60}", f"log.dir={tmp}", "log.tensorboard=false", "log.console=false",
                     *extra]
        cfg = experiment_from_dict(yaml.safe_load(open(config)), overrides)
        with _WorkerTally() as tally:
            result = controller_for(cfg, os.path.join(tmp, "run")).run()
        rows = [json.loads(line) for line in open(os.path.join(result.run_dir, "metrics.jsonl"))]
    skip = frame_skip(cfg.env.kwargs)
    mean = float("nan") if result.mean_return is None else result.mean_return
    curve = [{"wall_s": r["wall_s"], "frames": r["env_steps"] * skip, "mean_return_last20": r.get("mean_return"),
              "episodic_return": r.get("charts/episodic_return"), "frames_per_s": r.get("charts/SPS", 0) * skip,
              "version": r.get("version"), "policy_lag": r.get("charts/policy_lag"),
              "trainer_busy": r.get("perf/trainer_busy"), "dropped_stale": r.get("trainer/dropped_stale")}
             for r in rows]
    started = [r for r in rows if r["env_steps"] > 0]
    fps = steady_fps = float("nan")
    if len(started) >= 2:
        fps = (started[-1]["env_steps"] - started[0]["env_steps"]) / (started[-1]["wall_s"] - started[0]["wall_s"]) * skip
        steady = [r for r in started if r["wall_s"] >= started[0]["wall_s"] + 20.0]
        if len(steady) >= 2:
            steady_fps = ((steady[-1]["env_steps"] - steady[0]["env_steps"])
                          / (steady[-1]["wall_s"] - steady[0]["wall_s"]) * skip)
    return {"part": "pong18", "reached": bool(mean >= 18), "mean_return": mean, "reason": result.reason,
            "env_steps": result.env_steps, "frames": result.env_steps * skip, "wall_s": result.wall_s,
            "minutes": result.wall_s / 60, "frames_per_s": fps, "frames_per_s_after_20s": steady_fps, "episodes": result.episodes, "overrides": overrides,
            "workers": tally.summary(), "curve": curve}


def _meta(device: str) -> dict:
    import importlib.metadata as md

    import torch

    meta = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "ale_py": md.version("ale-py"), "frame_skip": 4,
            "frames": "env steps x frame skip 4 (EnvPool, Sample Factory)"}
    if device.startswith("cuda"):  # asked of nvidia-smi: CUDA initialised here would make the next run spawn
        meta["gpu"] = _shell(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"])
    meta["cpu"] = _shell(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"])
    meta["srl_commit"] = _shell(["git", "-C", ROOT, "rev-parse", "HEAD"])
    return meta


def _shell(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _row(r: dict) -> str:
    if "error" in r:
        return f"{r['part']:8} error: {r['error'][:200]}"
    what = {"ceiling": f"{r.get('threads')} threads x {r.get('envs')} envs", "srl": f"{r.get('actors')} actors",
            "sf": f"{r.get('workers')} workers", "pong18": f"reached={r.get('reached')}"}[r["part"]]
    if r.get("mode") == "processes":
        what = f"{r['processes']} processes x {r['envs_per_process']} envs"
    fps = r.get("frames_per_s", float("nan"))
    waits = "  ".join(f"{k.split('/')[1]} {r.get(k.split('/')[1], float('nan')):.2f}" for k in WORKER_SECONDS.values())
    extra = (f"learned {r['learned_frames_per_s']:>10,.0f}  lag {r['policy_lag']:.2f}  busy {r['trainer_busy']:.2f}  "
             + waits if r["part"] == "srl" else
             f"frames {r['frames']:,}  {r['minutes']:.1f} min  return {r['mean_return']:.1f}"
             if r["part"] == "pong18" else "")
    return f"{r['part']:8} {what:24} {fps:>12,.0f}  {extra}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--parts", default="ceiling_processes,srl,sf,pong18",
                   help="ceiling (one vector env, --threads ALE threads), ceiling_processes (--threads "
                   "processes of envs_per_actor games, one thread each), srl, sf, pong18")
    p.add_argument("--config", default=PONG)
    p.add_argument("--device", default="cuda")
    p.add_argument("--threads", type=int, default=14, help="ceiling threads; Sample Factory rollout workers")
    p.add_argument("--ceiling-envs", type=int, default=0, help="envs of the ceiling's vector env (0: 8 per thread)")
    p.add_argument("--actors", default="1,2,4,8,14")
    p.add_argument("--seconds", type=float, default=60.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=20.0)
    p.add_argument("--srl-extra", default="", help="more srl overrides, space separated (e.g. policy.autocast=bf16)")
    p.add_argument("--sf-target", default=SF_TARGET)
    p.add_argument("--sf-extra", default="", help="more Sample Factory flags, one string")
    p.add_argument("--sf-grace", type=float, default=60.0, help="Sample Factory's start-up allowance (s) before "
                   "its runner reports whatever it has")
    p.add_argument("--sf-pong18", action="store_true", help="also time Sample Factory to +18")
    p.add_argument("--max-minutes", type=float, default=60.0, help="time-to-+18 cap per run")
    p.add_argument("--out", default="atari.json")
    args = p.parse_args()
    parts = set(args.parts.split(","))
    cfg = experiment_from_dict(yaml.safe_load(open(args.config)))
    extra = args.srl_extra.split()
    results: list[dict] = []

    def done(r: dict) -> None:
        results.append(r)
        print(_row(r), flush=True)
        with open(args.out, "w") as fh:  # as we go: a run cut short still leaves its points
            json.dump({"meta": _meta(args.device), "config": args.config, "results": results}, fh, indent=1)

    print(f"{'part':8} {'setting':24} {'frames/s':>12}")
    if "ceiling" in parts:
        envs = args.ceiling_envs or args.threads * 8
        done(ceiling(cfg.env.id, cfg.env.kwargs, args.threads, envs, args.seconds))
    if "ceiling_processes" in parts:
        done(ceiling_processes(cfg.env.id, cfg.env.kwargs, args.threads, cfg.workers.actors.envs_per_actor,
                               args.seconds))
    if "srl" in parts:
        for n in (int(x) for x in args.actors.split(",")):
            done(srl_point(args.config, n, args.device, args.seconds, args.warmup, extra))
    game = cfg.env.id.split("/")[1].split("-")[0].lower()
    if "sf" in parts:
        done(sample_factory(game, args.threads, args.device, args.seconds, args.warmup, None, args.max_minutes * 60,
                            args.sf_target, args.sf_extra, args.sf_grace))
    if "pong18" in parts:
        done(pong18(args.config, args.device, args.max_minutes, extra))
        if args.sf_pong18:
            done(sample_factory(game, args.threads, args.device, args.seconds, args.warmup, 18.0,
                                args.max_minutes * 60, args.sf_target, args.sf_extra))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
