"""Hostile single messages and a seeded fuzzer against wire.decode and Endpoint.recv.

Whatever a peer sends, ``wire.decode`` returns a valid Message or raises WireError (nothing
else), and ``Endpoint.recv`` never raises: every refused message is one counted drop.
"""
import math
import time

import msgpack
import numpy as np
import pytest
import zmq

from srl.streams.base import Endpoint, bind_random, context
from srl.system import wire

# --------------------------------------------------------------------------- real messages


def _sample():
    rng = np.random.default_rng(1)
    T, B = 4, 3  # rollout_len x envs
    arrays = {
        "obs": rng.standard_normal((T + 1, B, 4)).astype(np.float32),
        "action": rng.integers(0, 2, (T, B)),
        "logp": rng.standard_normal((T, B)).astype(np.float32),
        "reward": np.ones((T, B), np.float32),
        "done": rng.random((T, B)) > 0.7,
        "valid": np.ones((T, B), bool),
    }
    return "sample", arrays, {"version": 3, "actor": 0, "seq": 5, "incarnation": 0}


def _request():
    return "obs", {"obs": np.zeros((8, 4), np.float32)}, {"req": 17}


def _params():
    rng = np.random.default_rng(2)
    arrays = {"pi.0.weight": rng.standard_normal((16, 4)).astype(np.float32),
              "pi.0.bias": np.zeros(16, np.float32), "log_std": np.zeros(2, np.float32)}
    return "params", arrays, {"received": {"0.0": 12, "1.0": 11}, "version": 3, "epoch": 0}


def _stats():
    meta = {"worker": "actor/0", "pid": 4242, "incarnation": 0, "dropped_frames": 0, "event": "heartbeat",
            "episode_returns": [21.0, 9.5], "episode_lengths": [21, 10], "env_steps": 512, "version": 3}
    return "stats", None, meta


REAL = {"sample": _sample, "request": _request, "params": _params, "stats": _stats}


def _frames(kind, arrays, meta, key=None):
    return [bytes(f) for f in wire.encode(kind, arrays, meta, key)]


def _header(frames):
    return msgpack.unpackb(frames[0], raw=False)


def _with_header(frames, header):
    return [msgpack.packb(header, use_bin_type=True), *frames[1:]]


def _assert_valid(msg):
    """What a receiver may rely on once decode returned."""
    assert isinstance(msg, wire.Message) and isinstance(msg.kind, str) and isinstance(msg.meta, dict)
    stack = [(msg.meta, 1)]
    while stack:
        node, depth = stack.pop()
        assert depth <= wire.MAX_META_DEPTH
        if isinstance(node, dict):
            assert all(type(k) is str for k in node)
        for v in (node.values() if isinstance(node, dict) else node):
            if isinstance(v, (dict, list)):
                stack.append((v, depth + 1))
            else:
                assert v is None or type(v) in (bool, int, float, str, bytes), type(v)
                if type(v) in (str, bytes):
                    assert len(v) <= wire.MAX_META_STR
    for name, arr in msg.arrays.items():
        assert isinstance(name, str) and isinstance(arr, np.ndarray)
        assert arr.dtype.str in wire._DTYPES and arr.nbytes <= wire.MAX_MESSAGE_BYTES
        assert len(arr.tobytes()) == arr.nbytes  # readable end to end


def _decode_or_wire_error(frames, key=None):
    try:
        msg = wire.decode(frames, key)
    except wire.WireError:
        return None
    _assert_valid(msg)
    return msg


# --------------------------------------------------------------------------- hostile singles


def _one_array_frames(shape, nbytes, dtype="<f4"):
    header = {"v": 1, "kind": "sample", "meta": {"version": 1}, "keys": ["obs"], "dtypes": [dtype],
              "shapes": [shape]}
    return [msgpack.packb(header), b"\0" * nbytes]


@pytest.mark.parametrize("shape, nbytes", [
    ([2**62 + 1, 4], 16),        # 4 * (2**62 + 1) * 4 bytes wraps to 16 in int64
    ([2**63 - 1, 2], 0),
    ([2**32, 2**32, 4], 0),      # wraps to 0 elements
    ([2**64 - 1], 4),
    ([0, 2**62], 0),             # an empty array with an absurd extent is still refused
    ([2**28, 2], 0),             # 2 GiB of float32: over the message bound, nothing allocated
    ([True, 4], 16),             # bools are not extents
    ([4.0], 16),
    ([-1, -4], 16),
    [[1] * 65, 4],                # rank above any bound (numpy allows 64)
    (None, 4),
    ("4", 4),
])
def test_overflowing_and_malformed_shapes_are_wire_errors(shape, nbytes):
    with pytest.raises(wire.WireError):
        wire.decode(_one_array_frames(shape, nbytes))


@pytest.mark.parametrize("dtype", ["|O", ">f4", "<U4", "<M8[s]", "V8", 4, None, ["<f4"], "<f4" * 1000])
def test_dtypes_off_the_list_are_wire_errors(dtype):
    with pytest.raises(wire.WireError):
        wire.decode(_one_array_frames([4], 16, dtype))


def test_bool_arrays_hold_only_zero_and_one():
    good = _frames("x", {"done": np.array([True, False])}, None)
    assert wire.decode(good).arrays["done"].tolist() == [True, False]
    with pytest.raises(wire.WireError, match="bool"):
        wire.decode([good[0], b"\x01\x07"])


@pytest.mark.parametrize("mutate", [
    lambda h: h.update(v=True),
    lambda h: h.update(v="1"),
    lambda h: h.update(kind=7),
    lambda h: h.update(kind=""),
    lambda h: h.update(kind="k" * 10_000),
    lambda h: h.update(meta=[1, 2]),
    lambda h: h.update(keys=[1]),
    lambda h: h.update(keys=["a", "a"], dtypes=["<f4", "<f4"], shapes=[[1], [1]]),
    lambda h: h.update(keys="obs"),
    lambda h: h.pop("shapes"),
])
def test_header_fields_are_type_checked(mutate):
    frames = _frames("sample", {"obs": np.zeros(1, np.float32)}, {"version": 1})
    header = _header(frames)
    mutate(header)
    if len(header.get("keys", [])) == 2 and isinstance(header["keys"], list):
        frames = frames + [frames[1]]
    with pytest.raises(wire.WireError):
        wire.decode(_with_header(frames, header))


@pytest.mark.parametrize("value", [
    msgpack.ExtType(5, b"xyz"),
    msgpack.Timestamp(1, 0),
    {1: "int key"},
    {b"bytes key": 1},
    "i" * (1 << 17),                 # a 128 KiB actor id, echoed into every reply before
    b"b" * (1 << 17),
    [[[[[[[[[1]]]]]]]]],             # nine levels with the meta map itself
])
def test_meta_holds_only_plain_bounded_values(value):
    frames = _frames("sample", None, {"version": 1})
    header = _header(frames)
    header["meta"]["actor"] = value
    packed = msgpack.packb(header, use_bin_type=True, strict_types=False)
    with pytest.raises(wire.WireError):
        wire.decode([packed])


def test_meta_depth_and_item_bounds_allow_what_workers_send(monkeypatch):
    deep = {"a": [[[[[[1]]]]]]}  # depth 8 with the map itself
    msg = wire.decode(_frames("stats", None, deep))
    assert msg.meta == deep
    monkeypatch.setattr(wire, "MAX_META_ITEMS", 100)
    assert wire.decode(_frames("stats", None, {"r": list(range(90))})).meta["r"][-1] == 89
    with pytest.raises(wire.WireError, match="values"):
        wire.decode(_frames("stats", None, {"r": list(range(101))}))


def test_total_bytes_header_and_array_count_are_bounded(monkeypatch):
    monkeypatch.setattr(wire, "MAX_MESSAGE_BYTES", 1024)
    with pytest.raises(wire.WireError):
        wire.encode("params", {"w": np.zeros(512, np.float32)})
    header = {"v": 1, "kind": "params", "meta": {}, "keys": ["w"], "dtypes": ["<f4"], "shapes": [[512]]}
    with pytest.raises(wire.WireError):
        wire.decode([msgpack.packb(header), b"\0" * 2048])
    monkeypatch.setattr(wire, "MAX_HEADER_BYTES", 256)
    with pytest.raises(wire.WireError, match="header"):
        wire.decode(_frames("stats", None, {"pad": "x" * 300}))
    n = wire.MAX_ARRAYS + 1
    header = {"v": 1, "kind": "x", "meta": {}, "keys": [f"a{i}" for i in range(n)],
              "dtypes": ["<f4"] * n, "shapes": [[0]] * n}
    with pytest.raises(wire.WireError):
        wire.decode([msgpack.packb(header)] + [b""] * n)


@pytest.mark.parametrize("frames", [
    [b"\x00"], [b""], [b"\xff" * 64], [b"\x81\xa1v\x01"], [123], [None], [object()], "not a list",
    [memoryview(np.zeros((4, 4), np.float32)[:, ::2])],   # a non-contiguous buffer
])
def test_garbage_of_any_type_is_a_wire_error(frames):
    with pytest.raises(wire.WireError):
        wire.decode(frames)


def test_random_bytes_with_and_without_a_key():
    rng = np.random.default_rng(3)
    for key in (None, b"k" * 32):
        for _ in range(300):
            frames = [rng.bytes(int(rng.integers(0, 64))) for _ in range(int(rng.integers(1, 4)))]
            assert _decode_or_wire_error(frames, key) is None or key is None


# --------------------------------------------------------------------------- typed access


def test_field_returns_typed_values_and_defaults():
    meta = {"version": 7, "name": "actor/0", "lag": 2, "mean": 1.5, "flag": False, "none": None}
    assert wire.field(meta, "version", int) == 7
    assert wire.field(meta, "missing", int, -1) == -1
    assert wire.field(meta, "none", int, 3) == 3
    assert wire.field(meta, "lag", float) == 2.0 and type(wire.field(meta, "lag", float)) is float
    assert wire.field(meta, "flag", bool) is False
    assert wire.field(meta, "name", str, max_len=16) == "actor/0"
    assert wire.field(meta, "version", int, low=0, high=7) == 7


@pytest.mark.parametrize("meta, kwargs, match", [
    ({"version": "x"}, {}, "expected int"),
    ({"version": True}, {}, "expected int"),      # a bool is not an int here
    ({"version": 1.0}, {}, "expected int"),
    ({"version": -1}, {"low": 0}, "outside"),
    ({"version": 2**63}, {"high": 2**62}, "outside"),
    ({"version": ["x"]}, {}, "expected int"),
    ({}, {}, "missing"),
])
def test_field_raises_wire_error_naming_the_field(meta, kwargs, match):
    with pytest.raises(wire.WireError, match=match) as err:
        wire.field(meta, "version", int, **kwargs)
    assert "'version'" in str(err.value)
    if meta:
        with pytest.raises(wire.WireError):  # a default does not excuse a wrong value
            wire.field(meta, "version", int, 0, **kwargs)


def test_field_floats_strings_and_non_dicts():
    with pytest.raises(wire.WireError, match="finite"):
        wire.field({"env_steps": math.inf}, "env_steps", float)
    with pytest.raises(wire.WireError, match="finite"):
        wire.field({"x": math.nan}, "x", float)
    with pytest.raises(wire.WireError, match="length"):
        wire.field({"actor": "a" * 1000}, "actor", str, max_len=64)
    with pytest.raises(wire.WireError, match="outside"):
        wire.field({"env_steps": 1e9}, "env_steps", float, high=1e6)
    assert wire.field(None, "x", int, 5) == 5


def test_array_checks_dtype_shape_and_values():
    arrays = {"obs": np.zeros((3, 4), np.float32), "action": np.zeros(3, np.int64)}
    assert wire.array(arrays, "obs", shape=(None, 4), kind="f", finite=True).shape == (3, 4)
    assert wire.array(arrays, "action", dtype=(np.int32, np.int64), shape=(3,)) is arrays["action"]
    with pytest.raises(wire.WireError, match="shape"):
        wire.array(arrays, "obs", shape=(None, 5))  # an observation of the wrong width
    with pytest.raises(wire.WireError, match="shape"):
        wire.array(arrays, "obs", shape=(None,))
    with pytest.raises(wire.WireError, match="kind"):
        wire.array(arrays, "action", kind="f")
    with pytest.raises(wire.WireError, match="dtype"):
        wire.array(arrays, "obs", dtype=np.float64)
    with pytest.raises(wire.WireError, match="missing"):
        wire.array(arrays, "logp")
    arrays["obs"][1, 2] = np.nan
    with pytest.raises(wire.WireError, match="nan"):
        wire.array(arrays, "obs", finite=True)


# --------------------------------------------------------------------------- endpoint level


class _Pair:
    """A raw PUSH socket a hostile peer writes to, and an Endpoint on the PULL side."""

    def __init__(self, key=None):
        self.ep = Endpoint(context().socket(zmq.PULL), key)
        self.ep.sock.setsockopt(zmq.RCVHWM, 0)
        address = bind_random(self.ep.sock, "127.0.0.1")
        self.raw = context().socket(zmq.PUSH)
        self.raw.setsockopt(zmq.SNDHWM, 0)
        self.raw.setsockopt(zmq.LINGER, 0)
        self.raw.connect(address)
        self.received = 0

    def drain(self, expected_total, timeout=10.0, check=None):
        """recv until ``expected_total`` messages in all were either returned or dropped; returns
        the messages this call received."""
        got, deadline = [], time.monotonic() + timeout
        while self.received + self.ep.dropped < expected_total:
            assert time.monotonic() < deadline, (self.received, self.ep.dropped, expected_total)
            out = self.ep.recv(timeout_ms=20, check=check)
            if out is not None:
                got.append(out[1])
                self.received += 1
        return got

    def close(self):
        self.raw.close(linger=0)
        self.ep.close()


def _hostile_singles():
    frames = _frames(*_sample())
    header = _header(frames)
    out = [_one_array_frames([2**62 + 1, 4], 16), [b"\xc1junk"], [b""]]
    for key, value in [("version", msgpack.ExtType(1, b"x")), ("actor", "a" * (1 << 17))]:
        bad = dict(header, meta=dict(header["meta"], **{key: value}))
        out.append(_with_header(frames, bad))
    return out


def test_endpoint_recv_never_raises_and_counts_each_hostile_message():
    pair = _Pair()
    try:
        singles = _hostile_singles()
        for frames in singles:
            pair.raw.send_multipart(frames)
        pair.raw.send_multipart(_frames(*_request()))
        got = pair.drain(len(singles) + 1)
        assert len(got) == 1 and got[0].meta == {"req": 17}
        assert pair.ep.dropped == len(singles)
        assert pair.ep.last_drop
    finally:
        pair.close()


def test_endpoint_check_hook_turns_a_receivers_refusal_into_a_drop():
    pair = _Pair()
    try:
        kind, arrays, meta = _sample()
        for version in (3, "x", -5, True, 4):
            pair.raw.send_multipart(_frames(kind, arrays, dict(meta, version=version)))

        def check(msg):
            wire.field(msg.meta, "version", int, low=0)
            wire.array(msg.arrays, "obs", shape=(5, 3, 4), kind="f", finite=True)

        got = pair.drain(5, check=check)
        assert [m.meta["version"] for m in got] == [3, 4]
        assert pair.ep.dropped == 3 and "version" in pair.ep.last_drop
    finally:
        pair.close()


def test_endpoint_with_a_key_drops_unsigned_and_random_frames():
    key = b"s" * 32
    pair = _Pair(key)
    try:
        rng = np.random.default_rng(4)
        pair.raw.send_multipart(_frames(*_stats()))  # valid, but unsigned
        for _ in range(50):
            pair.raw.send_multipart([rng.bytes(int(rng.integers(1, 40))) for _ in range(int(rng.integers(1, 4)))])
        pair.raw.send_multipart(_frames(*_stats(), key=key))
        got = pair.drain(52)
        assert len(got) == 1 and got[0].meta["worker"] == "actor/0"
        assert pair.ep.dropped == 51
    finally:
        pair.close()


def test_a_junk_flood_cannot_hold_recv_forever():
    from srl.streams import base

    pair = _Pair()
    try:
        n = base.MAX_DROPS_PER_RECV * 2 + 10
        for _ in range(n):
            pair.raw.send(b"\xc1")
        pair.raw.send_multipart(_frames(*_request()))
        deadline, got, steps = time.monotonic() + 10, None, []
        while got is None:
            assert time.monotonic() < deadline
            before = pair.ep.dropped
            got = pair.ep.recv(timeout_ms=20)
            steps.append(pair.ep.dropped - before)
        assert max(steps) <= base.MAX_DROPS_PER_RECV and pair.ep.dropped == n
    finally:
        pair.close()


# --------------------------------------------------------------------------- fuzzer

_JUNK_SCALARS = [None, True, False, 0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 1e308, -0.0, math.nan, math.inf,
                 "", "x" * 300, b"\x00\xff", [], {}, [1, [2, [3]]], {"a": {"b": {}}},
                 msgpack.ExtType(3, b"e"), msgpack.Timestamp(5, 7), "é" * 50]


def _junk(rng):
    """A value of a random plain or hostile type."""
    pick = int(rng.integers(0, 6))
    if pick == 0:
        return int(rng.integers(-(2**63), 2**63 - 1, dtype=np.int64))
    if pick == 1:
        return float(rng.standard_normal() * 10 ** int(rng.integers(0, 300)))
    if pick == 2:
        return rng.bytes(int(rng.integers(0, 16))).decode("latin-1")
    if pick == 3:
        depth = int(rng.integers(1, 14))
        value = 1
        for _ in range(depth):
            value = [value] if rng.random() < 0.5 else {"k": value}
        return value
    return _JUNK_SCALARS[int(rng.integers(len(_JUNK_SCALARS)))]


def _mutate_shape(rng, shape):
    shape = list(shape) if isinstance(shape, list) else [1]
    op = int(rng.integers(0, 6))
    if op == 0 and shape:
        extents = [0, 1, 2**31, 2**62 + 1, 2**63 - 1, 2**64 - 1, -1]
        shape[int(rng.integers(len(shape)))] = extents[int(rng.integers(len(extents)))]
    elif op == 1:
        shape.append(int(rng.integers(0, 5)))
    elif op == 2 and shape:
        shape.pop()
    elif op == 3:
        shape = [1] * int(rng.integers(30, 70))
    elif op == 4 and shape:
        shape[int(rng.integers(len(shape)))] = _junk(rng)
    else:
        shape = _junk(rng)
    return shape


def _mutate_header(rng, header):
    header = msgpack.unpackb(msgpack.packb(header), raw=False)  # deep copy
    op = int(rng.integers(0, 6))
    n = len(header["keys"])
    if op == 0 and n:
        i = int(rng.integers(n))
        header["shapes"][i] = _mutate_shape(rng, header["shapes"][i])
    elif op == 1 and n:
        header["dtypes"][int(rng.integers(n))] = str(rng.choice(
            ["<f8", "<f2", "|b1", "|u1", "<i8", "|O", ">f4", "<U8", "<c16", "|V4", "<f4<f4"])) if rng.random() < 0.8 \
            else _junk(rng)
    elif op == 2 and header["meta"]:
        key = str(rng.choice(list(header["meta"])))
        header["meta"][key] = _junk(rng)
    elif op == 3:
        header["meta"][f"k{int(rng.integers(100))}"] = _junk(rng)
    elif op == 4:
        field_name = str(rng.choice(["v", "kind", "meta", "keys", "dtypes", "shapes"]))
        if rng.random() < 0.3:
            header.pop(field_name)
        else:
            header[field_name] = _junk(rng)
    elif n:
        header["keys"][int(rng.integers(n))] = _junk(rng) if rng.random() < 0.5 else header["keys"][0]
    return header


def _mutate(rng, frames):
    """One mutated copy of a real message: bytes, frame layout or a header field."""
    frames = list(frames)
    op = int(rng.integers(0, 5))
    if op == 0:  # flip bytes anywhere
        i = int(rng.integers(len(frames)))
        buf = bytearray(frames[i])
        for _ in range(int(rng.integers(1, 4))):
            if buf:
                buf[int(rng.integers(len(buf)))] ^= 1 << int(rng.integers(8))
        frames[i] = bytes(buf)
    elif op == 1:  # truncate or extend a frame
        i = int(rng.integers(len(frames)))
        frames[i] = frames[i][: int(rng.integers(0, len(frames[i]) + 1))] if rng.random() < 0.5 \
            else frames[i] + rng.bytes(int(rng.integers(1, 9)))
    elif op == 2:  # drop, duplicate or reorder frames
        if rng.random() < 0.4 and len(frames) > 1:
            frames.pop(int(rng.integers(len(frames))))
        elif rng.random() < 0.5:
            frames.insert(int(rng.integers(len(frames) + 1)), frames[int(rng.integers(len(frames)))])
        else:
            rng.shuffle(frames)
    else:  # re-encoded header with a hostile field
        frames[0] = msgpack.packb(_mutate_header(rng, _header(frames)), use_bin_type=True)
    return frames


def _fuzz_cases(name, n, seed):
    rng = np.random.default_rng(seed)
    base = _frames(*REAL[name]())
    return [_mutate(rng, base) for _ in range(n)]


@pytest.mark.parametrize("name", sorted(REAL))
def test_fuzzed_real_messages_decode_or_raise_wire_error(name):
    cases = _fuzz_cases(name, 1500, seed=sorted(REAL).index(name))
    outcomes = [_decode_or_wire_error(frames) for frames in cases]
    refused = sum(o is None for o in outcomes)
    assert 0.2 * len(cases) < refused < len(cases)  # the fuzzer reaches both sides


@pytest.mark.parametrize("name", sorted(REAL))
def test_fuzzed_messages_through_an_endpoint_are_each_counted(name):
    cases = _fuzz_cases(name, 600, seed=7 + len(name))
    expected_drops = sum(_decode_or_wire_error(f) is None for f in cases)
    pair = _Pair()
    try:
        total = 0
        for start in range(0, len(cases), 200):
            for frames in cases[start:start + 200]:
                pair.raw.send_multipart(frames)
            total += len(cases[start:start + 200])
            pair.drain(total)
        assert pair.ep.dropped == expected_drops
    finally:
        pair.close()


def test_fuzzed_requests_through_a_router_with_identity_prefix():
    """The inference stream's shape: ROUTER prepends the peer identity (n_prefix=1)."""
    cases = _fuzz_cases("request", 400, seed=11)
    expected_drops = sum(_decode_or_wire_error(f) is None for f in cases)
    server = Endpoint(context().socket(zmq.ROUTER), None)
    address = bind_random(server.sock, "127.0.0.1")
    client = context().socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    client.connect(address)
    try:
        got, deadline = 0, time.monotonic() + 10
        for frames in cases:
            client.send_multipart(frames)
        while got + server.dropped < len(cases):
            assert time.monotonic() < deadline
            out = server.recv(n_prefix=1, timeout_ms=20)
            if out is not None:
                (identity,), msg = out
                assert isinstance(identity, bytes)
                got += 1
        assert server.dropped == expected_drops
    finally:
        client.close(linger=0)
        server.close()
