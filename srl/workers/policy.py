"""Policy worker: answers inference requests from many actors with one forward pass each time.

Requests carry their envs' run-wide ids; with sticky routing the same env always comes here,
so a stateful policy can keep per-env state keyed by those ids.
"""
from __future__ import annotations

import time
from functools import partial

import numpy as np
import torch

from srl.envs.frames import DELTA, FULL, FULL_ROWS, StackTable, stacked_pixels
from srl.plan import INFERENCE, PARAMS, build_policy
from srl.policies.graphed import GraphedMemoryStep, GraphedStackStep
from srl.policies.state import StateTable, state_to_numpy
from srl.policies.weights import load_numpy_weights
from srl.streams.inference import InferenceServer
from srl.streams.params import ParamClient
from srl.system.topology import Routing
from srl.system.wire import Message, WireError
from srl.system.worker import PollResult
from srl.workers.base import RLWorker
from srl.workers.reports import PolicyReport, to_meta
from srl.workers.staging import StagedArrays

MAX_GRAPHED_BATCH = 1024
"""Observations of the largest pass a graphed frame-stack step replays (larger ones run eagerly)."""


class PolicyWorker(RLWorker):
    kind = "policy"

    def _configure(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed * 31 + self.spec.index)
        torch.set_num_threads(1)
        self.device = cfg.workers.policies.device
        self.policy = build_policy(self.info, cfg.policy).to(self.device)
        trainer = self.plan.stream(PARAMS).server_of(self.spec.name)
        self.params = self.endpoint(ParamClient(self.address(PARAMS, trainer), self.key,
                                                shared=cfg.network.shared_weights))
        got = self.params.wait_newer(-1, timeout_s=600.0, should_stop=self.should_stop)
        self.version = -1 if got is None else self._load(got)
        self.server = self.endpoint(InferenceServer(self.spec.host, self.key, prefer=self.published(INFERENCE)))
        self.publish(INFERENCE, self.server.address)
        self.requests = 0
        self.batches = 0
        self.busy_s = self.forward_s = 0.0
        """Seconds since the last report spent on received requests, and in their forward passes."""
        self.envs_served: set[int] = set()
        self.max_env_id = cfg.workers.actors.count * cfg.workers.actors.envs_per_actor
        recurrent = getattr(self.policy, "recurrent", False)
        self.graphed = None
        self._pinned: torch.Tensor | None = None
        """Pixels of the pending requests, gathered for the GPU (see _gather)."""
        if recurrent and cfg.workers.policies.cuda_graph and torch.device(self.device).type == "cuda":
            self.graphed = GraphedMemoryStep(self.policy, self.max_env_id, cfg.workers.policies.max_batch,
                                             self.info.obs_shape, self.info.obs_dtype, self.device)
        self.memory = (self.graphed.table if self.graphed else StateTable(self.policy, self.max_env_id, self.device)
                       ) if recurrent else None
        """A memory policy's per-env state; a restarted worker starts its envs' memories afresh."""
        sticky = self.plan.stream(INFERENCE).routing == Routing.STICKY
        self.stacks = (StackTable(self.max_env_id + 1, self.info.obs_shape, self.device)
                       if sticky and not recurrent and stacked_pixels(self.info.obs_shape, self.info.obs_dtype) else None)
        """Each env's last frame stack, so that actors can send only the newest frame (srl.envs.frames);
        the last row is the graphed step's scratch row."""
        self.stack_step = None
        if self.stacks is not None and cfg.workers.policies.cuda_graph and torch.device(self.device).type == "cuda":
            self.stack_step = GraphedStackStep(self.policy, self.stacks.stacks,
                                               min(cfg.workers.policies.max_batch, MAX_GRAPHED_BATCH), self.device)
        self._staged = StagedArrays()

    def _load(self, got) -> int:
        version, arrays = got
        load_numpy_weights(self.policy, arrays)
        return version

    def _report(self) -> dict:
        report = PolicyReport(self.requests, self.batches, self.version, busy_s=self.busy_s, forward_s=self.forward_s)
        self.requests = self.batches = 0
        self.busy_s = self.forward_s = 0.0
        meta = to_meta(report)
        if self._stopping:  # the envs this incarnation served, once, at exit
            meta["envs"] = sorted(self.envs_served)
        return meta

    def _check(self, msg: Message) -> None:
        """Refuse a request this policy cannot answer: it is dropped and counted."""
        obs, ids = msg.arrays.get("obs"), msg.arrays.get("env_ids")
        delta = msg.meta.get(DELTA) is True
        if delta:
            self._check_delta(msg)
        elif obs is None or obs.ndim < 1 or tuple(obs.shape[1:]) != tuple(self.info.obs_shape):
            raise WireError(f"obs shape {None if obs is None else obs.shape}, expected (n, {self.info.obs_shape})")
        if self.stacks is not None and ids is None:
            raise WireError("frame stacks are kept per env: requests need env_ids")
        uint8 = self.info.obs_dtype == "uint8"  # pixels: exactly uint8, nothing to cast or wrap
        bad_dtype = obs.dtype != np.uint8 if uint8 else obs.dtype.kind not in "fiub"
        if bad_dtype or len(obs) > self.cfg.workers.policies.max_batch:
            raise WireError(f"obs dtype {obs.dtype} or size {len(obs)} refused")
        if obs.dtype.kind == "f" and not np.isfinite(obs).all():
            raise WireError("obs holds non-finite values")
        if ids is not None and (ids.shape != (len(obs),) or ids.dtype != np.int64
                                or (len(ids) and (ids.min() < 0 or ids.max() >= self.max_env_id))):
            raise WireError("env_ids do not match the observations or the run's envs")
        if self.memory is not None:
            first = msg.arrays.get("first")
            if ids is None or first is None or first.shape != (len(obs),) or first.dtype != np.bool_:
                raise WireError("a memory policy needs env_ids and bool first flags for every observation")

    def _check_delta(self, msg: Message) -> None:
        """A request whose ``obs`` holds newest frames [n, 1, H, W], plus whole stacks for some rows."""
        obs, rows, full = msg.arrays.get("obs"), msg.arrays.get(FULL_ROWS), msg.arrays.get(FULL)
        c, h, w = self.info.obs_shape
        if self.stacks is None or obs is None or obs.ndim != 4 or tuple(obs.shape[1:]) != (1, h, w):
            raise WireError("a frame-delta request this worker keeps no stacks for, or of the wrong shape")
        if (rows is None or full is None or rows.dtype != np.int64 or rows.ndim != 1 or full.dtype != np.uint8
                or tuple(full.shape) != (len(rows), c, h, w)):
            raise WireError("a frame-delta request needs int64 rows and their uint8 stacks")
        if len(rows) and (rows.min() < 0 or rows.max() >= len(obs) or len(np.unique(rows)) != len(rows)):
            raise WireError("frame-delta rows out of range or repeated")

    def _stacked_act(self, pending: list) -> tuple[torch.Tensor, torch.Tensor]:
        """(action, logp) on the device of the pending requests, over the stacks kept and their
        newest frames."""
        newest, rows, full, at = [], [], [], 0
        for r in pending:
            n = len(r.obs)
            if r.msg.meta.get(DELTA) is True:
                newest.append(r.obs)
                rows.append(r.msg.arrays[FULL_ROWS] + at)
                full.append(r.msg.arrays[FULL])
            else:  # a whole request: every row replaces its env's stack
                newest.append(r.obs[:, -1:])
                rows.append(np.arange(at, at + n, dtype=np.int64))
                full.append(r.obs)
            at += n
        ids, rows = np.concatenate([r.env_ids for r in pending]), np.concatenate(rows)
        newest, full = np.concatenate(newest), np.concatenate(full)
        ids_t, rows_t, newest_t, full_t = self._staged.upload([ids, rows, newest, full], self.device)
        if self.stack_step is not None and len(ids) <= self.stack_step.buckets[-1]:
            return self.stack_step.step(ids_t, newest_t, rows_t, full_t)
        return self.policy.act(self.stacks.apply(ids_t, newest_t, rows_t, full_t))

    def _gather(self, arrays: list[np.ndarray]) -> np.ndarray:
        """The requests' observations as one array. Pixels bound for a GPU are copied once, into a
        reused pinned buffer, from which the copy to the device needs no staging."""
        if self.info.obs_dtype != "uint8" or torch.device(self.device).type != "cuda":
            return np.concatenate(arrays).astype(self.info.obs_dtype, copy=False)  # uint8 stays uint8
        n = sum(len(a) for a in arrays)
        if self._pinned is None or len(self._pinned) < n:
            self._pinned = torch.empty((n, *self.info.obs_shape), dtype=torch.uint8, pin_memory=True)
        out = self._pinned[:n].numpy()
        np.concatenate(arrays, out=out)
        return out

    def _to_device(self, obs: np.ndarray) -> torch.Tensor:
        pinned = self._pinned is not None and obs.ctypes.data == self._pinned.data_ptr()
        return (self._pinned[:len(obs)] if pinned else torch.from_numpy(obs)).to(self.device, non_blocking=pinned)

    def _act(self, obs: np.ndarray, pending: list) -> tuple[np.ndarray, np.ndarray, dict | None]:
        """(action, logp, the memory state before the step or None) of the pending requests."""
        if self.memory is None:
            action, logp = self._staged.download(self.policy.act(self._to_device(obs)))
            return action, logp, None
        ids = np.concatenate([r.env_ids for r in pending])
        first = np.concatenate([r.msg.arrays["first"] for r in pending])
        if self.graphed is not None and not any(r.msg.meta.get("want_state") is True for r in pending):
            return (*self.graphed.step(obs, first, ids), None)
        rows, state = self.memory.get(ids)
        obs_t, first_t = torch.from_numpy(obs).to(self.device), torch.from_numpy(first).to(self.device)
        action, logp, new_state = self.policy.act(obs_t, first_t, state)
        self.memory.put(rows, new_state)
        return action.cpu().numpy(), logp.cpu().numpy(), state

    def _poll(self) -> PollResult:
        got = self.params.poll(load=partial(load_numpy_weights, self.policy))
        if got is not None:
            self.version = got[0]
        pending = self.server.pending(self.cfg.workers.policies.max_batch, timeout_ms=20, check=self._check)
        if not pending:
            return PollResult()
        started = time.perf_counter()
        sizes = [len(r.obs) for r in pending]
        if self.stacks is not None:
            action, logp = self._staged.download(self._stacked_act(pending))
            state = None
        else:
            obs = self._gather([r.obs for r in pending])
            action, logp, state = self._act(obs, pending)
        self.forward_s += time.perf_counter() - started
        start = 0
        for request, n in zip(pending, sizes):
            if request.env_ids is not None:
                self.envs_served.update(request.env_ids.tolist())
            arrays = {"action": action[start:start + n], "logp": logp[start:start + n]}
            if state is not None and request.msg.meta.get("want_state") is True:
                arrays.update(state_to_numpy({k: v[start:start + n] for k, v in state.items()}))
            self.server.reply(request, arrays, {"version": self.version})
            start += n
        self.requests += len(pending)
        self.batches += 1
        self.busy_s += time.perf_counter() - started
        return PollResult(samples=int(sum(sizes)), batches=1)
