import numpy as np
import pytest

from srl.system import wire


def _arrays(rng):
    return {
        "obs": rng.standard_normal((5, 3, 4)).astype(np.float32),
        "action": rng.integers(0, 7, (5, 3)),
        "done": rng.random((5, 3)) > 0.5,
        "empty": np.zeros((0, 2), np.float64),
        "scalar": np.array(3.5),
    }


def test_round_trip_preserves_dtypes_shapes_values_and_meta():
    rng = np.random.default_rng(0)
    arrays = _arrays(rng)
    frames = wire.encode("sample", arrays, {"version": 7, "actor": 2})
    msg = wire.decode([bytes(f) for f in frames])
    assert msg.kind == "sample" and msg.meta == {"version": 7, "actor": 2}
    assert set(msg.arrays) == set(arrays)
    for k, v in arrays.items():
        assert msg.arrays[k].dtype == v.dtype and msg.arrays[k].shape == v.shape
        np.testing.assert_array_equal(msg.arrays[k], v)


def test_encode_does_not_copy_contiguous_arrays():
    arr = np.arange(12, dtype=np.float32)
    frames = wire.encode("x", {"a": arr})
    assert isinstance(frames[1], memoryview)
    arr[0] = 99.0  # the frame is a view on the array's buffer
    assert np.frombuffer(frames[1], np.float32)[0] == 99.0


def test_non_contiguous_array_is_sent_correctly():
    arr = np.arange(20, dtype=np.int32).reshape(4, 5)[:, ::2]
    msg = wire.decode([bytes(f) for f in wire.encode("x", {"a": arr})])
    np.testing.assert_array_equal(msg.arrays["a"], arr)


def test_object_arrays_are_refused_on_encode():
    with pytest.raises(wire.WireError, match="dtype"):
        wire.encode("x", {"a": np.array([object()], dtype=object)})


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b"\xc1not msgpack"],
        [b"\x93\x01\x02\x03"],  # msgpack, but a list instead of a header
    ],
)
def test_garbage_frames_raise_wire_error(frames):
    with pytest.raises(wire.WireError):
        wire.decode(frames)


def test_wrong_buffer_size_dtype_and_count_are_rejected():
    good = [bytes(f) for f in wire.encode("x", {"a": np.zeros(4, np.float32)})]
    with pytest.raises(wire.WireError, match="bytes"):
        wire.decode([good[0], good[1][:-1]])
    with pytest.raises(wire.WireError, match="frames"):
        wire.decode([good[0]])
    import msgpack

    header = msgpack.unpackb(good[0])
    header["dtypes"] = ["|O"]
    with pytest.raises(wire.WireError, match="not allowed"):
        wire.decode([msgpack.packb(header), good[1]])
    header["dtypes"] = ["<f4"]
    header["shapes"] = [[-4]]
    with pytest.raises(wire.WireError, match="shape"):
        wire.decode([msgpack.packb(header), good[1]])


def test_hmac_accepts_right_key_and_rejects_wrong_or_missing_tag():
    key = b"k" * 32
    frames = [bytes(f) for f in wire.encode("x", {"a": np.ones(3)}, {"v": 1}, key=key)]
    assert wire.decode(frames, key=key).meta == {"v": 1}
    with pytest.raises(wire.WireError, match="tag"):
        wire.decode(frames, key=b"j" * 32)
    with pytest.raises(wire.WireError, match="tag"):
        wire.decode(frames[:-1], key=key)  # tag stripped
    tampered = list(frames)
    tampered[1] = np.full(3, 2.0).tobytes()
    with pytest.raises(wire.WireError, match="tag"):
        wire.decode(tampered, key=key)
