"""Weights through a shared-memory file for same-host parameter clients."""
import os
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from srl.streams import shared_weights as sw
from srl.streams.params import ParamClient, ParamServer

pytestmark = pytest.mark.skipif(not sw.available(), reason="no writable /dev/shm")


def _weights(rng, scale=1.0):
    return {"w": rng.standard_normal((33, 7)).astype(np.float32) * scale,
            "b": rng.standard_normal(5),  # float64
            "count": np.array(3, dtype=np.int64),  # 0-d stays 0-d
            "t": np.arange(6.0, dtype=np.float32).reshape(2, 3).T}  # a transposed view


def _pull(server, client, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        server.serve()
        got = client.poll(timeout_ms=10)
        if got is not None:
            return got
    raise AssertionError("no weights arrived")


def _equal(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].shape == np.asarray(b[k]).shape and a[k].dtype == np.asarray(b[k]).dtype, k
        np.testing.assert_array_equal(a[k], b[k])


def test_same_host_client_reads_the_file_and_gets_every_version():
    rng = np.random.default_rng(0)
    server = ParamServer()
    client = ParamClient(server.address, interval_s=0.0)
    try:
        for version in range(4):
            w = _weights(rng, scale=version + 1)
            server.publish(version, w)
            got_version, arrays = _pull(server, client)
            assert got_version == version
            _equal(arrays, w)
            assert client._reader is not None and client._reader.path == server._file.path
        mode = stat.S_IMODE(os.stat(server._file.path).st_mode)
        assert mode == 0o600, oct(mode)
        # the copy is the client's own: the next write does not change it
        server.publish(4, _weights(rng))
        _equal(arrays, w)
    finally:
        path = server._file.path
        client.close()
        server.close()
    assert not os.path.exists(path)


def test_client_without_sharing_gets_the_same_weights_over_the_wire():
    rng = np.random.default_rng(1)
    server = ParamServer()
    client = ParamClient(server.address, interval_s=0.0, shared=False)
    w = _weights(rng)
    server.publish(0, w)
    version, arrays = _pull(server, client)
    _equal(arrays, w)
    assert client._reader is None and server._file is None  # negative control: no file was made
    server.close()
    client.close()


def test_other_host_gets_the_wire():
    server = ParamServer()
    client = ParamClient(server.address, interval_s=0.0)
    client.host = "elsewhere/boot"
    w = _weights(np.random.default_rng(2))
    server.publish(0, w)
    _, arrays = _pull(server, client)
    _equal(arrays, w)
    assert client._reader is None and server._file is None
    server.close()
    client.close()


def test_slots_and_torn_reads():
    rng = np.random.default_rng(3)
    w0, w1, w2 = _weights(rng), _weights(rng), _weights(rng)
    writer = sw.SharedWeightsWriter(w0)
    try:
        reader = sw.SharedWeightsReader(writer.path, writer.manifest)
        assert writer.write(0, w0) == 0 and writer.write(1, w1) == 1
        _equal(reader.read(0, 0), w0)  # version 0 survives version 1 (the other slot)
        _equal(reader.read(1, 1), w1)
        writer.write(2, w2)
        assert reader.read(0, 0) is None  # overwritten by version 2: refused, not returned torn
        _equal(reader.read(0, 2), w2)
        writer.map.header[0] += np.uint64(1)  # slot 0 being written
        assert reader.read(0, 2) is None
        writer.map.header[0] += np.uint64(1)
        _equal(reader.read(0, 2), w2)
        with pytest.raises(ValueError, match="slot"):
            reader.read(2, 2)
        reader.close()
    finally:
        writer.close()


def test_reader_refuses_paths_outside_the_shared_folder_and_short_files(tmp_path):
    w = _weights(np.random.default_rng(4))
    with pytest.raises(ValueError, match="not an srl file"):
        sw.SharedWeightsReader(str(tmp_path / "x"), sw.manifest_of(w))
    writer = sw.SharedWeightsWriter({"w": np.zeros(4, np.float32)})
    try:
        with pytest.raises(ValueError, match="manifest needs"):
            sw.SharedWeightsReader(writer.path, sw.manifest_of(w))
    finally:
        writer.close()


def test_bad_file_from_the_server_falls_back_to_the_wire():
    server = ParamServer()
    client = ParamClient(server.address, interval_s=0.0)
    w = _weights(np.random.default_rng(5))
    server.publish(0, w)
    server._shared_file()
    os.unlink(server._file.path)  # gone before the client maps it
    deadline = time.monotonic() + 5
    got = None
    while got is None and time.monotonic() < deadline:
        server.serve()
        got = client.poll(timeout_ms=10)
    assert got is not None and client.dropped == 1 and "shared weights" in client.last_drop
    assert client.host is None  # from then on over the wire
    _equal(got[1], w)
    server.close()
    client.close()


def test_files_of_dead_processes_are_removed():
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(proc.stdout)
    stale = os.path.join(sw.SHM_DIR, f"{sw.PREFIX}{dead}-deadbeef")
    mine = os.path.join(sw.SHM_DIR, f"{sw.PREFIX}{os.getpid()}-cafe")
    for p in (stale, mine):
        with open(p, "wb") as f:
            f.write(b"x")
    try:
        writer = sw.SharedWeightsWriter({"w": np.zeros(2)})
        writer.close()
        assert not os.path.exists(stale) and os.path.exists(mine)  # a live process's file stays
    finally:
        for p in (stale, mine):
            if os.path.exists(p):
                os.unlink(p)


def test_a_full_shared_folder_falls_back_to_the_wire(monkeypatch):
    def full(fd, offset, size):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    before = set(os.listdir(sw.SHM_DIR))
    server = ParamServer()
    client = ParamClient(server.address, interval_s=0.0)
    w = _weights(np.random.default_rng(6))
    server.publish(0, w)
    _, arrays = _pull(server, client)
    _equal(arrays, w)
    assert server._file is None and not server.shared and client._reader is None
    assert set(os.listdir(sw.SHM_DIR)) == before  # nothing left behind
    server.close()
    client.close()


def test_live_tensors_are_published_as_they_were_and_both_kinds_of_client_get_them():
    """The trainer publishes its live parameters (torch tensors): they go straight into the file's
    slot once a same-host client has asked, and a client over the wire then gets a copy of that
    slot. Changing the parameters after publish changes neither (negative control: the live
    tensors themselves do change)."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.BatchNorm1d(5))
    server = ParamServer()
    near = ParamClient(server.address, interval_s=0.0)
    far = ParamClient(server.address, interval_s=0.0)
    far.host = "elsewhere/boot"
    try:
        for version in range(3):
            with torch.no_grad():
                for p in model.parameters():
                    p.normal_()
            expected = {k: v.detach().clone().numpy() for k, v in model.state_dict().items()}
            server.publish(version, model.state_dict())
            with torch.no_grad():  # the next optimizer step, before any client has read
                for p in model.parameters():
                    p.add_(1.0)
            assert not np.array_equal(model.state_dict()["0.weight"].numpy(), expected["0.weight"])
            for client in (near, far):
                got_version, arrays = _pull(server, client)
                assert got_version == version
                _equal(arrays, expected)
            assert server._file is not None and near._reader is not None and far._reader is None
        assert server._arrays is not None  # the wire's copy of the slot, made when far asked
    finally:
        near.close()
        far.close()
        server.close()


def test_loading_weights_writes_the_parameters_in_place():
    """Generation workers' CUDA graphs keep reading the same parameter storage, so a load must
    copy into it; a read-only frame off the wire loads too."""
    import torch

    from srl.policies.weights import load_numpy_weights

    model = torch.nn.Linear(4, 3)
    storage = model.weight.data_ptr()
    arrays = {k: np.random.default_rng(5).standard_normal(tuple(v.shape)).astype(np.float32)
              for k, v in model.state_dict().items()}
    for a in arrays.values():
        a.setflags(write=False)
    load_numpy_weights(model, arrays)
    assert model.weight.data_ptr() == storage
    np.testing.assert_array_equal(model.weight.detach().numpy(), arrays["weight"])
    with pytest.raises(ValueError, match="weights 'bias': shape"):
        load_numpy_weights(model, {**arrays, "bias": np.zeros(4, np.float32)})


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_float32_weights_load_into_a_bfloat16_copy(device):
    """A generation worker samples from a bfloat16 copy: float32 weights off the stream load into
    it rounded to bfloat16, in place (on CUDA the cast runs on the device)."""
    import torch

    from srl.policies.weights import load_numpy_weights

    model = torch.nn.Linear(8, 5).to(device, torch.bfloat16)
    storage = model.weight.data_ptr()
    arrays = {k: np.random.default_rng(6).standard_normal(tuple(v.shape)).astype(np.float32)
              for k, v in model.state_dict().items()}
    load_numpy_weights(model, arrays)
    assert model.weight.data_ptr() == storage and model.weight.dtype == torch.bfloat16
    for k, v in model.state_dict().items():
        expected = torch.from_numpy(arrays[k]).to(torch.bfloat16)
        assert torch.equal(v.cpu(), expected), k
        assert not torch.equal(v.cpu().float(), torch.from_numpy(arrays[k])), k  # rounded, not bit-equal


def test_load_hands_over_the_slot_and_redoes_a_torn_load():
    """``reader.load`` gives the loader the slot's arrays without a copy. When the writer rewrites
    that slot during the load, the load is redone from the newest slot and returns its version;
    a writer that laps every try gives None."""
    rng = np.random.default_rng(8)
    w = [_weights(rng, scale=i + 1) for i in range(12)]
    writer = sw.SharedWeightsWriter(w[0])
    reader = sw.SharedWeightsReader(writer.path, writer.manifest)
    try:
        writer.write(0, w[0])
        writer.write(1, w[1])
        got = {}
        assert reader.load(0, 0, lambda arrays: got.update({k: v.copy() for k, v in arrays.items()})) == 0
        _equal(got, w[0])

        def lapped_once(arrays):  # the trainer publishes 2 and 3 while this load copies slot 0
            got.update({k: v.copy() for k, v in arrays.items()})
            if not lapped:
                lapped.append(1)
                writer.write(2, w[2])
                writer.write(3, w[3])

        lapped: list = []
        assert reader.load(0, 0, lapped_once) == 3  # redone from the newest slot
        _equal(got, w[3])
        assert lapped  # negative control: the first try was torn (slot 0 now holds version 2)

        version = [3]

        def lapped_always(arrays):
            version[0] += 2
            writer.write(version[0], w[version[0] % 12])

        assert reader.load(1, 3, lapped_always) is None
    finally:
        reader.close()
        writer.close()


def test_clients_load_into_a_module_from_the_file_and_over_the_wire():
    import torch

    from functools import partial

    from srl.policies.weights import load_numpy_weights

    torch.manual_seed(1)
    src, dst_near, dst_far = (torch.nn.Linear(6, 4) for _ in range(3))
    server = ParamServer()
    near = ParamClient(server.address, interval_s=0.0)
    far = ParamClient(server.address, interval_s=0.0, shared=False)
    try:
        for version in range(3):
            with torch.no_grad():
                src.weight.normal_()
            server.publish(version, src.state_dict())
            for client, dst in ((near, dst_near), (far, dst_far)):
                deadline = time.monotonic() + 5.0
                got = None
                while got is None and time.monotonic() < deadline:
                    server.serve()
                    got = client.poll(timeout_ms=10, load=partial(load_numpy_weights, dst))
                assert got == (version, None)
                torch.testing.assert_close(dst.weight, src.weight, rtol=0, atol=0)
        assert near._reader is not None and far._reader is None
    finally:
        near.close()
        far.close()
        server.close()
