"""Socket helpers shared by the streams: bind to a host on a free port, send/receive
srl messages with optional HMAC, and count what had to be dropped."""
from __future__ import annotations

import time

import zmq

from srl.system import wire

MAX_DROPS_PER_RECV = 1000
"""Malformed messages one ``recv`` call drops before it returns None to its caller."""


def context() -> zmq.Context:
    """The process's ZMQ context (re-created after fork)."""
    return zmq.Context.instance()


def bind_random(sock: zmq.Socket, host: str, prefer: str | None = None) -> str:
    """Bind to ``host`` on a free port; return the address peers connect to.

    ``prefer`` is the address this endpoint had before a restart: binding the same port again
    lets connected peers reconnect on their own.
    """
    port = None
    try:
        old_port = int(prefer.rsplit(":", 1)[1]) if prefer else None
    except (ValueError, IndexError):
        old_port = None
    for attempt in range(10 if old_port else 0):  # the old owner's socket may still be closing
        try:
            sock.bind(f"tcp://{host}:{old_port}")
            port = old_port
            break
        except zmq.ZMQError:
            time.sleep(0.02 * (attempt + 1))
    if port is None:
        port = sock.bind_to_random_port(f"tcp://{host}")
    advertised = "127.0.0.1" if host in ("0.0.0.0", "*") else host
    return f"tcp://{advertised}:{port}"


class Endpoint:
    """A socket plus the stream's HMAC key and a counter of malformed frames dropped."""

    def __init__(self, sock: zmq.Socket, key: bytes | None):
        self.sock = sock
        self.key = key
        self.dropped = 0
        self.last_drop = ""
        """Why the latest dropped message was refused (one line; for tests and debugging)."""
        sock.setsockopt(zmq.LINGER, 0)
        # ZMQ disconnects a peer whose frame could never be a valid message, before buffering it
        sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_MESSAGE_BYTES + wire.MAX_HEADER_BYTES)

    def send(self, kind: str, arrays=None, meta=None, prefix: list | None = None, flags: int = 0) -> bool:
        frames = wire.encode(kind, arrays, meta, self.key)
        try:
            self.sock.send_multipart((prefix or []) + frames, flags=flags, copy=False)
            return True
        except zmq.Again:
            return False

    def recv(self, n_prefix: int = 0, timeout_ms: int = 0, check=None):
        """Next well-formed message as ``(prefix, Message)``; None when nothing is waiting.

        Malformed messages are dropped and counted, never raised: any exception from decoding,
        or from ``check(message)`` (a receiver's validation, which raises ``wire.WireError`` on a
        message it cannot use), counts one drop. After ``MAX_DROPS_PER_RECV`` drops in a row it
        returns None, so a junk flood cannot keep the caller from its other work."""
        for _ in range(MAX_DROPS_PER_RECV):
            if timeout_ms and not self.sock.poll(timeout_ms):
                return None
            try:
                frames = self.sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return None
            timeout_ms = 0
            try:
                if len(frames) <= n_prefix:
                    raise wire.WireError(f"{len(frames)} frames, no room for the message")
                msg = wire.decode(frames[n_prefix:], self.key)
                if check is not None:
                    check(msg)
                return [f.bytes for f in frames[:n_prefix]], msg
            except Exception as exc:  # noqa: BLE001 - whatever a peer sent, it is a drop
                self.drop(f"{type(exc).__name__}: {str(exc)[:200]}")
        return None

    def drop(self, reason: str) -> None:
        """Count one message this endpoint's owner refused (after recv, e.g. a field out of range)."""
        self.dropped += 1
        self.last_drop = reason

    def close(self) -> None:
        self.sock.close(linger=0)
