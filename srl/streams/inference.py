"""Inference stream: actors ask, policy workers (ROUTER) answer in batches.

A policy worker drains every request waiting when its last forward pass ended and answers
them with one forward pass: there is no fixed batch size to tune. Each request carries the ids
of its envs. With sticky routing the client holds one DEALER per policy worker and sends each
env group to the one the plan assigns, so per-env state (a memory, a KV cache) can live there;
round robin uses one DEALER connected to all, which spreads requests over them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import zmq

from srl.streams.base import Endpoint, bind_random, context
from srl.system.wire import Message


@dataclass
class Request:
    identity: bytes
    msg: Message

    @property
    def obs(self) -> np.ndarray:
        return self.msg.arrays["obs"]

    @property
    def env_ids(self) -> np.ndarray | None:
        return self.msg.arrays.get("env_ids")


class InferenceServer(Endpoint):
    def __init__(self, host: str = "127.0.0.1", key: bytes | None = None, prefer: str | None = None):
        super().__init__(context().socket(zmq.ROUTER), key)
        self.address = bind_random(self.sock, host, prefer)

    def pending(self, max_obs: int, timeout_ms: int = 0, check=None) -> list[Request]:
        """All requests waiting now (up to ``max_obs`` observations), waiting at most
        ``timeout_ms`` for the first one. ``check(message)`` raises on a request the caller
        cannot serve (wrong shape or dtype): it is dropped and counted."""
        out: list[Request] = []
        n = 0
        got = self.recv(n_prefix=1, timeout_ms=timeout_ms, check=check or _has_obs)
        while got is not None:
            (identity,), msg = got
            out.append(Request(identity, msg))
            n += len(msg.arrays["obs"])
            if n >= max_obs:
                break
            got = self.recv(n_prefix=1, check=check or _has_obs)
        return out

    def reply(self, request: Request, arrays: dict, meta: dict) -> None:
        req = request.msg.meta.get("req")
        self.send("act", arrays, {**meta, "req": req if isinstance(req, int) else -1}, prefix=[request.identity])


def _has_obs(msg: Message) -> None:
    from srl.system.wire import WireError

    if "obs" not in msg.arrays or msg.arrays["obs"].ndim < 1:
        raise WireError("request without an obs array")


class InferenceClient:
    """Asks policy workers for actions. ``sticky``: one socket per server, the caller names the
    server of each request; otherwise one socket spread round robin over all of them."""

    def __init__(self, addresses: list[str], key: bytes | None = None, sticky: bool = False):
        n = len(addresses) if sticky else 1
        self.endpoints = [Endpoint(context().socket(zmq.DEALER), key) for _ in range(n)]
        for i, address in enumerate(addresses):
            self.endpoints[i if sticky else 0].sock.connect(address)
        self.poller = zmq.Poller()
        for ep in self.endpoints:
            self.poller.register(ep.sock, zmq.POLLIN)

    @property
    def dropped(self) -> int:
        return sum(ep.dropped for ep in self.endpoints)

    def post(self, obs: np.ndarray, req: int, env_ids: np.ndarray | None = None, server: int = 0,
             arrays: dict | None = None, meta: dict | None = None) -> None:
        """Ask for actions; ``arrays`` / ``meta`` add per-env inputs (a memory policy's ``first``
        flags) and request options (``want_state``)."""
        out = {"obs": obs} if env_ids is None else {"obs": obs, "env_ids": env_ids}
        self.endpoints[server].send("obs", {**out, **(arrays or {})}, {**(meta or {}), "req": req})

    def poll(self, timeout_ms: int = 0) -> Message | None:
        for ep in self.endpoints:
            got = ep.recv()
            if got is not None:
                return got[1]
        if timeout_ms and self.poller.poll(timeout_ms):
            return self.poll()
        return None

    def close(self) -> None:
        for ep in self.endpoints:
            ep.close()
