"""ZMQ framing: one msgpack header frame, then one raw frame per numpy array.

Nothing received is ever unpickled. The header lists each array's key, dtype and shape;
arrays travel as their own buffers (``copy=False`` on send, ``np.frombuffer`` on receive).
With a key, an HMAC-SHA256 tag over the header and every buffer is appended as a last frame;
frames whose tag is missing or wrong are rejected like any malformed message.

Everything a peer sends is hostile until checked: :func:`decode` raises :class:`WireError` and
nothing else, whatever the bytes. Sizes are computed with Python integers (no wrap-around) and
bounded by the module constants below; the metadata may only hold plain msgpack values (None,
bool, int, float, str, bytes, lists, str-keyed maps) of bounded depth and size. Receivers read
metadata fields through :func:`field` and arrays through :func:`array`, which also raise
:class:`WireError` on a wrong type, range or shape.
"""
from __future__ import annotations

import hashlib
import hmac
import math
from dataclasses import dataclass, field as dc_field
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

MAX_MESSAGE_BYTES = 1 << 30
"""Largest message (header plus every array buffer) encoded or accepted."""
MAX_HEADER_BYTES = 4 << 20
"""Largest msgpack header frame."""
MAX_ARRAYS = 4096
"""Most arrays in one message."""
MAX_RANK = 32
"""Most dimensions of one array."""
MAX_NAME_LEN = 256
"""Longest message kind or array name."""
MAX_META_DEPTH = 8
"""Deepest nesting of lists and maps inside the metadata (the metadata map itself is depth 1)."""
MAX_META_ITEMS = 1 << 18
"""Most values (scalars, list items, map entries) in the metadata, all levels together."""
MAX_META_STR = 64 << 10
"""Longest str or bytes value inside the metadata."""
_MAX_ARRAYS = MAX_ARRAYS  # old name

_REQUIRED = object()


class WireError(ValueError):
    """A frame sequence that is not a valid srl message (or a field of one that is not usable)."""


@dataclass
class Message:
    """A decoded message: free-form metadata plus named arrays."""

    kind: str
    meta: dict = dc_field(default_factory=dict)
    arrays: dict[str, np.ndarray] = dc_field(default_factory=dict)


# --------------------------------------------------------------------------- encode


def encode(kind: str, arrays: dict[str, np.ndarray] | None = None, meta: dict | None = None,
           key: bytes | None = None) -> list:
    """Frames for one message: [header, *buffers] (+ [tag] with a key). Arrays are not copied
    unless they are non-contiguous. Raises :class:`WireError` for what :func:`decode` would refuse
    on the other side (a dtype off the list, too many or too large arrays)."""
    arrays = arrays or {}
    if len(arrays) > MAX_ARRAYS:
        raise WireError(f"{len(arrays)} arrays in one message, at most {MAX_ARRAYS}")
    names, dtypes, shapes, buffers = [], [], [], []
    total = 0
    for name, arr in arrays.items():
        arr = np.asarray(arr)
        if arr.dtype.str not in _DTYPES:
            raise WireError(f"array {name!r}: dtype {arr.dtype} cannot go on the wire")
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        total += arr.nbytes
        names.append(name)
        dtypes.append(arr.dtype.str)
        shapes.append(list(arr.shape))
        buffers.append(memoryview(arr).cast("B") if arr.size else b"")
    if total > MAX_MESSAGE_BYTES:
        raise WireError(f"message of {total} array bytes, at most {MAX_MESSAGE_BYTES}")
    header = msgpack.packb(
        {"v": _VERSION, "kind": kind, "meta": meta or {}, "keys": names, "dtypes": dtypes, "shapes": shapes},
        use_bin_type=True,
    )
    frames = [header, *buffers]
    if key is not None:
        frames.append(_tag(key, frames))
    return frames


# --------------------------------------------------------------------------- decode


def decode(frames: list, key: bytes | None = None) -> Message:
    """Inverse of :func:`encode`. Raises :class:`WireError`, and only that, on anything malformed.

    ``frames`` may hold bytes or ``zmq.Frame`` objects; arrays are read-only views on the frame
    buffers.
    """
    try:
        return _decode(frames, key)
    except WireError:
        raise
    except Exception as exc:  # a check we did not think of: still a bad message, never a crash
        raise WireError(f"malformed message ({type(exc).__name__}: {str(exc)[:200]})") from None


def _decode(frames: list, key: bytes | None) -> Message:
    if not isinstance(frames, (list, tuple)) or not frames:
        raise WireError("empty message")
    if len(frames) > MAX_ARRAYS + 2:
        raise WireError(f"{len(frames)} frames in one message, at most {MAX_ARRAYS + 2}")
    bufs = [_buffer(f) for f in frames]
    total = sum(b.nbytes for b in bufs)
    if total > MAX_MESSAGE_BYTES + MAX_HEADER_BYTES + 64:
        raise WireError(f"message of {total} bytes, at most {MAX_MESSAGE_BYTES + MAX_HEADER_BYTES}")
    if key is not None:
        if len(bufs) < 2:
            raise WireError("missing authentication tag")
        expected = _tag(key, bufs[:-1])
        if not hmac.compare_digest(expected, bytes(bufs[-1])):
            raise WireError("bad authentication tag")
        bufs = bufs[:-1]
    kind, meta, names, dtypes, shapes = _header(bufs[0], len(bufs) - 1)
    arrays = {}
    for name, dt, shape, buf in zip(names, dtypes, shapes, bufs[1:]):
        arrays[name] = _array(name, dt, shape, buf)
    return Message(kind, meta, arrays)


def _header(buf: memoryview, n_buffers: int) -> tuple:
    if buf.nbytes > MAX_HEADER_BYTES:
        raise WireError(f"header of {buf.nbytes} bytes, at most {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(buf, raw=False, strict_map_key=True, max_bin_len=MAX_META_STR,
                                 max_str_len=MAX_META_STR, max_array_len=1 << 16, max_map_len=1 << 16,
                                 max_ext_len=0)
    except Exception as exc:  # msgpack raises several unrelated types
        raise WireError(f"header is not msgpack: {str(exc)[:200]}") from None
    if not isinstance(header, dict) or type(header.get("v")) is not int or header["v"] != _VERSION:
        raise WireError("header is not an srl v1 header")
    kind, meta = header.get("kind"), header.get("meta")
    names, dtypes, shapes = header.get("keys"), header.get("dtypes"), header.get("shapes")
    if not isinstance(kind, str) or not 0 < len(kind) <= MAX_NAME_LEN:
        raise WireError("header lacks a kind (a non-empty short string)")
    if not isinstance(meta, dict):
        raise WireError("header lacks meta (a map)")
    _check_meta(meta)
    if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)):
        raise WireError("header lacks keys/dtypes/shapes")
    if len(names) > MAX_ARRAYS or not (len(names) == len(dtypes) == len(shapes) == n_buffers):
        raise WireError(f"header announces {len(names)} arrays but {n_buffers} frames follow")
    if not all(isinstance(n, str) and 0 < len(n) <= MAX_NAME_LEN for n in names):
        raise WireError("array names must be non-empty short strings")
    if len(set(names)) != len(names):
        raise WireError("array names repeat")
    return kind, meta, names, dtypes, shapes


_SCALARS = frozenset((type(None), bool, int, float, str, bytes))


def _check_meta(meta: dict) -> None:
    """Plain msgpack values only, at most MAX_META_DEPTH deep and MAX_META_ITEMS in all."""
    stack = [(meta, 1)]
    items = 0
    while stack:
        node, depth = stack.pop()
        if depth > MAX_META_DEPTH:
            raise WireError(f"meta nests deeper than {MAX_META_DEPTH} levels")
        if type(node) is dict:
            if not set(map(type, node)) <= {str}:
                raise WireError("meta map keys must be strings")
            values = node.values()
        else:
            values = node
        items += len(node)
        if items > MAX_META_ITEMS:
            raise WireError(f"meta holds more than {MAX_META_ITEMS} values")
        if set(map(type, values)) <= _SCALARS:  # the common case, checked at C speed
            continue
        for value in values:
            if type(value) is dict or type(value) is list:
                stack.append((value, depth + 1))
            elif type(value) not in _SCALARS:
                raise WireError(f"meta value of type {type(value).__name__} not allowed")


def _array(name: str, dt: Any, shape: Any, buf: memoryview) -> np.ndarray:
    dtype = _DTYPES.get(dt) if isinstance(dt, str) else None
    if dtype is None:
        raise WireError(f"array {name!r}: dtype {str(dt)[:40]!r} not allowed")
    if (not isinstance(shape, list) or len(shape) > MAX_RANK
            or not all(type(s) is int and 0 <= s <= MAX_MESSAGE_BYTES for s in shape)):
        raise WireError(f"array {name!r}: bad shape {str(shape)[:80]}")
    count = math.prod(shape)  # Python integers: no wrap-around
    nbytes = count * dtype.itemsize
    if nbytes > MAX_MESSAGE_BYTES:
        raise WireError(f"array {name!r}: {dt}{tuple(shape)} would take {nbytes} bytes, at most {MAX_MESSAGE_BYTES}")
    if nbytes != buf.nbytes:
        raise WireError(f"array {name!r}: {buf.nbytes} bytes do not hold {dt}{tuple(shape)}")
    if count == 0:
        return np.zeros(shape, dtype)
    if dtype.kind == "b" and np.frombuffer(buf, np.uint8, count=count).max() > 1:
        raise WireError(f"array {name!r}: bool bytes other than 0 and 1")
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)


def _buffer(frame: Any) -> memoryview:
    if hasattr(frame, "buffer"):  # zmq.Frame
        frame = frame.buffer
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise WireError(f"frame of type {type(frame).__name__} is not a buffer")
    view = memoryview(frame)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _tag(key: bytes, frames: list) -> bytes:
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for f in frames:
        b = f if isinstance(f, memoryview) and f.format == "B" else _buffer(f)
        mac.update(len(b).to_bytes(8, "little"))
        mac.update(b)
    return mac.digest()


# --------------------------------------------------------------------------- typed access


def field(meta: dict, name: str, typ: type, default: Any = _REQUIRED, *, low: float | None = None,
          high: float | None = None, max_len: int | None = None) -> Any:
    """``meta[name]`` checked to be of type ``typ``; ``default`` when absent (or null).

    Raises :class:`WireError` (one line naming the field) when the value has the wrong type, lies
    outside ``[low, high]`` (numbers), is longer than ``max_len`` (str, bytes, list, dict), or is
    absent with no default. ``int`` never accepts a bool; ``float`` accepts an int (returned as a
    float) and refuses nan and inf.

    Example: ``version = wire.field(msg.meta, "version", int, low=0)``.
    """
    value = meta.get(name) if isinstance(meta, dict) else None
    if value is None:
        if default is _REQUIRED:
            raise WireError(f"meta field {name!r} missing")
        return default
    if typ is float and type(value) is int:
        value = float(value)
    if type(value) is not typ:
        raise WireError(f"meta field {name!r}: expected {typ.__name__}, got {type(value).__name__}")
    if typ is float and not math.isfinite(value):
        raise WireError(f"meta field {name!r}: {value} is not finite")
    if (low is not None and value < low) or (high is not None and value > high):
        raise WireError(f"meta field {name!r}: {value} outside [{low}, {high}]")
    if max_len is not None and typ in (str, bytes, list, dict) and len(value) > max_len:
        raise WireError(f"meta field {name!r}: length {len(value)} above {max_len}")
    return value


def array(arrays: dict, name: str, dtype: Any = None, shape: tuple | None = None, *, kind: str | None = None,
          finite: bool = False) -> np.ndarray:
    """``arrays[name]`` checked against a dtype and a shape pattern.

    ``dtype``: one dtype or a tuple of them; ``kind``: numpy kind letters instead (``"f"`` float,
    ``"iu"`` integer, ``"b"`` bool); None accepts any wire dtype. ``shape``: a tuple of ints and
    Nones (None matches any length), so ``(None, 4)`` is a batch of 4-wide rows. ``finite`` refuses
    nan and inf. Raises :class:`WireError` naming the array.

    Example: ``obs = wire.array(msg.arrays, "obs", shape=(None, *obs_shape), kind="f", finite=True)``.
    """
    arr = arrays.get(name) if isinstance(arrays, dict) else None
    if not isinstance(arr, np.ndarray):
        raise WireError(f"array {name!r} missing")
    if dtype is not None and not any(arr.dtype == np.dtype(d) for d in (dtype if isinstance(dtype, tuple) else (dtype,))):
        raise WireError(f"array {name!r}: dtype {arr.dtype} not allowed here")
    if kind is not None and arr.dtype.kind not in kind:
        raise WireError(f"array {name!r}: dtype {arr.dtype} is not of kind {kind!r}")
    if shape is not None and (arr.ndim != len(shape)
                              or any(w is not None and w != s for w, s in zip(shape, arr.shape))):
        raise WireError(f"array {name!r}: shape {arr.shape} does not match {tuple(shape)}")
    if finite and arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise WireError(f"array {name!r}: nan or inf values")
    return arr
