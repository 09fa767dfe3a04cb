"""A seeded fuzzer against a live run: thousands of mutated copies of real messages, signed with
the run's key (a compromised peer), sent to every stream. No worker dies, learning goes on, and
every message a receiver cannot use is counted as a drop."""
import numpy as np
import pytest
import zmq

from srl.envs.vector import SpaceInfo
from srl.system import wire
from srl.workers.layout import TrajectoryLayout
from test_faults import LiveRun, _sample, _wait
from test_wire_hardening import _mutate

N = 1200


def _signed(frames, key):
    return list(frames) + [wire._tag(key, frames)]


def _refused(frames, key, check=None) -> bool:
    try:
        msg = wire.decode(frames, key)
        if check is not None:
            check(msg)
        return False
    except wire.WireError:
        return True


def _cases(base, seed):
    rng = np.random.default_rng(seed)
    return [_mutate(rng, base) for _ in range(N)]


@pytest.mark.timeout(600)
def test_fuzzed_messages_to_every_stream_of_a_live_run(tmp_path):
    with LiveRun(tmp_path) as run:
        key, cfg = run.ctl.key, run.ctl.payload.config
        layout = TrajectoryLayout(cfg.workers.actors.rollout_len, (4,), SpaceInfo((4,), True, 2), 2)
        arrays, meta = _sample(version=run.ctl.counters["version"])
        samples = _cases([bytes(f) for f in wire.encode("sample", arrays, meta)], seed=1)
        params = _cases([bytes(f) for f in wire.encode("have", None, {"have": 3, "epoch": 0, "weights": False})], 2)
        request = wire.encode("obs", {"obs": np.zeros((4, 4), np.float32), "env_ids": np.arange(4)}, {"req": 5})
        requests = _cases([bytes(f) for f in request], seed=3)
        stats = _cases([bytes(f) for f in wire.encode("stats", None, {
            "worker": "actor/1", "pid": 1, "incarnation": 0, "event": "heartbeat", "samples": 1, "batches": 1,
            "dropped_frames": 0, "error": "", "report": {"env_steps": 64, "episode_returns": [], "episode_lengths": [],
                                                         "version": 1}})], seed=4)
        trainer_before, policy_before = run.dropped("trainer/0"), run.dropped("policy/0")
        stats_before = run.ctl.stats.dropped + run.ctl.rejected_reports
        policy_check = _policy_check(run)
        bad_trainer = sum(_refused(f, None, layout.check) for f in samples) + sum(_refused(f, None) for f in params)
        bad_policy = sum(_refused(f, None, policy_check) for f in requests)
        bad_stats = sum(_refused(f, None) for f in stats)
        assert bad_trainer > N // 2 and bad_policy > N // 2  # the fuzzer does produce hostile messages
        sockets = {name: run.socket(kind, run.address(addr)) for name, kind, addr in (
            ("samples", zmq.PUSH, "trainer/0/samples"), ("params", zmq.DEALER, "trainer/0/params"),
            ("requests", zmq.DEALER, "policy/0/inference"))}
        sockets["stats"] = run.socket(zmq.PUSH, run.ctl.stats_address)
        for name, cases in (("samples", samples), ("params", params), ("requests", requests), ("stats", stats)):
            for frames in cases:
                sockets[name].send_multipart(_signed(frames, key))
        _wait(lambda: run.dropped("trainer/0") - trainer_before >= bad_trainer, timeout_s=120)
        _wait(lambda: run.dropped("policy/0") - policy_before >= bad_policy, timeout_s=120)
        _wait(lambda: run.ctl.stats.dropped + run.ctl.rejected_reports - stats_before >= bad_stats, timeout_s=60)
        # each refusal counted (a valid mutated request may still be refused by a check the
        # prediction does not replay, so the policy's count may be a little higher)
        assert run.dropped("trainer/0") - trainer_before == bad_trainer
        assert bad_policy <= run.dropped("policy/0") - policy_before <= bad_policy + N // 100
        run.learns_on()
        run.assert_no_worker_died()


def _policy_check(run):
    """The policy worker's own request check, as a function of a message."""
    from srl.workers.policy import PolicyWorker

    worker = PolicyWorker.__new__(PolicyWorker)
    worker.info = SpaceInfo((4,), True, 2)
    worker.cfg = run.ctl.payload.config
    worker.max_env_id = 16
    worker.memory = None  # a feed-forward policy: no per-env state to check requests against
    worker.stacks = None  # and no frame stacks (vector observations)
    return worker._check
