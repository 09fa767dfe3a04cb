"""Worker base: owns the poll loop, control messages, heartbeats and stats.

A subclass implements ``_configure`` (build envs, models, sockets), ``_poll`` (do one bounded
piece of work and say how much) and optionally ``_on_stop`` / ``_on_command`` / ``_report``. The
base never blocks for long, so stop and pause commands are answered within one poll. The counts
that ``_poll`` returns are summed and sent with every heartbeat; the controller turns them into
per-worker rates.

The runtime knows no RL: what a worker is comes from ``spec.entry`` (``module:function``, called
with the spec, returning a :class:`Worker`), and ``spec.payload`` is the application's own data.
"""
from __future__ import annotations

import importlib
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import zmq

from srl.streams.base import Endpoint, context
from srl.system.name_resolve import Interrupted, NameResolver, make_resolver
from srl.system.topology import Plan, WorkerPlan

MAX_CONFIGURE_S = 900.0
"""How long a configuring worker keeps saying "starting" (then it may be taken for silent)."""


@dataclass
class WorkerSpec:
    """Everything a worker process needs to start; plain data so any scheduler can ship it."""

    worker: WorkerPlan
    plan: Plan
    entry: str
    """``module:function`` that builds the worker from this spec."""
    payload: Any
    """The application's data (experiment config, spaces...), opaque to the runtime."""
    run_dir: str
    control_address: str
    stats_address: str
    hmac_key: bytes | None = field(default=None, repr=False)
    """The run's stream secret; kept out of ``repr`` so it never reaches a log line."""
    incarnation: int = 0
    """How many times this worker was restarted before."""
    group_incarnation: int = 0
    """How many times this worker's group was restarted (data-parallel rendezvous epoch)."""
    resume: bool = False
    names_dir: str = ""
    host: str = "127.0.0.1"
    """Address this worker's sockets bind to."""
    resolver: str = "file"
    """Address book: ``file`` (``names_dir``) or ``ray`` (Ray's KV store, one namespace per run)."""
    heartbeat_s: float = 1.0
    by_value: tuple = ()
    """User objects whose modules must travel by value to other machines (Ray)."""

    @property
    def kind(self) -> str:
        return self.worker.role

    @property
    def index(self) -> int:
        return self.worker.index

    @property
    def name(self) -> str:
        return self.worker.name


@dataclass
class PollResult:
    samples: int = 0
    """Env steps, requests or samples handled."""
    batches: int = 0
    """Forward passes, trajectories or gradient steps done."""


class Worker:
    kind = "worker"
    stats_interval_s = 0.1
    """Stats (which double as heartbeats) go to the controller this often."""

    def __init__(self, spec: WorkerSpec, resolver: NameResolver | None = None):
        self.spec = spec
        self.resolver = resolver or make_resolver(spec.resolver, spec.run_dir, spec.names_dir)
        self.key = spec.hmac_key
        self._stopping = False
        self._paused = False
        self._configured = False
        self._parent = os.getppid()
        self._endpoints: list[Endpoint] = []
        self._counts = PollResult()
        self._stats_ep: Endpoint | None = None
        self._control_ep: Endpoint | None = None

    # ------------------------------------------------------------------ subclass API
    def _configure(self) -> None:
        raise NotImplementedError

    def _poll(self) -> PollResult:
        raise NotImplementedError

    def _on_stop(self, meta: dict) -> None:
        """Called once when the worker stops for any reason after configuring (a stop command,
        a vanished controller): the trainer writes its final checkpoint here."""

    def _on_command(self, kind: str, meta: dict) -> None:
        """Commands other than stop / pause / resume."""

    def _report(self) -> dict:
        """The application's payload for the next stats message (episode returns, losses...)."""
        return {}

    # ------------------------------------------------------------------ helpers
    def endpoint(self, ep: Endpoint) -> Endpoint:
        self._endpoints.append(ep)
        return ep

    def dropped_frames(self) -> int:
        return sum(ep.dropped for ep in self._endpoints)

    def send_event(self, event: str, report: dict | None = None, error: str = "") -> None:
        if self._stats_ep is None:
            return
        counts, self._counts = self._counts, PollResult()
        meta = {"worker": self.spec.name, "pid": os.getpid(), "incarnation": self.spec.incarnation,
                "event": event, "samples": counts.samples, "batches": counts.batches,
                "dropped_frames": self.dropped_frames(), "error": error[:1000], "report": report or {}}
        self._stats_ep.send("stats", None, meta, flags=zmq.NOBLOCK)

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        if self.spec.worker.resources.nice > 0:
            os.nice(self.spec.worker.resources.nice)  # this thread, and every thread it starts after
        ctx = context()
        control = ctx.socket(zmq.SUB)
        control.setsockopt(zmq.SUBSCRIBE, b"")
        control.connect(self.spec.control_address)
        self._control_ep = Endpoint(control, self.key)
        stats = ctx.socket(zmq.PUSH)
        stats.setsockopt(zmq.SNDHWM, 1000)
        stats.connect(self.spec.stats_address)
        self._stats_ep = Endpoint(stats, self.key)
        try:
            self._configure_saying_starting()
            self._configured = True
            self.send_event("ready")
            self._loop()
        except Interrupted:
            pass  # told to stop while waiting for a peer
        except Exception as exc:
            self.send_event("error", error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self._finish()

    def _configure_saying_starting(self) -> None:
        """Run ``_configure``, which may take minutes (a supervised warm-up, a peer's first
        weights), while a thread sends "starting" every heartbeat so that the controller does not
        take the worker for silent. The thread owns the stats socket until ``_configure`` ends, and
        gives up after ``MAX_CONFIGURE_S`` (a worker configuring that long is taken for hung)."""
        done = threading.Event()

        def say_starting() -> None:
            deadline = time.monotonic() + MAX_CONFIGURE_S
            while not done.wait(self.spec.heartbeat_s) and time.monotonic() < deadline:
                self.send_event("starting")

        beats = threading.Thread(target=say_starting, name="srl-starting", daemon=True)
        beats.start()
        try:
            self._configure()
        finally:
            done.set()
            beats.join()

    def _finish(self) -> None:
        if self._configured:
            if not self._stopping:  # the loop ended without a stop command (controller gone)
                self._stopping = True
                self._safe(lambda: self._on_stop({}))
            self._safe(lambda: self.send_event("exit", self._report()))
        for ep in self._endpoints:
            ep.close()
        self._control_ep.close()
        time.sleep(0.05)  # let the last stats message leave before the socket closes
        self._stats_ep.sock.close(linger=500)

    def _safe(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - shutting down: report, do not mask the cause
            self._safe_event(f"{type(exc).__name__} while stopping: {exc}")

    def _safe_event(self, error: str) -> None:
        try:
            self.send_event("error", error=error)
        except Exception:  # noqa: BLE001
            pass

    def _loop(self) -> None:
        beat = min(self.spec.heartbeat_s, self.stats_interval_s)
        next_beat = time.monotonic() + beat
        while not self._stopping:
            self._read_control()
            if self._stopping:
                break
            if self._paused:
                time.sleep(0.01)
            else:
                got = self._poll()
                self._counts.samples += got.samples
                self._counts.batches += got.batches
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + beat
                self.send_event("heartbeat", self._report())
                if self.controller_gone():
                    break

    def controller_gone(self) -> bool:
        return os.getppid() != self._parent

    def _read_control(self) -> None:
        got = self._control_ep.recv()
        while got is not None:
            msg = got[1]
            target = msg.meta.get("to")
            if target in (None, self.spec.name, self.spec.kind):
                self._handle(msg.kind, msg.meta)
            if self._stopping:
                return
            got = self._control_ep.recv()

    def _handle(self, kind: str, meta: dict) -> None:
        if kind == "stop":
            if not self._stopping:
                self._stopping = True
                self._on_stop(meta)
        elif kind == "pause":
            self._paused = True
        elif kind == "resume":
            self._paused = False
        else:
            self._on_command(kind, meta)

    def should_stop(self) -> bool:
        """For subclasses that wait inside ``_poll``: read control messages, report stop."""
        self._read_control()
        return self._stopping or self.controller_gone()


def resolve_entry(entry: str) -> Callable[[WorkerSpec], Worker]:
    module, _, attr = entry.partition(":")
    return getattr(importlib.import_module(module), attr)


def run_worker(spec: WorkerSpec) -> None:
    """Process entry point used by the local scheduler."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the controller, which stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    worker = resolve_entry(spec.entry)(spec)
    profile_dir = os.environ.get("SRL_PROFILE_DIR")
    if not profile_dir:
        worker.run()
        return
    import cProfile  # SRL_PROFILE_DIR: each worker writes DIR/<role>-<index>.prof at exit

    profiler = cProfile.Profile()
    try:
        profiler.runcall(worker.run)
    finally:
        profiler.dump_stats(os.path.join(profile_dir, f"{spec.kind}-{spec.index}.prof"))
