"""Sample stream: actors PUSH trajectories, the trainer PULLs them.

A trajectory is a dict of arrays shaped [T, B, ...] plus metadata: the policy version that
produced it, the actor's index and a sequence number. PUSH blocks at the high-water mark, which
is the back-pressure that keeps actors from running far ahead of the learner.
"""
from __future__ import annotations

import zmq

from srl.streams.base import Endpoint, bind_random, context
from srl.system.wire import Message


class SampleConsumer(Endpoint):
    def __init__(self, host: str = "127.0.0.1", key: bytes | None = None, prefer: str | None = None, hwm: int = 64):
        super().__init__(context().socket(zmq.PULL), key)
        self.sock.setsockopt(zmq.RCVHWM, hwm)
        self.address = bind_random(self.sock, host, prefer)

    def poll(self, timeout_ms: int = 0) -> Message | None:
        got = self.recv(timeout_ms=timeout_ms)
        return None if got is None else got[1]


class SampleProducer(Endpoint):
    def __init__(self, addresses: list[str], key: bytes | None = None, hwm: int = 1):
        super().__init__(context().socket(zmq.PUSH), key)
        self.sock.setsockopt(zmq.SNDHWM, hwm)
        for address in addresses:
            self.sock.connect(address)

    def push(self, arrays: dict, meta: dict, timeout_ms: int = 100) -> bool:
        """Send one trajectory; False if the trainer did not take it within ``timeout_ms``."""
        if self.send("sample", arrays, meta, flags=zmq.NOBLOCK):
            return True
        if self.sock.poll(timeout_ms, zmq.POLLOUT):
            return self.send("sample", arrays, meta, flags=zmq.NOBLOCK)
        return False
