"""Actor worker: steps a ring of vectorized env groups and streams trajectories.

With ``inline_policy`` the policy runs in this process (tiny CPU policies: no hop). Otherwise
each env group posts its observations to the policy workers and, while it waits for actions,
the next group steps: that is the env ring.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from srl.envs.frames import DELTA, FULL, FULL_ROWS, TrajectoryFrames, stack_delta, stacked_pixels, unslid_rows
from srl.envs.vector import EpisodeTracker, SpaceInfo, make_vector_env, step_signals
from srl import registry
from srl.plan import INFERENCE, PARAMS, SAMPLES, build_policy, env_group_key
from srl.policies.state import state_spec, state_to_numpy
from srl.policies.weights import load_numpy_weights
from srl.streams.inference import InferenceClient
from srl.streams.params import ParamClient
from srl.streams.sample import SampleProducer
from srl.system.topology import Routing
from srl.system.worker import PollResult
from srl.workers.base import RLWorker
from srl.workers.reports import ActorReport, to_meta

REQUEST_TIMEOUT_S = 5.0


class EnvGroup:
    """One vector env plus the trajectory it is filling."""

    def __init__(self, env, info: SpaceInfo, rollout_len: int, first_env_id: int = 0, server: int = 0,
                 state_spec: dict | None = None):
        self.env, self.info, self.T = env, info, rollout_len
        self.state_spec = state_spec or {}
        """A memory policy's per-env state (name -> (shape, dtype)); trajectories carry its value
        before their first step, and ``first`` flags, so the learner can replay the sequence."""
        self.B = env.num_envs
        self.env_ids = np.arange(first_env_id, first_env_id + self.B, dtype=np.int64)
        """Run-wide ids of this group's envs (requests carry them: per-env state lives by id)."""
        self.server = server
        """The policy worker this group asks (sticky routing)."""
        self.obs, _ = env.reset()
        self.prev_done = np.zeros(self.B, bool)
        self.first = np.ones(self.B, bool)
        """Whether each env's current observation starts an episode."""
        self.state = None
        """Inline memory policies: the envs' state (a dict of tensors)."""
        self.tracker = EpisodeTracker(self.B)
        self.pending: int | None = None  # request id awaiting actions
        self.sent: np.ndarray | None = None
        """The stacks of the last request (frame deltas: the next one sends what changed)."""
        self._split = callable(getattr(env, "send", None)) and callable(getattr(env, "recv", None))
        """The env steps in its own threads between ``send`` and ``recv`` (ale-py)."""
        self._sent: tuple = ()
        self.posted_at = 0.0
        self.stacked = stacked_pixels(info.obs_shape, info.obs_dtype) and not self.state_spec
        """Stacks of frames: trajectories carry each step's newest frame (srl.envs.frames)."""
        self.unslid: np.ndarray | None = None
        """Envs whose current stack is not the previous one slid by a frame (stacked only)."""
        self._new_buffers()

    def _new_buffers(self) -> None:
        T, B, info = self.T, self.B, self.info
        act_shape, act_dtype = ((), np.int64) if info.discrete else ((info.n_actions,), np.float32)
        self.frames = TrajectoryFrames(T, B, info.obs_shape) if self.stacked else None
        self.buf = {
            "action": np.empty((T, B, *act_shape), act_dtype),
            "logp": np.empty((T, B), np.float32),
            "reward": np.empty((T, B), np.float32),
            "terminated": np.empty((T, B), bool),
            "truncated": np.empty((T, B), bool),
            "valid": np.empty((T, B), bool),
        }
        if not self.stacked:
            self.buf["obs"] = np.empty((T + 1, B, *info.obs_shape), info.obs_dtype)
        if self.state_spec:
            self.buf["first"] = np.empty((T + 1, B), bool)
            for name, (shape, dtype) in self.state_spec.items():
                self.buf[f"state/{name}"] = np.zeros((1, B, *shape), dtype)
        self.t = 0
        self.min_version = None

    def step(self, action: np.ndarray, logp: np.ndarray, version: int, state0: dict | None = None):
        """Apply actions; returns (finished returns, lengths, valid steps, full trajectory or None).
        ``state0``: a memory policy's ``state/*`` arrays before this step (first step only)."""
        self.send(action, logp, version, state0)
        return self.recv()

    def send(self, action: np.ndarray, logp: np.ndarray, version: int, state0: dict | None = None) -> None:
        """The first half of :meth:`step`: an env that steps in threads of its own (ale-py's
        ``send`` / ``recv``) starts now, and the caller's work until :meth:`recv` overlaps it."""
        env_action = action
        if not self.info.discrete:
            env_action = np.clip(action, self.info.action_low, self.info.action_high)
        self._sent = (env_action, version)
        if self._split:
            self.env.send(env_action)
        b, t = self.buf, self.t
        self._record_obs(t, self.obs)
        if self.state_spec:
            b["first"][t] = self.first
            for name, value in (state0 or {}).items():
                b[name][...] = value
        b["action"][t] = action
        b["logp"][t] = logp

    def recv(self):
        """The second half of :meth:`step` (its return value)."""
        (env_action, version), b, t = self._sent, self.buf, self.t
        obs, reward, terminated, truncated, info = self.env.recv() if self._split else self.env.step(env_action)
        valid = ~self.prev_done  # the step after an episode's end only resets (gymnasium next-step autoreset)
        done = terminated | truncated
        b["reward"][t], b["terminated"][t], b["truncated"][t], b["valid"][t] = reward, terminated, truncated, valid
        score, resets = step_signals(reward, done, info)  # Atari: raw scores, and a lost life is no reset
        returns, lengths = self.tracker.update(score, resets & valid, valid)
        self.prev_done = resets
        self.first = ~valid  # the step after a done returned a reset observation
        if self.stacked:
            self.unslid = unslid_rows(self.obs, obs)
        self.obs = obs
        self.min_version = version if self.min_version is None else min(self.min_version, version)
        self.t += 1
        traj = None
        if self.t == self.T:
            self._record_obs(self.T, obs)
            if self.state_spec:
                b["first"][self.T] = self.first
            traj = ({**b, **self.frames.arrays()} if self.stacked else b, self.min_version)
            self._new_buffers()
        return returns, lengths, int(valid.sum()), traj

    def _record_obs(self, t: int, obs: np.ndarray) -> None:
        if self.stacked:
            self.frames.put(t, obs, self.unslid)
        else:
            self.buf["obs"][t] = obs


class ActorWorker(RLWorker):
    kind = "actor"

    def _configure(self) -> None:
        cfg, a = self.cfg, self.cfg.workers.actors
        seed = cfg.seed * 10_007 + self.spec.index * 101 + self.spec.incarnation * 7
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        per_group = a.envs_per_actor // a.ring if not a.inline_policy else a.envs_per_actor
        n_groups = a.ring if not a.inline_policy else 1
        inference = None if a.inline_policy else self.plan.stream(INFERENCE)
        memory = getattr(registry.resolve("policy", cfg.policy.type), "recurrent", False)
        self.policy = build_policy(self.info, cfg.policy) if a.inline_policy or memory else None
        spec = state_spec(self.policy) if memory else {}
        self.groups = []
        for g in range(n_groups):
            server = 0
            if inference is not None and inference.routing == Routing.STICKY:
                server = inference.servers.index(inference.server_of(env_group_key(self.spec.name, g)))
            first = self.spec.index * a.envs_per_actor + g * per_group
            env = make_vector_env(cfg.env, per_group, seed + 7919 * g)
            self.groups.append(EnvGroup(env, self.info, a.rollout_len, first, server, spec))
            if spec and a.inline_policy:
                self.groups[-1].state = self.policy.initial_state(per_group)
        trainer = self.plan.stream(SAMPLES).server_of(self.spec.name)
        self.samples = self.endpoint(SampleProducer([self.address(SAMPLES, trainer)], self.key))
        params_server = self.plan.stream(PARAMS).server_of(self.spec.name)
        self.seq = 0
        self.episodes: tuple[list, list] = ([], [])
        self.env_steps = 0
        self.env_wait_s = self.reply_wait_s = 0.0
        """Where the actor's time goes (reported, then reset): stepping envs, waiting for actions."""
        self.version = -1
        # Credit-based flow control: the trainer reports how many trajectories it has taken from
        # this actor; the actor keeps at most its share of one batch plus `max_ahead` beyond that.
        # This bounds the policy lag without producing trajectories that would only go stale.
        trajs_per_batch = max(1, -(-cfg.algorithm.batch_size // (per_group * a.rollout_len)))
        self.allowance = -(-trajs_per_batch // a.count) + a.max_ahead
        self.credit_epoch = -1
        self.pushed = 0
        self.unpushed: list[tuple[dict, int]] = []
        """Trajectories completed by a reply, pushed once that group's next request is out."""
        if a.inline_policy:
            self.params = self.endpoint(ParamClient(self.address(PARAMS, params_server), self.key, interval_s=0.0,
                                                    shared=self.cfg.network.shared_weights))
            self._wait_weights(-1)
        else:
            addrs = [self.address(INFERENCE, p) for p in inference.servers]
            self.client = InferenceClient(addrs, self.key, sticky=inference.routing == Routing.STICKY)
            self._endpoints.extend(self.client.endpoints)
            self.params = self.endpoint(ParamClient(self.address(PARAMS, params_server), self.key,
                                                    interval_s=0.005, weights=False))
            self.next_req = 0
            self.by_req: dict[int, EnvGroup] = {}
            self.deltas = (inference.routing == Routing.STICKY and not memory
                           and stacked_pixels(self.info.obs_shape, self.info.obs_dtype))
            """Send only each env's newest frame where the stack slid (srl.envs.frames)."""

    def _wait_weights(self, than: int) -> bool:
        got = self.params.wait_newer(than, timeout_s=600.0, should_stop=self.should_stop)
        if got is None:
            return False
        self._load(got)
        return True

    def _load(self, got) -> None:
        if got[1]:
            load_numpy_weights(self.policy, got[1])
        self.version = got[0]

    def _credit(self) -> int:
        """Trajectories this actor may still push before the trainer takes more of them."""
        if self.credit_epoch != self.params.epoch:  # first contact, or a restarted trainer
            self.credit_epoch, self.pushed = self.params.epoch, 0
        received = (self.params.status.get("received") or {}).get(f"{self.spec.index}.{self.spec.incarnation}", 0)
        return received + self.allowance - self.pushed - len(self.unpushed)

    def _report(self) -> dict:
        returns, lengths = self.episodes
        self.episodes = ([], [])
        steps, self.env_steps = self.env_steps, 0
        report = ActorReport(steps, returns, lengths, self.version, self.env_wait_s, self.reply_wait_s)
        self.env_wait_s = self.reply_wait_s = 0.0
        return to_meta(report)

    # ------------------------------------------------------------------ stepping
    def _poll(self) -> PollResult:
        if self.cfg.workers.actors.inline_policy:
            return self._poll_inline()
        return self._poll_remote()

    def _poll_inline(self) -> PollResult:
        got = self.params.poll()
        if got is not None:
            self._load(got)
        group = self.groups[0]
        steps = 0
        for _ in range(group.T):
            obs = torch.from_numpy(group.obs)
            if group.state_spec:  # a memory policy: its state lives here, one row per env
                state0 = state_to_numpy(group.state) if group.t == 0 else None
                action, logp, group.state = self.policy.act(obs, torch.from_numpy(group.first), group.state)
                steps += self._advance(group, action.numpy(), logp.numpy(), self.version, state0)
            else:
                action, logp = self.policy.act(obs)
                steps += self._advance(group, action.numpy(), logp.numpy(), self.version)
        return PollResult(samples=steps, batches=1)

    def _poll_remote(self) -> PollResult:
        got = self.params.poll()
        if got is not None:
            self._load(got)  # the trainer's version: flow control, no weights
        now = time.monotonic()
        for group in self.groups:
            if group.pending is None and self.version >= 0 and self._credit() > 0:
                self._post(group, now)
            elif group.pending is not None and now - group.posted_at > REQUEST_TIMEOUT_S:
                self._post(group, now)  # its policy worker died: ask again
        steps = 0
        stepping: list[EnvGroup] = []
        waited = time.perf_counter()
        msg = self.client.poll(timeout_ms=50)
        self.reply_wait_s += time.perf_counter() - waited
        while msg is not None:
            req, version = msg.meta.get("req"), msg.meta.get("version")
            group = self.by_req.get(req) if isinstance(req, int) else None
            if group is not None and group.pending == req:
                if not isinstance(version, int) or not self._reply_fits(group, msg.arrays):
                    self.client.endpoints[group.server].drop("reply that does not fit its request")
                else:
                    del self.by_req[req]
                    group.pending = None
                    state0 = {k: v for k, v in msg.arrays.items() if k.startswith("state/")} or None
                    group.send(msg.arrays["action"], msg.arrays["logp"], version, state0)
                    stepping.append(group)  # its envs step while the other replies are read
            msg = self.client.poll()
        for group in stepping:
            steps += self._complete(group, defer_push=True)
            if self._credit() > 0:
                self._post(group, time.monotonic())
            while self.unpushed:  # encoding and sending it overlaps the wait for the actions
                self._push(*self.unpushed.pop(0))
        return PollResult(samples=steps, batches=1 if steps else 0)

    def _reply_fits(self, group: EnvGroup, arrays: dict) -> bool:
        action, logp = arrays.get("action"), arrays.get("logp")
        act_shape = (group.B,) if self.info.discrete else (group.B, self.info.n_actions)
        if group.t == 0:  # a memory policy's state before the trajectory's first step
            for name, (shape, dtype) in group.state_spec.items():
                state = arrays.get(f"state/{name}")
                if state is None or state.shape != (1, group.B, *shape) or state.dtype != np.dtype(dtype):
                    return False
        return (action is not None and logp is not None and action.shape == act_shape and logp.shape == (group.B,)
                and action.dtype.kind == ("i" if self.info.discrete else "f") and logp.dtype.kind == "f")

    def _post(self, group: EnvGroup, now: float) -> None:
        resend = group.pending is not None  # asked again: its policy worker may not hold the last stacks
        if resend:
            self.by_req.pop(group.pending, None)
        req = self.next_req
        self.next_req += 1
        group.pending, group.posted_at = req, now
        self.by_req[req] = group
        if group.state_spec:
            self.client.post(group.obs, req, group.env_ids, group.server, {"first": group.first},
                             {"want_state": group.t == 0})
        elif self.deltas:
            newest, rows, full = stack_delta(None if resend else group.sent, group.obs, group.unslid)
            group.sent = group.obs
            self.client.post(newest, req, group.env_ids, group.server, {FULL_ROWS: rows, FULL: full}, {DELTA: True})
        else:
            self.client.post(group.obs, req, group.env_ids, group.server)

    def _advance(self, group: EnvGroup, action, logp, version: int, state0: dict | None = None) -> int:
        group.send(action, logp, version, state0)
        return self._complete(group)

    def _complete(self, group: EnvGroup, defer_push: bool = False) -> int:
        """Finish a group's env step: episode statistics, and its trajectory pushed (or kept for
        the caller to push once the group's next request is out) when the step completed it."""
        waited = time.perf_counter()
        returns, lengths, valid, traj = group.recv()
        self.env_wait_s += time.perf_counter() - waited
        self.episodes[0].extend(returns)
        self.episodes[1].extend(lengths)
        self.env_steps += valid
        if traj is not None:
            if defer_push:
                self.unpushed.append(traj)
            else:
                self._push(*traj)
        return valid

    def _push(self, arrays: dict, version: int) -> None:
        meta = {"version": int(version), "actor": self.spec.index, "seq": self.seq, "incarnation": self.spec.incarnation}
        self.seq += 1
        while not self.samples.push(arrays, meta, timeout_ms=100):
            if self.should_stop():  # back-pressure from the trainer; stay responsive to stop
                return
        self.pushed += 1
        if not self.cfg.workers.actors.inline_policy:
            return  # _poll_remote stops posting requests while the credit is spent
        if self.cfg.workers.sync:
            self._wait_weights(version)
            return
        interval, self.params.interval_s = self.params.interval_s, 0.002
        try:
            while self._credit() <= 0 and not self.should_stop():
                got = self.params.poll(timeout_ms=20)
                if got is not None:
                    self._load(got)
        finally:
            self.params.interval_s = interval
