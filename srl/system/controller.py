"""Controller: launches the plan's workers through a scheduler, watches them, stops the run.

It owns the run's sockets for control and stats, heartbeats and restarts (a worker of a group
restarts its whole group), periodic checkpoint commands, the metric rows and a clean stop on
SIGINT / SIGTERM or on any error. What the workers' reports mean (episodes, returns, the stop
rule) belongs to the application's :class:`Monitor`; the controller knows no RL.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Protocol

import zmq

from srl.errors import SrlError
from srl.streams.base import Endpoint, bind_random, context
from srl.system.checkpoint import has_checkpoint, load_latest
from srl.system.metrics import RunLog
from srl.system.name_resolve import make_resolver
from srl.system.topology import Plan
from srl.system.worker import WorkerSpec

log = logging.getLogger("srl")
EVENTS = ("starting", "ready", "heartbeat", "error", "exit", "checkpoint")
MAX_COUNT = 1 << 40
"""No honest heartbeat reports more samples or batches than this."""


class Monitor(Protocol):
    """The application's view of the run, fed with the workers' validated reports."""

    def on_report(self, worker: str, role: str, event: str, report: dict) -> dict:
        """Check and account one report; return its fields for ``worker_stats``. Raise
        ValueError for a report its worker could not have produced (it is counted as dropped)."""

    def stop_reason(self, wall_s: float) -> str: ...
    def row(self) -> dict: ...
    def counters(self) -> dict: ...
    def restore(self, counters: dict, last_row: dict) -> None:
        """Continue from a checkpoint's counters; ``last_row`` is the run's last metric row,
        which the restored counters must not fall below."""
    def result(self, run_dir: str, reason: str, wall_s: float, restarts: int) -> Any: ...


@dataclass
class RunSettings:
    heartbeat_s: float = 1.0
    heartbeat_timeout_s: float = 30.0
    max_restarts: int = 10
    start_method: str = "fork"
    checkpoint_every_s: float = 10.0
    checkpoint_role: str = ""
    """Role whose workers are sent ``checkpoint`` commands (they decide who writes)."""
    log_every_s: float = 1.0
    tensorboard: bool = True
    console: bool = True
    host: str = "127.0.0.1"
    authenticate: bool = True
    """Sign every frame of every stream with a per-run secret."""


class Controller:
    def __init__(self, plan: Plan, settings: RunSettings, monitor: Monitor, run_dir: str, entry: str,
                 payload: Any = None, scheduler=None, resume: bool = False, launch_time: float | None = None,
                 hmac_key: bytes | None = None, by_value: tuple = ()):
        from srl.system.local_scheduler import LocalScheduler

        self.plan, self.settings, self.monitor = plan, settings, monitor
        self.run_dir, self.entry, self.payload, self.by_value = run_dir, entry, payload, by_value
        self.scheduler = scheduler or LocalScheduler(settings.start_method)
        self.resume = resume
        self.launch_time = launch_time or time.time()
        """``wall_s`` counts from here: the CLI passes its process's start, so a run's wall time
        includes interpreter start-up; a controller made inside a long-lived process counts from
        its creation."""
        # A scheduler that crosses machines (Ray) asks for authenticated streams whatever the config says.
        auth = settings.authenticate or getattr(self.scheduler, "authenticated", False)
        if not auth:
            log.warning("srl: stream authentication is off (network.hmac: false): any local process can inject messages")
        self.key = hmac_key if hmac_key is not None else (secrets.token_bytes(32) if auth else None)
        self.host = getattr(self.scheduler, "host", None) or settings.host
        """Where the controller's own sockets bind: the scheduler's choice (a Ray node's address)."""
        self._moved: dict[str, dict] = {}
        self._signal: int | None = None
        self.restarts = 0
        self.specs: dict[str, WorkerSpec] = {}
        self.last_seen: dict[str, float] = {}
        self.worker_stats: dict[str, dict] = {}
        self.start_failures: dict[str, int] = {}
        self.last_error: dict[str, str] = {}
        self.rejected_reports = 0
        self.last_checkpoint: str | None = None
        self._window: dict[str, list[int]] = {}

    @property
    def counters(self) -> dict:
        return self.monitor.counters()

    def worker_plan(self) -> list[tuple[str, int]]:
        return [(w.role, w.index) for w in self.plan.workers]

    # ------------------------------------------------------------------ public
    def run(self) -> Any:
        self._prepare()
        old = {}
        if threading.current_thread() is threading.main_thread():
            old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            try:
                self._launch()
                reason = self._loop()
            except BaseException as exc:  # noqa: BLE001 - stop and reap every worker, then report
                self._shutdown("error", error=f"{type(exc).__name__}: {exc}")
                raise
            return self._shutdown(reason)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self.log.close()
            self.control.close()
            self.stats.close()

    def request_stop(self) -> None:
        """Stop the run from another thread, as SIGINT would."""
        self._signal = signal.SIGINT

    def wall_s(self) -> float:
        return time.time() - self.launch_time

    # ------------------------------------------------------------------ set-up
    def _prepare(self) -> None:
        os.makedirs(self.run_dir, exist_ok=True)
        self.names_dir = os.path.join(self.run_dir, ".names")
        shutil.rmtree(self.names_dir, ignore_errors=True)
        os.makedirs(self.names_dir)
        self.names = make_resolver(getattr(self.scheduler, "resolver", "file"), self.run_dir, self.names_dir)
        ctx = context()
        self.control = Endpoint(ctx.socket(zmq.PUB), self.key)
        self.control_address = bind_random(self.control.sock, self.host)
        self.stats = Endpoint(ctx.socket(zmq.PULL), self.key)
        self.stats_address = bind_random(self.stats.sock, self.host)
        self.wall_s_before = 0.0
        if self.resume:
            ckpt = load_latest(self.run_dir)
            if ckpt is not None:
                self.monitor.restore(ckpt.counters, _last_row(os.path.join(self.run_dir, "metrics.jsonl")))
                self.wall_s_before = float(ckpt.counters.get("wall_s", 0.0))
        self.log = RunLog(self.run_dir, self.settings.tensorboard, self.settings.console)

    def _spec(self, name: str, incarnation: int = 0, group_incarnation: int = 0) -> WorkerSpec:
        return WorkerSpec(worker=self.plan.worker(name), plan=self.plan, entry=self.entry, payload=self.payload,
                          run_dir=self.run_dir, control_address=self.control_address,
                          stats_address=self.stats_address, hmac_key=self.key, incarnation=incarnation,
                          group_incarnation=group_incarnation, resume=self.resume, names_dir=self.names_dir,
                          host=self.settings.host, heartbeat_s=self.settings.heartbeat_s, by_value=self.by_value)

    def _launch(self) -> None:
        now = time.monotonic()
        for w in self.plan.workers:
            spec = self._spec(w.name)
            self.specs[w.name] = spec
            self.last_seen[w.name] = now
            self.scheduler.start(spec)
        self.t_start = time.monotonic()

    # ------------------------------------------------------------------ main loop
    def _loop(self) -> str:
        every = self.settings.log_every_s
        next_log = time.monotonic() + every
        next_ckpt = time.monotonic() + self.settings.checkpoint_every_s
        self._rate_mark = time.monotonic()
        while True:
            self._drain_stats(timeout_ms=10)
            now = time.monotonic()
            reason = self._stop_reason()
            if reason:
                return reason
            if now >= next_log:
                next_log = now + every
                self._log_row()
            if now >= next_ckpt and self.settings.checkpoint_role:
                next_ckpt = now + self.settings.checkpoint_every_s
                self.control.send("checkpoint", None, {"to": self.settings.checkpoint_role,
                                                       "counters": self._counters()})
            self._watch_workers(now)

    def _stop_reason(self) -> str:
        if self._signal is not None:
            return signal.Signals(self._signal).name
        return self.monitor.stop_reason(self.wall_s())

    def _drain_stats(self, timeout_ms: int) -> None:
        got = self.stats.recv(timeout_ms=timeout_ms)
        while got is not None:
            self._on_stats(got[1].meta)
            got = self.stats.recv()

    def _on_stats(self, meta: dict) -> None:
        name = meta.get("worker")
        if not isinstance(name, str) or name not in self.specs:
            self.stats.dropped += 1
            return
        spec = self.specs[name]
        if meta.get("incarnation") != spec.incarnation:
            return  # a message from a worker that has since been replaced
        if not _valid_stats(meta):
            self.stats.dropped += 1
            return
        event = meta["event"]
        if event == "starting":  # still configuring: alive, nothing to report, not ready yet
            self.last_seen[name] = time.monotonic()
            return
        try:
            fields = self.monitor.on_report(name, spec.kind, event, meta["report"])
        except (ValueError, TypeError, KeyError):
            self.rejected_reports += 1
            return
        self.last_seen[name] = time.monotonic()
        self.worker_stats[name] = {"incarnation": spec.incarnation, "pid": meta["pid"], "event": event,
                                   "dropped_frames": meta["dropped_frames"], **fields}
        window = self._window.setdefault(name, [0, 0])
        window[0] += meta["samples"]
        window[1] += meta["batches"]
        if event == "ready":
            self.start_failures[name] = 0
        elif event == "error":
            self.last_error[name] = meta["error"]
        elif event == "checkpoint" and isinstance(meta["report"].get("path"), str):
            self.last_checkpoint = meta["report"]["path"]
        if name in self._moved:  # first word from a restarted server: its addresses are published
            self._restart_clients_if_moved(name)

    def _counters(self) -> dict:
        return {**self.monitor.counters(), "wall_s": self.wall_s_before + (time.monotonic() - self.t_start)}

    def _log_row(self) -> dict:
        now = time.monotonic()
        dt = max(now - self._rate_mark, 1e-9)
        self._rate_mark = now
        rates = {}
        for name, (samples, batches) in self._window.items():
            rates[f"rates/{name}/samples_per_s"] = samples / dt
            rates[f"rates/{name}/batches_per_s"] = batches / dt
        self._window = {}
        dropped = sum(int(s.get("dropped_frames", 0)) for s in self.worker_stats.values()) + self.stats.dropped
        row = {**self.monitor.row(), "wall_s": round(self.wall_s(), 3), "restarts": self.restarts,
               "dropped_frames": dropped, "rejected_reports": self.rejected_reports, **rates}
        self.log.write(row)
        return row

    # ------------------------------------------------------------------ fault tolerance
    def _watch_workers(self, now: float) -> None:
        timeout = self.settings.heartbeat_timeout_s
        pending = getattr(self.scheduler, "pending", lambda name: False)
        for name, spec in list(self.specs.items()):
            if pending(name):  # still waiting for a node (Ray): not silent yet
                self.last_seen[name] = now
                continue
            dead = not self.scheduler.alive(name)
            silent = now - self.last_seen.get(name, now) > timeout
            if dead or silent:
                self._restart(name, "exited" if dead else "silent")

    def _restart(self, name: str, why: str) -> None:
        self._drain_stats(timeout_ms=100)  # its last words may still be in flight
        spec = self.specs[name]
        code = self.scheduler.exitcode(name)  # (a Ray scheduler also keeps Ray's account in .errors)
        error = self.last_error.get(name) or getattr(self.scheduler, "errors", {}).get(name) or f"exit code {code}"
        if name not in self.worker_stats or self.worker_stats[name].get("incarnation") != spec.incarnation:
            self.start_failures[name] = self.start_failures.get(name, 0) + 1  # died before it was ready
        if self.start_failures.get(name, 0) >= 3:
            raise SrlError(f"worker {name} failed to start 3 times in a row (last: {error})")
        if self.restarts >= self.settings.max_restarts:
            raise SrlError(f"worker {name} {why} ({error}) and max_restarts={self.restarts} is spent")
        members = self.plan.group_members(name)
        if spec.kind == self.settings.checkpoint_role and self.monitor.counters().get("version", 0) > 0 \
                and not has_checkpoint(self.run_dir):
            raise SrlError(f"worker {name} {why} ({error}) before its first checkpoint; stopping rather than "
                           "restarting it from scratch")
        self.restarts += 1
        for member in members:  # a data-parallel group restarts together, from its checkpoint
            self.scheduler.kill(member)
        group_incarnation = spec.group_incarnation + (1 if len(members) > 1 else 0)
        for member in members:
            old = self.specs[member]
            new = replace(old, incarnation=old.incarnation + 1, group_incarnation=group_incarnation)
            self.specs[member] = new
            self.last_seen[member] = time.monotonic()
            served = self.plan.served_by(member)
            if served:
                self._moved[member] = {key: self.names.get(key) for _, key in served}
            self.scheduler.restart(member, new)

    def _restart_clients_if_moved(self, name: str) -> None:
        old = self._moved.pop(name)
        if all(self.names.get(k) == v for k, v in old.items()):
            return  # same addresses: connected peers reconnect on their own
        group = set(self.plan.group_members(name))
        for other in sorted(self.plan.clients_of(name) - group):
            self._restart(other, f"{name} moved")

    def _on_signal(self, signum, frame) -> None:
        self._signal = signum

    # ------------------------------------------------------------------ stop
    def _shutdown(self, reason: str, error: str = "") -> Any:
        counters = self._counters() if hasattr(self, "t_start") else self.monitor.counters()
        deadline = time.monotonic() + 15.0
        while self.specs and time.monotonic() < deadline:
            self.control.send("stop", None, {"counters": counters})  # repeated: PUB drops to late joiners
            self._drain_stats(timeout_ms=50)
            if not any(self.scheduler.alive(n) for n in self.specs):
                break
        self.scheduler.wait_all(timeout_s=5.0)
        self._drain_stats(timeout_ms=10)
        row = self._log_row() if hasattr(self, "_rate_mark") else {}
        result = self.monitor.result(self.run_dir, reason, self.wall_s(), self.restarts)
        summary = {**_plain(result), "reason": reason, "error": error, "last_row": row}
        _write_json(os.path.join(self.run_dir, "result.json"), summary)
        return result


def _valid_stats(meta: dict) -> bool:
    """The runtime's own fields of a stats message, type- and range-checked."""
    ints = ("pid", "samples", "batches", "dropped_frames")
    if not all(isinstance(meta.get(k), int) and not isinstance(meta.get(k), bool) for k in ints):
        return False
    if not all(0 <= meta[k] < MAX_COUNT for k in ints):
        return False
    return meta.get("event") in EVENTS and isinstance(meta.get("error", ""), str) and isinstance(meta.get("report"), dict)


def _last_row(path: str) -> dict:
    """The last complete row of a metrics file ({} if there is none)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - (1 << 16)))
            lines = fh.read().splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        try:
            row = json.loads(line)
            return row if isinstance(row, dict) else {}
        except ValueError:
            continue
    return {}


def _plain(result: Any) -> dict:
    return dict(result.__dict__) if hasattr(result, "__dict__") else {"result": result}


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, default=str)
    os.replace(tmp, path)
