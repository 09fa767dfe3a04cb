"""ZMQ framing: one msgpack header frame, then one raw frame per numpy array.

Nothing received is ever unpickled. The header lists each array's key, dtype and shape;
arrays travel as their own buffers (``copy=False`` on send, ``np.frombuffer`` on receive).
With a key, an HMAC-SHA256 tag over the header and every buffer is appended as a last frame;
frames whose tag is missing or wrong are rejected like any malformed message.
"""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

# dtypes allowed on the wire; anything else (object arrays above all) is refused.
_DTYPES = {
    np.dtype(t).str: np.dtype(t)
    for t in ("bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
              "float16", "float32", "float64")
}
_VERSION = 1
_MAX_ARRAYS = 4096


class WireError(ValueError):
    """A frame sequence that is not a valid srl message."""


@dataclass
class Message:
    """A decoded message: free-form metadata plus named arrays."""

    kind: str
    meta: dict = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def encode(kind: str, arrays: dict[str, np.ndarray] | None = None, meta: dict | None = None,
           key: bytes | None = None) -> list:
    """Frames for one message: [header, *buffers] (+ [tag] with a key). Arrays are not copied
    unless they are non-contiguous."""
    arrays = arrays or {}
    names, dtypes, shapes, buffers = [], [], [], []
    for name, arr in arrays.items():
        arr = np.asarray(arr)
        if arr.dtype.str not in _DTYPES:
            raise WireError(f"array {name!r}: dtype {arr.dtype} cannot go on the wire")
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        names.append(name)
        dtypes.append(arr.dtype.str)
        shapes.append(list(arr.shape))
        buffers.append(memoryview(arr).cast("B") if arr.size else b"")
    header = msgpack.packb(
        {"v": _VERSION, "kind": kind, "meta": meta or {}, "keys": names, "dtypes": dtypes, "shapes": shapes},
        use_bin_type=True,
    )
    frames = [header, *buffers]
    if key is not None:
        frames.append(_tag(key, frames))
    return frames


def decode(frames: list, key: bytes | None = None) -> Message:
    """Inverse of :func:`encode`. Raises :class:`WireError` on anything malformed.

    ``frames`` may hold bytes or ``zmq.Frame`` objects; arrays are views on the frame buffers.
    """
    bufs = [_buffer(f) for f in frames]
    if not bufs:
        raise WireError("empty message")
    if key is not None:
        if len(bufs) < 2:
            raise WireError("missing authentication tag")
        expected = _tag(key, bufs[:-1])
        if not hmac.compare_digest(expected, bytes(bufs[-1])):
            raise WireError("bad authentication tag")
        bufs = bufs[:-1]
    try:
        header = msgpack.unpackb(bufs[0], raw=False, strict_map_key=True, max_bin_len=1 << 20,
                                 max_str_len=1 << 20, max_array_len=1 << 16, max_map_len=1 << 16)
    except Exception as exc:  # msgpack raises several unrelated types
        raise WireError(f"header is not msgpack: {exc}") from None
    if not isinstance(header, dict) or header.get("v") != _VERSION:
        raise WireError("header is not an srl v1 header")
    kind, meta = header.get("kind"), header.get("meta")
    names, dtypes, shapes = header.get("keys"), header.get("dtypes"), header.get("shapes")
    if not isinstance(kind, str) or not isinstance(meta, dict):
        raise WireError("header lacks kind/meta")
    if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)):
        raise WireError("header lacks keys/dtypes/shapes")
    if not (len(names) == len(dtypes) == len(shapes) == len(bufs) - 1) or len(names) > _MAX_ARRAYS:
        raise WireError(f"header announces {len(names)} arrays but {len(bufs) - 1} frames follow")
    arrays = {}
    for name, dt, shape, buf in zip(names, dtypes, shapes, bufs[1:]):
        arrays[str(name)] = _array(name, dt, shape, buf)
    return Message(kind, meta, arrays)


def _array(name: Any, dt: Any, shape: Any, buf: memoryview) -> np.ndarray:
    dtype = _DTYPES.get(dt) if isinstance(dt, str) else None
    if dtype is None:
        raise WireError(f"array {name!r}: dtype {dt!r} not allowed")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape) or len(shape) > 32:
        raise WireError(f"array {name!r}: bad shape {shape!r}")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if count * dtype.itemsize != buf.nbytes:
        raise WireError(f"array {name!r}: {buf.nbytes} bytes do not hold {dt}{tuple(shape)}")
    if count == 0:
        return np.zeros(shape, dtype)
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)


def _buffer(frame: Any) -> memoryview:
    if hasattr(frame, "buffer"):  # zmq.Frame
        return memoryview(frame.buffer).cast("B")
    return memoryview(frame).cast("B")


def _tag(key: bytes, frames: list) -> bytes:
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for f in frames:
        b = _buffer(f)
        mac.update(len(b).to_bytes(8, "little"))
        mac.update(b)
    return mac.digest()
