"""Parameter stream: the trainer serves versioned weights, workers pull when newer.

Clients ask "I have version v"; the server answers with the weights only if it holds a newer
version, so an idle poll costs one tiny round trip and weights cross the wire once per version.
A client on the server's host (``shared=True`` on both sides) gets only the name of a shared-memory
file, the slot and the layout, and copies the weights from there (``srl.streams.shared_weights``).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np
import zmq

from srl.streams import shared_weights
from srl.streams.base import Endpoint, bind_random, context


def _host_array(value) -> np.ndarray:
    """A C-ordered host array: a numpy array as it is (0-d stays 0-d, where np.ascontiguousarray
    would make it (1,)), a tensor copied (on CPU ``.numpy()`` alone would alias live parameters)."""
    if isinstance(value, np.ndarray):
        return np.asarray(value, order="C")
    return value.detach().to("cpu", copy=True).contiguous().numpy()


class ParamServer(Endpoint):
    def __init__(self, host: str = "127.0.0.1", key: bytes | None = None, prefer: str | None = None,
                 epoch: int = 0, shared: bool = True):
        super().__init__(context().socket(zmq.ROUTER), key)
        self.shared = shared and shared_weights.available()
        self.host_id = shared_weights.host_id()
        self._file: shared_weights.SharedWeightsWriter | None = None
        self._slot = 0
        self.address = bind_random(self.sock, host, prefer)
        self.epoch = epoch
        """Trainer incarnation: a restarted trainer may republish lower versions from a checkpoint."""
        self.version = -1
        self._arrays: dict[str, np.ndarray] | None = {}
        self.status: dict = {}
        """Small metadata sent with every reply (the trainer's per-actor receipt counts)."""

    def publish(self, version: int, weights: Mapping) -> None:
        """Publish ``weights``: numpy arrays (kept, not copied: the caller must not change them) or
        torch tensors (copied before this returns, so live parameters may be passed). Once a client
        on this host has asked, they go straight into the shared file; a client over the wire then
        gets a copy of the file's slot."""
        if version <= self.version:
            raise ValueError(f"parameter version must increase: {version} after {self.version}")
        self.version = version
        if self._file is not None and not self._file.fits(weights):
            self._file.close()
            self._file = None
        if self._file is not None:
            self._slot = self._file.write(version, weights)
            self._arrays = None
        else:
            self._arrays = {k: _host_array(v) for k, v in weights.items()}

    def _wire_arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:  # published into the shared file only
            self._arrays = self._file.read(self._slot)
        return self._arrays

    def _shared_file(self):
        """The shared-memory file, made on the first same-host request (None if it cannot be)."""
        if self._file is None and self.shared and self._arrays:
            try:
                self._file = shared_weights.SharedWeightsWriter(self._arrays)
                self._slot = self._file.write(self.version, self._arrays)
            except OSError:
                self.shared = False
        return self._file

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
            elif newer and msg.meta.get("host") == self.host_id and self._shared_file() is not None:
                f = self._file
                self.send("params_shm", None, {**meta, "path": f.path, "slot": self._slot, "manifest": f.manifest},
                          prefix=[identity])
                sent += 1
            elif newer:
                self.send("params", self._wire_arrays(), meta, prefix=[identity])
                sent += 1
            else:
                self.send("same", None, meta, prefix=[identity])
            got = self.recv(n_prefix=1)
        return sent

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        super().close()


class ParamClient(Endpoint):
    """Pulls newer weights; with ``weights=False`` it only learns the newest version number
    (actors that use remote policy workers need the version for flow control, not the weights)."""

    def __init__(self, address: str, key: bytes | None = None, interval_s: float = 0.05, weights: bool = True,
                 shared: bool = True):
        super().__init__(context().socket(zmq.DEALER), key)
        self.host = shared_weights.host_id() if shared and weights else None
        self._reader: shared_weights.SharedWeightsReader | None = None
        self.sock.connect(address)
        self.version = -1
        self.epoch = -1
        self.interval_s = interval_s
        self.weights = weights
        self.status: dict = {}
        """The server's metadata from its latest reply."""
        self._in_flight = False
        self._last_ask = 0.0

    def poll(self, timeout_ms: int = 0, load: Callable[[dict[str, np.ndarray]], None] | None = None
             ) -> tuple[int, dict[str, np.ndarray] | None] | None:
        """Non-blocking: ask if due, and return ``(version, arrays)`` when newer weights arrived.
        With ``load``, the arrays go to ``load(arrays)`` instead, straight from the shared file's
        slot when the server is on this host (no intermediate copy), and ``(version, None)`` returns."""
        now = time.monotonic()
        stale = self._in_flight and now - self._last_ask > 2.0  # server restarted mid-request
        if (not self._in_flight and now - self._last_ask >= self.interval_s) or stale:
            self.send("have", None, {"have": self.version, "epoch": self.epoch, "weights": self.weights,
                                     "host": self.host})
            self._in_flight, self._last_ask = True, now
        got = self.recv(timeout_ms=timeout_ms)
        if got is None:
            return None
        msg = got[1]
        self._in_flight = False
        self.status = msg.meta
        version, epoch = msg.meta.get("version", -1), msg.meta.get("epoch", -1)
        if msg.kind not in ("params", "version", "params_shm") or not isinstance(version, int) or (
                version <= self.version and epoch == self.epoch):
            return None
        arrays = msg.arrays
        if msg.kind == "params_shm" and load is None:
            arrays = self._read_shared(msg.meta, version)
            if arrays is None:
                return None
        elif msg.kind == "params_shm":
            version, arrays = self._load_shared(msg.meta, version, load), None
            if version is None:
                return None
        elif msg.kind == "params" and load is not None:
            load(arrays)
            arrays = None
        self.version, self.epoch = version, epoch
        return version, arrays

    def _reader_for(self, meta: dict) -> shared_weights.SharedWeightsReader:
        path, manifest = meta.get("path"), meta.get("manifest")
        if self._reader is None or self._reader.path != path or self._reader.manifest != manifest:
            self.close_shared()
            self._reader = shared_weights.SharedWeightsReader(path, manifest)
        return self._reader

    def _shared_failed(self, exc: Exception) -> None:
        """The file cannot be used: over the wire from the next request on."""
        self.drop(f"shared weights: {type(exc).__name__}: {str(exc)[:200]}")
        self.close_shared()
        self.host = None

    def _read_shared(self, meta: dict, version: int) -> dict[str, np.ndarray] | None:
        """The weights from the server's shared-memory file; None when torn (asked again at the
        next poll) or when the file cannot be used."""
        try:
            return self._reader_for(meta).read(meta.get("slot"), version)
        except (OSError, ValueError, TypeError) as exc:
            self._shared_failed(exc)
            return None

    def _load_shared(self, meta: dict, version: int, load) -> int | None:
        """``load`` straight from the file; the version loaded, or None. A load torn on every try
        (the writer lapped this reader again and again) leaves the destination mixed: the full
        weights then come over the wire at the next poll (version reset)."""
        try:
            loaded = self._reader_for(meta).load(meta.get("slot"), version, load)
        except (OSError, ValueError, TypeError) as exc:
            self._shared_failed(exc)
            return None
        if loaded is None:
            self._shared_failed(RuntimeError("every load was torn"))
            self.version = -1
        return loaded

    def close_shared(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def close(self) -> None:
        self.close_shared()
        super().close()

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
