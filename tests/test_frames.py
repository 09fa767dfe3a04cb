"""Frame-stack deltas on the inference stream (srl.envs.frames): the policy worker's stacks equal,
bit for bit, the stacks the actor holds, across resets, first requests and requests asked again;
malformed delta requests are refused."""
import numpy as np
import pytest
import torch

from srl.envs.frames import (DELTA, FRAMES, FULL, FULL_AT, FULL_ROWS, StackTable, TrajectoryFrames, stack_delta,
                             stacked_pixels, unslid_rows, with_stacks)
from srl.envs.vector import SpaceInfo
from srl.system.wire import Message, WireError
from srl.workers.intake import assemble
from srl.workers.layout import TrajectoryLayout
from srl.workers.policy import PolicyWorker


def _stacks(rng, steps: int, n: int, c: int = 4, hw: int = 6, reset_p: float = 0.1):
    """Per step [n, c, hw, hw] stacks that slide by one random frame, or reset to a random stack
    (sometimes a stack of one repeated frame, as some envs reset)."""
    obs = rng.integers(0, 256, (n, c, hw, hw), dtype=np.uint8)
    out = [obs]
    for _ in range(steps):
        obs = np.concatenate([obs[:, 1:], rng.integers(0, 256, (n, 1, hw, hw), dtype=np.uint8)], axis=1)
        for i in np.flatnonzero(rng.random(n) < reset_p):
            frame = rng.integers(0, 256, (hw, hw), dtype=np.uint8)
            obs[i] = frame if rng.random() < 0.5 else rng.integers(0, 256, (c, hw, hw), dtype=np.uint8)
        out.append(obs.copy())
    return out


def _replay(seq, ids, skip_apply_at: int | None = None, resend_at: int | None = None):
    table = StackTable(int(ids.max()) + 1, seq[0].shape[1:], "cpu")
    last, got = None, []
    for t, obs in enumerate(seq):
        newest, rows, full = stack_delta(None if t == resend_at else last, obs)
        assert newest.shape == (len(obs), 1, *obs.shape[2:]) and full.shape == (len(rows), *obs.shape[1:])
        last = obs
        if t == skip_apply_at:  # a request the worker never saw (the negative control)
            got.append(None)
            continue
        got.append(table.apply(torch.from_numpy(ids), torch.from_numpy(newest), torch.from_numpy(rows),
                               torch.from_numpy(full)).numpy())
    return got


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_deltas_rebuild_every_stack_exactly(seed):
    rng = np.random.default_rng(seed)
    seq = _stacks(rng, 60, 5)
    ids = rng.permutation(12)[:5].astype(np.int64)  # run-wide ids, not 0..n-1
    got = _replay(seq, ids)
    assert all(np.array_equal(g, s) for g, s in zip(got, seq))
    sent = sum(len(stack_delta(a, b)[1]) for a, b in zip(seq[:-1], seq[1:]))
    assert sent < 0.3 * 5 * 60  # most steps send one frame, not four


def test_a_lost_request_breaks_the_stacks_unless_asked_again_whole():
    rng = np.random.default_rng(5)
    seq = _stacks(rng, 30, 4, reset_p=0.0)
    ids = np.arange(4, dtype=np.int64)
    broken = _replay(seq, ids, skip_apply_at=10)
    assert not np.array_equal(broken[11], seq[11])  # the negative control: the check can fail
    healed = _replay(seq, ids, skip_apply_at=10, resend_at=11)  # the actor asks again, whole stacks
    assert all(np.array_equal(g, s) for g, s in zip(healed[11:], seq[11:]))


def test_real_atari_stacks_through_resets():
    pytest.importorskip("ale_py")
    from srl.config import EnvConfig
    from srl.envs.vector import make_vector_env

    env = make_vector_env(EnvConfig(id="ALE/Breakout-v5", kwargs={"repeat_action_probability": 0.0}), 3, seed=1)
    obs, _ = env.reset(seed=1)
    table = StackTable(3, obs.shape[1:], "cpu")
    ids = torch.arange(3)
    rng = np.random.default_rng(0)
    last, resets, whole = None, 0, 0
    for _ in range(400):
        newest, rows, full = stack_delta(last, obs)
        whole += len(rows)
        rebuilt = table.apply(ids, torch.from_numpy(newest), torch.from_numpy(rows), torch.from_numpy(full))
        assert np.array_equal(rebuilt.numpy(), obs)
        last = obs
        obs, _, terminated, truncated, _ = env.step(rng.integers(0, env.single_action_space.n, 3))
        resets += int((terminated | truncated).sum())
    env.close()
    assert resets >= 1 and whole < 3 * 400 // 4


def test_only_stacked_uint8_pixels_travel_as_deltas():
    assert stacked_pixels((4, 84, 84), "uint8")
    assert not stacked_pixels((1, 84, 84), "uint8") and not stacked_pixels((4, 84, 84), "float32")
    assert not stacked_pixels((84, 84), "uint8") and not stacked_pixels((4,), "float32")


def _worker() -> PolicyWorker:
    w = object.__new__(PolicyWorker)  # only what _check reads
    w.info = SpaceInfo((4, 6, 6), True, 3, obs_dtype="uint8")
    w.stacks = StackTable(8, (4, 6, 6), "cpu")
    w.memory, w.max_env_id = None, 8
    w.cfg = type("C", (), {"workers": type("W", (), {"policies": type("P", (), {"max_batch": 64})})})
    return w


def _request(n=3, rows=(1,), newest_shape=None, full_rows=None, ids=True):
    rows = np.asarray(rows, dtype=np.int64)
    arrays = {"obs": np.zeros(newest_shape or (n, 1, 6, 6), np.uint8), FULL_ROWS: rows,
              FULL: np.zeros((len(rows) if full_rows is None else full_rows, 4, 6, 6), np.uint8)}
    if ids:
        arrays["env_ids"] = np.arange(n, dtype=np.int64)
    return Message("obs", {DELTA: True, "req": 0}, arrays)


def test_policy_worker_refuses_malformed_delta_requests():
    w = _worker()
    w._check(_request())  # well formed
    for bad in (_request(rows=(3,)), _request(rows=(1, 1)), _request(rows=(-1,)), _request(full_rows=2),
                _request(newest_shape=(3, 4, 6, 6)), _request(ids=False)):
        with pytest.raises(WireError):
            w._check(bad)
    w.stacks = None  # a worker that keeps no stacks cannot serve a delta
    with pytest.raises(WireError):
        w._check(_request())


def _trajectory_message(seq, T: int, actor: int = 0) -> Message:
    """One trajectory of ``seq[:T + 1]`` recorded as TrajectoryFrames, with the other arrays a
    trainer expects (random)."""
    n = len(seq[0])
    rec = TrajectoryFrames(T, n, seq[0].shape[1:])
    for t in range(T + 1):
        rec.put(t, seq[t], unslid_rows(seq[t - 1], seq[t]) if t else None)
    z = np.zeros((T, n))
    arrays = {**rec.arrays(), "action": z.astype(np.int64), "logp": z.astype(np.float32),
              "reward": z.astype(np.float32), "terminated": z.astype(bool), "truncated": z.astype(bool),
              "valid": np.ones((T, n), bool)}
    return Message("sample", {"version": 0, "actor": actor, "seq": 0, "incarnation": 0}, arrays)


@pytest.mark.parametrize("seed", [0, 1])
def test_trajectories_of_frames_rebuild_every_stack_exactly_after_assembly(seed):
    rng = np.random.default_rng(seed)
    T, sizes = 12, (3, 5, 3)
    seqs = [_stacks(rng, T, n, reset_p=0.15) for n in sizes]
    layout = TrajectoryLayout(T, (3, 5), SpaceInfo((4, 6, 6), True, 3, obs_dtype="uint8"), 2)
    msgs = [_trajectory_message(s, T, actor=i % 2) for i, s in enumerate(seqs)]
    for m in msgs:
        layout.check(m)
    batch = assemble(msgs, pin=False)
    assert len(batch[FULL_AT]) > 0  # resets happened: whole stacks travelled
    got = with_stacks(batch, 4)["obs"].numpy()
    want = np.concatenate([np.stack(s[:T + 1]) for s in seqs], axis=1)  # (T + 1, B, C, H, W)
    assert got.shape == want.shape and np.array_equal(got, want)
    frames_bytes = sum(m.arrays[FRAMES].nbytes + m.arrays[FULL].nbytes for m in msgs)
    assert frames_bytes < 0.5 * want.nbytes
    batch[FULL_AT] = batch[FULL_AT][1:]  # the negative control: one whole stack lost
    batch[FULL] = batch[FULL][1:]
    assert not np.array_equal(with_stacks(batch, 4)["obs"].numpy(), want)


def test_malformed_frame_trajectories_are_refused():
    rng = np.random.default_rng(3)
    layout = TrajectoryLayout(8, (4,), SpaceInfo((4, 6, 6), True, 3, obs_dtype="uint8"), 1)
    good = _trajectory_message(_stacks(rng, 8, 4, reset_p=0.3), 8)
    layout.check(good)
    for key, bad in [(FULL_AT, np.array([[0, 1]], np.int64)), (FULL_AT, np.array([[9, 1]], np.int64)),
                     (FULL_AT, np.array([[1, 4]], np.int64)), (FULL_AT, np.array([[1, 1]], np.int32)),
                     (FRAMES, np.zeros((11, 4, 6, 6), np.uint8))]:
        arrays = dict(good.arrays, **{key: bad})
        if key == FULL_AT:
            arrays[FULL] = np.zeros((len(bad), 4, 6, 6), np.uint8)
        with pytest.raises(WireError, match=key):
            layout.check(Message("sample", good.meta, arrays))
    with pytest.raises(WireError, match=FULL):
        layout.check(Message("sample", good.meta, dict(good.arrays, **{FULL: np.zeros((0, 4, 6, 6), np.uint8)})))


class _StackProbe(torch.nn.Module):
    """A 'policy' whose outputs are functions of the stacks it is given (no sampling)."""

    def act(self, stacks):
        return stacks.float().mean((1, 2, 3)), stacks[:, 0].float().sum((1, 2)) - stacks[:, -1].float().sum((1, 2))


@pytest.mark.parametrize("graphs", [False, pytest.param(True, marks=pytest.mark.gpu)])
def test_the_graphed_stack_step_equals_the_kept_stacks_and_the_eager_step(graphs):
    from srl.policies.graphed import GraphedStackStep

    device = "cuda" if graphs else "cpu"
    if graphs and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    rng = np.random.default_rng(7)
    n_envs, shape = 10, (4, 6, 6)
    eager = StackTable(n_envs + 1, shape, device)
    kept = StackTable(n_envs + 1, shape, device)
    step = GraphedStackStep(_StackProbe(), kept.stacks, max_batch=16, device=device, graphs=graphs)
    seqs = _stacks(rng, 25, n_envs, c=4, hw=6, reset_p=0.1)
    last = [None] * n_envs
    for t, obs in enumerate(seqs):
        ids = np.sort(rng.choice(n_envs, rng.integers(1, n_envs + 1), replace=False)).astype(np.int64)
        prev = None if any(last[i] is None for i in ids) else np.stack([last[i] for i in ids])
        newest, rows, full = stack_delta(prev, obs[ids])
        args = [torch.from_numpy(a).to(device) for a in (ids, newest, rows, full)]
        want = _StackProbe().act(eager.apply(args[0], args[1], args[2], args[3]))
        got = step.step(*args)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
        assert torch.equal(kept.stacks[:n_envs], eager.stacks[:n_envs])
        assert torch.equal(kept.stacks[ids].cpu(), torch.from_numpy(obs[ids]))
        for i in ids:
            last[i] = obs[i]
    assert not step.is_full.any()  # the flags of whole stacks are cleared after each step
