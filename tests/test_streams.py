import time

import numpy as np
import zmq

from srl.streams.base import context
from srl.streams.inference import InferenceClient, InferenceServer
from srl.streams.params import ParamClient, ParamServer
from srl.streams.sample import SampleConsumer, SampleProducer


def _wait(fn, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = fn()
        if out:
            return out
        time.sleep(0.005)
    raise AssertionError("timed out")


def test_sockets_bind_to_loopback_by_default():
    server = InferenceServer()
    assert server.address.startswith("tcp://127.0.0.1:")
    endpoint = server.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
    assert endpoint.startswith("tcp://127.0.0.1:")
    server.close()


def test_policy_server_batches_every_pending_request_into_one_pass():
    server = InferenceServer()
    clients = [InferenceClient([server.address]) for _ in range(4)]
    rng = np.random.default_rng(0)
    sent = {}
    for i, c in enumerate(clients):
        obs = rng.standard_normal((3 + i, 4)).astype(np.float32)
        sent[i] = obs
        c.post(obs, req=100 + i)
    time.sleep(0.2)  # all four requests are waiting before the server looks
    batch = server.pending(max_obs=1000, timeout_ms=100)
    assert len(batch) == 4  # one forward pass would serve all of them
    for req in batch:
        # reply with the row sums so each client can check it got its own answer
        server.reply(req, {"action": req.obs.sum(1)}, {"version": 3})
    for i, c in enumerate(clients):
        msg = _wait(lambda: c.poll(timeout_ms=10))
        assert msg.meta["req"] == 100 + i and msg.meta["version"] == 3
        np.testing.assert_allclose(msg.arrays["action"], sent[i].sum(1), rtol=1e-6)
    for ep in [server, *clients]:
        ep.close()


def test_server_respects_max_obs_and_keeps_the_rest_for_next_pass():
    server = InferenceServer()
    client = InferenceClient([server.address])
    for r in range(3):
        client.post(np.zeros((10, 2), np.float32), req=r)
    time.sleep(0.2)
    first = server.pending(max_obs=15, timeout_ms=100)
    second = server.pending(max_obs=100, timeout_ms=100)
    assert len(first) == 2 and len(second) == 1
    server.close()
    client.close()


def test_malformed_requests_are_counted_and_dropped():
    server = InferenceServer()
    raw = context().socket(zmq.DEALER)
    raw.connect(server.address)
    raw.send_multipart([b"garbage"])
    client = InferenceClient([server.address])
    client.post(np.ones((2, 2), np.float32), req=1)
    batch = _wait(lambda: server.pending(max_obs=100, timeout_ms=50))
    assert [r.msg.meta["req"] for r in batch] == [1]
    assert server.dropped == 1
    raw.close(linger=0)
    server.close()
    client.close()


def test_bad_hmac_frames_are_dropped_and_counted():
    key = b"s" * 32
    consumer = SampleConsumer(key=key)
    wrong = SampleProducer([consumer.address], key=b"x" * 32)
    right = SampleProducer([consumer.address], key=key)
    wrong.push({"a": np.ones(3)}, {"n": 0})
    time.sleep(0.1)
    right.push({"a": np.ones(3)}, {"n": 1})
    msg = _wait(lambda: consumer.poll(timeout_ms=20))
    assert msg.meta["n"] == 1 and consumer.dropped == 1
    for ep in (consumer, wrong, right):
        ep.close()


def test_sample_stream_carries_trajectories_from_many_actors():
    consumer = SampleConsumer()
    producers = [SampleProducer([consumer.address]) for _ in range(3)]
    for i, p in enumerate(producers):
        assert p.push({"reward": np.full((4, 2), i, np.float32)}, {"actor": i, "version": 5})
    got = [_wait(lambda: consumer.poll(timeout_ms=20)) for _ in range(3)]
    assert sorted(m.meta["actor"] for m in got) == [0, 1, 2]
    for m in got:
        assert (m.arrays["reward"] == m.meta["actor"]).all() and m.meta["version"] == 5
    for ep in (consumer, *producers):
        ep.close()


def test_sample_producer_reports_back_pressure_instead_of_blocking():
    consumer = SampleConsumer(hwm=1)
    producer = SampleProducer([consumer.address], hwm=1)
    results = [producer.push({"x": np.zeros(250_000)}, {}, timeout_ms=20) for _ in range(20)]
    assert results[0] and not all(results)  # nobody reads: the queue fills and push says so
    consumer.close()
    producer.close()


def test_params_are_pulled_only_when_newer():
    server = ParamServer()
    client = ParamClient(server.address, interval_s=0.0)
    w0 = {"w": np.arange(4, dtype=np.float32), "count": np.array(3.5), "t": np.arange(6.0).reshape(2, 3).T}
    server.publish(0, w0)

    def pump():
        server.serve()
        return client.poll(timeout_ms=10)

    version, arrays = _wait(pump)
    assert version == 0 and np.array_equal(arrays["w"], w0["w"])
    # shapes travel as they are: a 0-d buffer (a running count) stays 0-d, a transposed view arrives equal
    assert arrays["count"].shape == () and arrays["count"] == 3.5 and np.array_equal(arrays["t"], w0["t"])
    for _ in range(20):  # same version: answered "same", never resent
        assert pump() is None
    server.publish(1, {"w": w0["w"] + 1})
    version, arrays = _wait(pump)
    assert version == 1 and np.array_equal(arrays["w"], w0["w"] + 1)
    server.close()
    client.close()


def test_restarted_trainer_epoch_overrides_higher_old_version():
    server = ParamServer()
    client = ParamClient(server.address, interval_s=0.0)
    server.publish(9, {"w": np.zeros(2)})
    _wait(lambda: (server.serve(), client.poll(timeout_ms=10))[1])
    address = server.address
    server.close()
    restarted = ParamServer(prefer=address, epoch=1)  # same port, lower version from a checkpoint
    assert restarted.address == address
    restarted.publish(5, {"w": np.ones(2)})
    version, arrays = _wait(lambda: (restarted.serve(), client.poll(timeout_ms=10))[1], timeout=10)
    assert version == 5 and client.epoch == 1 and arrays["w"][0] == 1.0
    restarted.close()
    client.close()


def test_publish_rejects_decreasing_versions():
    import pytest

    server = ParamServer()
    server.publish(3, {"w": np.zeros(1)})
    with pytest.raises(ValueError, match="increase"):
        server.publish(3, {"w": np.zeros(1)})
    server.close()
