"""Inference stream: actors (DEALER) ask, policy workers (ROUTER) answer in batches.

A policy worker drains every request waiting when its last forward pass ended and answers
them with one forward pass: there is no fixed batch size to tune.
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


class InferenceServer(Endpoint):
    def __init__(self, host: str = "127.0.0.1", key: bytes | None = None, prefer: str | None = None):
        super().__init__(context().socket(zmq.ROUTER), key)
        self.address = bind_random(self.sock, host, prefer)

    def pending(self, max_obs: int, timeout_ms: int = 0) -> list[Request]:
        """All requests waiting now (up to ``max_obs`` observations), waiting at most
        ``timeout_ms`` for the first one."""
        out: list[Request] = []
        n = 0
        got = self.recv(n_prefix=1, timeout_ms=timeout_ms)
        while got is not None:
            (identity,), msg = got
            if "obs" not in msg.arrays or msg.arrays["obs"].ndim < 1:
                self.dropped += 1
            else:
                out.append(Request(identity, msg))
                n += len(msg.arrays["obs"])
                if n >= max_obs:
                    break
            got = self.recv(n_prefix=1)
        return out

    def reply(self, request: Request, arrays: dict, meta: dict) -> None:
        self.send("act", arrays, {**meta, "req": request.msg.meta.get("req")}, prefix=[request.identity])


class InferenceClient(Endpoint):
    """Connects to every policy worker; DEALER spreads requests across them."""

    def __init__(self, addresses: list[str], key: bytes | None = None):
        super().__init__(context().socket(zmq.DEALER), key)
        for address in addresses:
            self.sock.connect(address)

    def post(self, obs: np.ndarray, req: int) -> None:
        self.send("obs", {"obs": obs}, {"req": req})

    def poll(self, timeout_ms: int = 0) -> Message | None:
        got = self.recv(timeout_ms=timeout_ms)
        return None if got is None else got[1]
