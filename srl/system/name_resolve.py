"""Address book for stream endpoints: who listens where.

Local runs use a folder inside the run directory (files written atomically), so a restarted
worker finds its peers again; tests may use the in-memory variant. Ray runs use Ray's KV store.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Protocol


class NameResolver(Protocol):
    def put(self, key: str, value: str) -> None: ...
    def get(self, key: str) -> str | None: ...
    def keys(self, prefix: str) -> list[str]: ...


class Interrupted(Exception):
    """A wait was abandoned because the worker was told to stop."""


def wait_for(resolver: NameResolver, key: str, timeout_s: float = 300.0, should_stop=None) -> str:
    """Block until ``key`` is published; TimeoutError names the key. ``should_stop`` is polled
    so a worker waiting for a peer that never comes still obeys a stop command."""
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        value = resolver.get(key)
        if value is not None:
            return value
        if should_stop is not None and should_stop():
            raise Interrupted(key)
        if time.monotonic() > deadline:
            raise TimeoutError(f"nobody published {key!r} within {timeout_s:.0f} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


class MemoryResolver:
    """In-process address book (tests, everything-in-one-process runs)."""

    def __init__(self) -> None:
        self._data: dict[str, str] = {}
        self._lock = threading.Lock()

    def put(self, key: str, value: str) -> None:
        with self._lock:
            self._data[key] = value

    def get(self, key: str) -> str | None:
        with self._lock:
            return self._data.get(key)

    def keys(self, prefix: str) -> list[str]:
        with self._lock:
            return sorted(k for k in self._data if k.startswith(prefix))


class FileResolver:
    """One file per key under ``root``; keys may contain '/'."""

    def __init__(self, root: str) -> None:
        self.root = root
        os.makedirs(root, exist_ok=True)

    def _path(self, key: str) -> str:
        return os.path.join(self.root, key.replace("/", "__"))

    def put(self, key: str, value: str) -> None:
        path = self._path(key)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(value)
        os.replace(tmp, path)

    def get(self, key: str) -> str | None:
        try:
            with open(self._path(key), encoding="utf-8") as fh:
                return fh.read()
        except FileNotFoundError:
            return None

    def keys(self, prefix: str) -> list[str]:
        flat = prefix.replace("/", "__")
        return sorted(n.replace("__", "/") for n in os.listdir(self.root)
                      if n.startswith(flat) and not n.endswith(".tmp"))


class RayResolver:
    """Ray's KV store (kept by the GCS on the head node), one namespace per run.

    Every process of a Ray cluster reaches the same store, so an address published on one node
    is found on all others. Needs a connected Ray (a Ray actor, or a driver after ``ray.init``).
    """

    def __init__(self, namespace: str) -> None:
        from ray.experimental import internal_kv

        if not internal_kv._internal_kv_initialized():
            raise RuntimeError("RayResolver needs a connected Ray (call ray.init first)")
        self._kv = internal_kv
        self.namespace = namespace

    def put(self, key: str, value: str) -> None:
        self._kv._internal_kv_put(key, value, overwrite=True, namespace=self.namespace)

    def get(self, key: str) -> str | None:
        value = self._kv._internal_kv_get(key, namespace=self.namespace)
        return None if value is None else value.decode()

    def keys(self, prefix: str) -> list[str]:
        return sorted(k.decode() for k in self._kv._internal_kv_list(prefix, namespace=self.namespace))

    def clear(self) -> None:
        """Forget every key of this run (the controller calls it when the run ends)."""
        self._kv._internal_kv_del("", del_by_prefix=True, namespace=self.namespace)


def ray_namespace(run_dir: str) -> str:
    """The KV namespace of a run, from its absolute run directory, so a resumed run finds its
    names. Hashed: Ray's key listing mangles namespaces that contain ':'."""
    import hashlib

    return "srl-" + hashlib.sha256(os.path.abspath(run_dir).encode()).hexdigest()[:24]


def make_resolver(kind: str, run_dir: str, names_dir: str = "") -> NameResolver:
    """The address book a worker spec asks for: ``file`` (a folder) or ``ray`` (Ray's KV store)."""
    if kind == "file":
        return FileResolver(names_dir or os.path.join(run_dir, ".names"))
    if kind == "ray":
        return RayResolver(ray_namespace(run_dir))
    raise ValueError(f"resolver must be 'file' or 'ray', got {kind!r}")
