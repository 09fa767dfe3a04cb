"""Worker base: owns the poll loop, control messages, heartbeats and stats.

A subclass implements ``_configure`` (build envs, models, sockets), ``_poll`` (do one bounded
piece of work and say how much) and optionally ``_on_stop`` / ``_on_command``. The base never
blocks for long, so stop and pause commands are answered within one poll.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from srl.config import ExperimentConfig
from srl.streams.base import Endpoint, context
from srl.system.name_resolve import Interrupted, NameResolver, make_resolver


@dataclass
class WorkerSpec:
    """Everything a worker process needs to start; plain data so any scheduler can ship it."""

    kind: str
    index: int
    config: ExperimentConfig
    run_dir: str
    control_address: str
    stats_address: str
    space: dict
    """:class:`srl.envs.vector.SpaceInfo` as a dict."""
    hmac_key: bytes | None = field(default=None, repr=False)
    """The run's stream secret; kept out of ``repr`` so it never reaches a log line."""
    incarnation: int = 0
    """How many times this worker was restarted before."""
    resume: bool = False
    names_dir: str = ""
    host: str = "127.0.0.1"
    """Address this worker's sockets bind to."""
    resolver: str = "file"
    """Address book: ``file`` (``names_dir``) or ``ray`` (Ray's KV store, one namespace per run)."""
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.index}"


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
        self.cfg = spec.config
        self.resolver = resolver or make_resolver(spec.resolver, spec.run_dir, spec.names_dir)
        self.key = spec.hmac_key
        self._stopping = False
        self._paused = False
        self._parent = os.getppid()
        self._stats: dict[str, Any] = {}
        self._endpoints: list[Endpoint] = []

    # ------------------------------------------------------------------ subclass API
    def _configure(self) -> None:
        raise NotImplementedError

    def _poll(self) -> PollResult:
        raise NotImplementedError

    def _on_stop(self, meta: dict) -> None:
        """Called once when a stop command arrives (the trainer writes its final checkpoint)."""

    def _on_command(self, kind: str, meta: dict) -> None:
        """Commands other than stop / pause / resume."""

    def _collect_stats(self) -> dict:
        """Extra payload for the next stats message (episode returns, losses...)."""
        return {}

    # ------------------------------------------------------------------ helpers
    def endpoint(self, ep: Endpoint) -> Endpoint:
        self._endpoints.append(ep)
        return ep

    def dropped_frames(self) -> int:
        return sum(ep.dropped for ep in self._endpoints)

    def send_stats(self, payload: dict) -> None:
        meta = {"worker": self.spec.name, "pid": os.getpid(), "incarnation": self.spec.incarnation,
                "dropped_frames": self.dropped_frames(), **payload}
        arrays = meta.pop("arrays", None)
        self._stats_ep.send("stats", arrays, meta, flags=zmq.NOBLOCK)

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
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
            self._configure()
            self.send_stats({"event": "ready"})
            self._loop()
        except Interrupted:
            pass  # told to stop while waiting for a peer
        except Exception as exc:
            self.send_stats({"event": "error", "error": f"{type(exc).__name__}: {exc}"})
            raise
        finally:
            self.send_stats({"event": "exit", **self._collect_stats()})
            for ep in self._endpoints:
                ep.close()
            self._control_ep.close()
            time.sleep(0.05)  # let the last stats message leave before the socket closes
            self._stats_ep.sock.close(linger=500)

    def _loop(self) -> None:
        beat = min(self.cfg.workers.heartbeat_s, self.stats_interval_s)
        next_beat = time.monotonic() + beat
        while not self._stopping:
            self._read_control()
            if self._stopping:
                break
            if self._paused:
                time.sleep(0.01)
            else:
                self._poll()
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + beat
                self.send_stats({"event": "heartbeat", **self._collect_stats()})
                if os.getppid() != self._parent:  # the controller is gone: do not linger
                    self._stopping = True

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
        return self._stopping or os.getppid() != self._parent


def run_worker(spec: WorkerSpec) -> None:
    """Process entry point used by the schedulers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the controller, which stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    from srl.registry import install_components
    from srl.workers import WORKERS

    install_components(spec.extra.get("components", {}))
    WORKERS[spec.kind](spec).run()
