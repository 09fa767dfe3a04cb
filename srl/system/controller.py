"""Controller: launches every worker through a scheduler, watches them, stops the run.

It owns the run directory, the counters (env steps, episodes), the stop rule, periodic
checkpoints, restarts of dead workers, and a clean stop on SIGINT / SIGTERM.
"""
from __future__ import annotations

import collections
import json
import os
import secrets
import shutil
import signal
import threading
import time
from dataclasses import dataclass, replace

import numpy as np
import zmq

from srl.config import ExperimentConfig, dump_yaml
from srl.errors import SrlError
from srl.envs.vector import make_vector_env, space_info
from srl.streams.base import Endpoint, bind_random, context
from srl.system.checkpoint import load_latest
from srl.system.metrics import RunLog, process_start_time
from srl.system.name_resolve import make_resolver
from srl.system.worker import WorkerSpec

RETURN_WINDOW = 20
# The addresses each server kind publishes; if a restart moves them (a Ray worker rescheduled on
# another node), the workers that connected to the old ones are restarted too.
SERVED = {"trainer": lambda i: ["trainer/0/samples", "trainer/0/params"],
          "policy": lambda i: [f"policy/{i}/inference"]}
CLIENTS = {"trainer": ("policy", "actor"), "policy": ("actor",)}


@dataclass
class RunResult:
    run_dir: str
    env_steps: int
    mean_return: float | None
    wall_s: float
    episodes: int
    reason: str
    restarts: int = 0

    def final_line(self) -> str:
        ret = "nan" if self.mean_return is None else f"{self.mean_return:.2f}"
        return f"final: env_steps={self.env_steps} mean_return={ret} wall_s={self.wall_s:.2f}"


def new_run_dir(cfg: ExperimentConfig) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = os.path.join(cfg.log.dir, f"{cfg.name}-{stamp}")
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    return path


class Controller:
    def __init__(self, cfg: ExperimentConfig, run_dir: str, scheduler=None, resume: bool = False,
                 launch_time: float | None = None, hmac_key: bytes | None = None):
        from srl.system.local_scheduler import LocalScheduler

        self.cfg = cfg
        self.run_dir = run_dir
        self.scheduler = scheduler or LocalScheduler(cfg.workers.start_method)
        self.resume = resume
        self.launch_time = launch_time or process_start_time()
        # A scheduler that crosses machines (Ray) asks for authenticated streams whatever the config says.
        auth = cfg.network.hmac or getattr(self.scheduler, "authenticated", False)
        self.key = hmac_key if hmac_key is not None else (secrets.token_bytes(32) if auth else None)
        self.host = getattr(self.scheduler, "host", None) or cfg.network.host
        """Where the controller's own sockets bind: the scheduler's choice (a Ray node's address)."""
        self._moved: dict[str, dict] = {}
        self._signal: int | None = None
        self.restarts = 0
        self.specs: dict[str, WorkerSpec] = {}
        self.last_seen: dict[str, float] = {}
        self.worker_stats: dict[str, dict] = {}
        self.start_failures: dict[str, int] = {}
        self.last_error: dict[str, str] = {}

    # ------------------------------------------------------------------ public
    def run(self) -> RunResult:
        self._prepare()
        old = {}
        if threading.current_thread() is threading.main_thread():
            old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._launch()
            try:
                reason = self._loop()
            except SrlError:
                self._shutdown("error")  # stop and reap every worker before reporting
                raise
            return self._shutdown(reason)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self.log.close()
            self.episodes_fh.close()
            self.control.close()
            self.stats.close()

    # ------------------------------------------------------------------ set-up
    def _prepare(self) -> None:
        cfg = self.cfg
        os.makedirs(self.run_dir, exist_ok=True)
        with open(os.path.join(self.run_dir, "config.yaml"), "w", encoding="utf-8") as fh:
            fh.write(dump_yaml(cfg))
        self.names_dir = os.path.join(self.run_dir, ".names")
        shutil.rmtree(self.names_dir, ignore_errors=True)
        os.makedirs(self.names_dir)
        self.names = make_resolver(getattr(self.scheduler, "resolver", "file"), self.run_dir, self.names_dir)
        env = make_vector_env(cfg.env, 1, seed=cfg.seed)
        self.space = space_info(env.single_observation_space, env.single_action_space, cfg.env.id).to_dict()
        env.close()
        ctx = context()
        self.control = Endpoint(ctx.socket(zmq.PUB), self.key)
        self.control_address = bind_random(self.control.sock, self.host)
        self.stats = Endpoint(ctx.socket(zmq.PULL), self.key)
        self.stats_address = bind_random(self.stats.sock, self.host)
        self.counters = {"env_steps": 0, "episodes": 0, "wall_s_before": 0.0}
        ckpt = load_latest(self.run_dir) if self.resume else None
        if ckpt is not None:
            for k in ("env_steps", "episodes"):
                self.counters[k] = int(ckpt.counters.get(k, 0))
            self.counters["wall_s_before"] = float(ckpt.counters.get("wall_s", 0.0))
        self.returns: collections.deque = collections.deque(maxlen=RETURN_WINDOW)
        self.window_returns: list[float] = []
        self.window_lengths: list[int] = []
        self.trainer_stats: dict = {}
        self.dropped_frames = 0
        self.log = RunLog(self.run_dir, cfg.log.tensorboard, cfg.log.console)
        self.episodes_fh = open(os.path.join(self.run_dir, "episodes.jsonl"), "a", encoding="utf-8")

    def _spec(self, kind: str, index: int) -> WorkerSpec:
        from srl.registry import custom_components

        return WorkerSpec(kind=kind, index=index, config=self.cfg, run_dir=self.run_dir,
                          control_address=self.control_address, stats_address=self.stats_address,
                          space=self.space, hmac_key=self.key, resume=self.resume, names_dir=self.names_dir,
                          host=self.cfg.network.host, extra={"components": custom_components()})

    def worker_plan(self) -> list[tuple[str, int]]:
        w = self.cfg.workers
        plan = [("trainer", 0)]
        if not w.actors.inline_policy:
            plan += [("policy", i) for i in range(w.policies.count)]
        plan += [("actor", i) for i in range(w.actors.count)]
        return plan

    def _launch(self) -> None:
        now = time.monotonic()
        for kind, index in self.worker_plan():
            spec = self._spec(kind, index)
            self.specs[spec.name] = spec
            self.last_seen[spec.name] = now
            self.scheduler.start(spec)
        self.t_start = time.monotonic()

    # ------------------------------------------------------------------ main loop
    def _loop(self) -> str:
        every = self.cfg.log.every_s
        next_log = time.monotonic() + every
        next_ckpt = time.monotonic() + self.cfg.checkpoint.every_seconds
        self._sps_mark = (time.monotonic(), self.counters["env_steps"])
        while True:
            self._drain_stats(timeout_ms=10)
            now = time.monotonic()
            reason = self._stop_reason()
            if reason:
                return reason
            if now >= next_log:
                next_log = now + every
                self._log_row()
            if now >= next_ckpt:
                next_ckpt = now + self.cfg.checkpoint.every_seconds
                self.control.send("checkpoint", None, {"to": "trainer", "counters": self._counters()})
            self._watch_workers(now)

    def wall_s(self) -> float:
        return time.time() - self.launch_time

    def mean_return(self) -> float | None:
        return float(np.mean(self.returns)) if len(self.returns) >= RETURN_WINDOW else None

    def _stop_reason(self) -> str:
        stop = self.cfg.stop
        if self._signal is not None:
            return signal.Signals(self._signal).name
        if stop.env_steps is not None and self.counters["env_steps"] >= stop.env_steps:
            return "env_steps"
        mean = self.mean_return()
        if stop.mean_return is not None and mean is not None and mean >= stop.mean_return:
            return "mean_return"
        if stop.wall_s is not None and self.wall_s() >= stop.wall_s:
            return "wall_s"
        return ""

    def _drain_stats(self, timeout_ms: int) -> None:
        got = self.stats.recv(timeout_ms=timeout_ms)
        while got is not None:
            self._on_stats(got[1].meta)
            got = self.stats.recv()

    def _on_stats(self, meta: dict) -> None:
        name = meta.get("worker")
        if name not in self.specs or meta.get("incarnation") != self.specs[name].incarnation:
            return  # a message from a worker that has since been replaced
        self.last_seen[name] = time.monotonic()
        self.worker_stats[name] = meta
        if meta.get("event") == "ready":
            self.start_failures[name] = 0
        elif meta.get("event") == "error":
            self.last_error[name] = str(meta.get("error", ""))
        if name in self._moved:  # first word from a restarted server: its addresses are published
            self._restart_clients_if_moved(name)
        self.counters["env_steps"] += int(meta.get("env_steps", 0) or 0)
        returns = meta.get("episode_returns") or []
        if returns:
            self._log_episodes(name, returns, meta.get("episode_lengths") or [])
        self.returns.extend(returns)
        self.window_returns.extend(returns)
        self.window_lengths.extend(meta.get("episode_lengths") or [])
        self.counters["episodes"] += len(returns)
        if name.startswith("trainer"):
            self.trainer_stats.update({k: v for k, v in meta.items() if "/" in k or k == "version"})
            if meta.get("event") == "checkpoint":
                self.last_checkpoint = meta.get("path")

    def _log_episodes(self, worker: str, returns: list, lengths: list) -> None:
        for r, n in zip(returns, lengths):
            row = {"worker": worker, "return": float(r), "length": int(n), "env_steps": self.counters["env_steps"]}
            self.episodes_fh.write(json.dumps(row) + "\n")

    def request_stop(self) -> None:
        """Stop the run from another thread, as SIGINT would."""
        self._signal = signal.SIGINT

    def _counters(self) -> dict:
        return {"env_steps": self.counters["env_steps"], "episodes": self.counters["episodes"],
                "wall_s": self.counters["wall_s_before"] + (time.monotonic() - self.t_start)}

    def _log_row(self) -> dict:
        now = time.monotonic()
        t0, s0 = self._sps_mark
        steps = self.counters["env_steps"]
        self._sps_mark = (now, steps)
        row = {
            "env_steps": steps,
            "wall_s": round(self.wall_s(), 3),
            "mean_return": self.mean_return(),
            "episodes": self.counters["episodes"],
            "charts/episodic_return": float(np.mean(self.window_returns)) if self.window_returns else None,
            "charts/episodic_length": float(np.mean(self.window_lengths)) if self.window_lengths else None,
            "charts/SPS": (steps - s0) / max(now - t0, 1e-9),
            "restarts": self.restarts,
            "dropped_frames": sum(int(s.get("dropped_frames", 0)) for s in self.worker_stats.values())
            + self.stats.dropped,
            **self.trainer_stats,
        }
        self.window_returns, self.window_lengths = [], []
        self.log.write(row)
        return row

    # ------------------------------------------------------------------ fault tolerance
    def _watch_workers(self, now: float) -> None:
        timeout = self.cfg.workers.heartbeat_timeout_s
        pending = getattr(self.scheduler, "pending", lambda name: False)
        for name, spec in list(self.specs.items()):
            if pending(name):  # still waiting for a node (Ray): not silent yet
                self.last_seen[name] = now
                continue
            dead = not self.scheduler.alive(name)
            silent = now - self.last_seen.get(name, now) > timeout
            if dead or silent:
                self._restart(name, spec, "exited" if dead else "silent")

    def _restart(self, name: str, spec: WorkerSpec, why: str) -> None:
        self._drain_stats(timeout_ms=100)  # its last words may still be in flight
        code = self.scheduler.exitcode(name)  # (a Ray scheduler also keeps Ray's account in .errors)
        error = self.last_error.get(name) or getattr(self.scheduler, "errors", {}).get(name) or f"exit code {code}"
        if name not in self.worker_stats or self.worker_stats[name].get("incarnation") != spec.incarnation:
            self.start_failures[name] = self.start_failures.get(name, 0) + 1  # died before it said a word
        if self.start_failures.get(name, 0) >= 3:
            raise SrlError(f"worker {name} failed to start 3 times in a row (last: {error})")
        if self.restarts >= self.cfg.workers.max_restarts:
            raise SrlError(f"worker {name} {why} ({error}) and workers.max_restarts={self.restarts} is spent")
        self.restarts += 1
        new = replace(spec, incarnation=spec.incarnation + 1)
        self.specs[name] = new
        self.last_seen[name] = time.monotonic()
        if spec.kind in SERVED:
            self._moved[name] = {k: self.names.get(k) for k in SERVED[spec.kind](spec.index)}
        self.scheduler.restart(name, new)

    def _restart_clients_if_moved(self, name: str) -> None:
        old = self._moved.pop(name)
        if all(self.names.get(k) == v for k, v in old.items()):
            return  # same addresses: connected peers reconnect on their own
        kind = self.specs[name].kind
        for other, spec in list(self.specs.items()):
            if spec.kind in CLIENTS[kind]:
                self._restart(other, spec, f"{name} moved")

    def _on_signal(self, signum, frame) -> None:
        self._signal = signum

    # ------------------------------------------------------------------ stop
    def _shutdown(self, reason: str) -> RunResult:
        counters = self._counters()
        deadline = time.monotonic() + 15.0
        self.last_checkpoint = None
        while time.monotonic() < deadline:
            self.control.send("stop", None, {"counters": counters})  # repeated: PUB drops to late joiners
            self._drain_stats(timeout_ms=50)
            if not any(self.scheduler.alive(n) for n in self.specs):
                break
        self.scheduler.wait_all(timeout_s=5.0)
        self._drain_stats(timeout_ms=10)
        row = self._log_row()
        result = RunResult(self.run_dir, self.counters["env_steps"], self.mean_return(), self.wall_s(),
                           self.counters["episodes"], reason, self.restarts)
        with open(os.path.join(self.run_dir, "result.json"), "w", encoding="utf-8") as fh:
            json.dump({**result.__dict__, "last_row": row}, fh)
        return result
