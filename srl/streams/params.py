"""Parameter stream: the trainer serves versioned weights, workers pull when newer.

Clients ask "I have version v"; the server answers with the weights only if it holds a newer
version, so an idle poll costs one tiny round trip and weights cross the wire once per version.
"""
from __future__ import annotations

import time

import numpy as np
import zmq

from srl.streams.base import Endpoint, bind_random, context


class ParamServer(Endpoint):
    def __init__(self, host: str = "127.0.0.1", key: bytes | None = None, prefer: str | None = None,
                 epoch: int = 0):
        super().__init__(context().socket(zmq.ROUTER), key)
        self.address = bind_random(self.sock, host, prefer)
        self.epoch = epoch
        """Trainer incarnation: a restarted trainer may republish lower versions from a checkpoint."""
        self.version = -1
        self._arrays: dict[str, np.ndarray] = {}
        self.status: dict = {}
        """Small metadata sent with every reply (the trainer's per-actor receipt counts)."""

    def publish(self, version: int, arrays: dict[str, np.ndarray]) -> None:
        if version <= self.version:
            raise ValueError(f"parameter version must increase: {version} after {self.version}")
        self.version = version
        # np.asarray(order="C") keeps 0-d arrays 0-d (np.ascontiguousarray makes them (1,): a
        # running count buffer then no longer matched the policy's shape on the other side)
        self._arrays = {k: np.asarray(v, order="C") for k, v in arrays.items()}

    def serve(self) -> int:
        """Answer every waiting request; returns how many weight copies were sent."""
        sent = 0
        got = self.recv(n_prefix=1)
        while got is not None:
            (identity,), msg = got
            have, epoch = msg.meta.get("have", -1), msg.meta.get("epoch", -1)
            meta = {**self.status, "version": self.version, "epoch": self.epoch}
            newer = self.version >= 0 and isinstance(have, int) and (self.version > have or epoch != self.epoch)
            if newer and msg.meta.get("weights", True) is False:
                self.send("version", None, meta, prefix=[identity])  # a flow-control query
            elif newer:
                self.send("params", self._arrays, meta, prefix=[identity])
                sent += 1
            else:
                self.send("same", None, meta, prefix=[identity])
            got = self.recv(n_prefix=1)
        return sent


class ParamClient(Endpoint):
    """Pulls newer weights; with ``weights=False`` it only learns the newest version number
    (actors that use remote policy workers need the version for flow control, not the weights)."""

    def __init__(self, address: str, key: bytes | None = None, interval_s: float = 0.05, weights: bool = True):
        super().__init__(context().socket(zmq.DEALER), key)
        self.sock.connect(address)
        self.version = -1
        self.epoch = -1
        self.interval_s = interval_s
        self.weights = weights
        self.status: dict = {}
        """The server's metadata from its latest reply."""
        self._in_flight = False
        self._last_ask = 0.0

    def poll(self, timeout_ms: int = 0) -> tuple[int, dict[str, np.ndarray]] | None:
        """Non-blocking: ask if due, and return ``(version, arrays)`` when newer weights arrived."""
        now = time.monotonic()
        stale = self._in_flight and now - self._last_ask > 2.0  # server restarted mid-request
        if (not self._in_flight and now - self._last_ask >= self.interval_s) or stale:
            self.send("have", None, {"have": self.version, "epoch": self.epoch, "weights": self.weights})
            self._in_flight, self._last_ask = True, now
        got = self.recv(timeout_ms=timeout_ms)
        if got is None:
            return None
        msg = got[1]
        self._in_flight = False
        self.status = msg.meta
        version, epoch = msg.meta.get("version", -1), msg.meta.get("epoch", -1)
        if msg.kind in ("params", "version") and isinstance(version, int) and (
                version > self.version or epoch != self.epoch):
            self.version, self.epoch = version, epoch
            return version, msg.arrays
        return None

    def wait_newer(self, than: int, timeout_s: float, should_stop=lambda: False):
        """Block until a version newer than ``than`` arrives (sync mode); None on timeout/stop."""
        deadline = time.monotonic() + timeout_s
        interval, self.interval_s = self.interval_s, 0.0
        epoch = self.epoch
        try:
            while time.monotonic() < deadline and not should_stop():
                got = self.poll(timeout_ms=20)
                if got is not None and (got[0] > than or self.epoch != epoch):
                    return got
            return None
        finally:
            self.interval_s = interval
