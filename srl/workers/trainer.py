"""Trainer worker: takes assembled batches, learns, publishes versioned weights, checkpoints.

The learning math lives in the learner that ``algorithm.type`` names (:mod:`srl.algorithms`);
receiving and batching run beside it on the :class:`SampleIntake` thread. With
``workers.trainers.count: N`` the N trainer processes form one data-parallel group: each takes
the trajectories of its share of the actors, gradients are all-reduced, every rank serves the
same weights to its own actors, and rank 0 writes checkpoints.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from srl.envs.frames import FRAMES, with_stacks
from srl.plan import PARAMS, SAMPLES, TRAINER_GROUP, build_learner, build_policy
from srl.streams.params import ParamServer
from srl.streams.sample import SampleConsumer
from srl.system.checkpoint import load_latest, save_checkpoint
from srl.system.worker import PollResult
from srl.workers.base import RLWorker
from srl.workers.dp import DataParallel, weights_digest
from srl.workers.intake import SampleIntake
from srl.policies.state import state_spec
from srl.workers.layout import TrajectoryLayout
from srl.workers.reports import TrainerReport, to_meta


class TrainerWorker(RLWorker):
    kind = "trainer"

    def _configure(self) -> None:
        cfg, t = self.cfg, self.cfg.workers.trainers
        torch.manual_seed(cfg.seed)
        torch.set_num_threads(t.torch_threads)
        self.rank, self.world = self.spec.worker.rank, self.spec.worker.world
        self.device = _device(t.device, self.rank)
        self.dp = self._join_group() if self.world > 1 else None
        self.policy = build_policy(self.info, cfg.policy)
        self.learner = build_learner(self.policy, cfg, self.device, sync=self.dp)
        self.version = 0
        self.counters: dict = {}
        ckpt = load_latest(self.spec.run_dir) if (self.spec.resume or self.spec.incarnation > 0) else None
        if ckpt is not None:
            self.policy.load_state_dict(ckpt.weights)
            self.learner.load_state(ckpt.trainer_state)
            self.version = int(ckpt.counters["version"])
            self.counters = ckpt.counters
        if self.dp is not None:
            self.dp.broadcast_module(self.policy)  # every rank starts from rank 0's weights
        self.intake = self._open_streams()
        self.intake.start()
        self.stats: dict = {}
        self.learned_steps = 0
        self.last_checkpoint_version = self.version if ckpt is not None else -1
        self.last_checkpoint_at = time.monotonic()
        self._held: dict | None = None
        self._stop_meta: dict | None = None
        self._digest = float("nan")
        self._busy_s, self._busy_mark = 0.0, time.monotonic()

    def _join_group(self) -> DataParallel:
        t = self.cfg.workers.trainers
        backend = t.backend if t.backend != "auto" else ("nccl" if self.device.startswith("cuda") else "gloo")
        key = f"{TRAINER_GROUP}/rendezvous/{self.spec.group_incarnation}"
        return DataParallel(self.rank, self.world, backend, self.resolver, key, self.spec.host, self.should_stop)

    def _open_streams(self) -> SampleIntake:
        cfg, a = self.cfg, self.cfg.workers.actors
        samples = self.endpoint(SampleConsumer(self.spec.host, self.key, prefer=self.published(SAMPLES), hwm=4))
        params = self.endpoint(ParamServer(self.spec.host, self.key, prefer=self.published(PARAMS),
                                           epoch=self.spec.incarnation, shared=self.cfg.network.shared_weights))
        params.publish(self.version, self.policy.state_dict())
        layout = self._layout()
        my_actors = len(self.plan.stream(SAMPLES).clients_of(self.spec.name))
        intake = SampleIntake(samples, params, layout, batch_steps=-(-cfg.algorithm.batch_size // self.world),
                              max_lag=cfg.algorithm.max_policy_lag, sync_actors=my_actors if cfg.workers.sync else 0,
                              pin=self.device.startswith("cuda"))
        self.publish(SAMPLES, samples.address)
        self.publish(PARAMS, params.address)
        return intake

    def _layout(self):
        """What every sample must look like: env-step trajectories, or prompts and completions."""
        from srl.envs.tokens import is_token_task

        a = self.cfg.workers.actors
        if is_token_task(self.cfg):
            from srl.workers.token_layout import token_layout

            return token_layout(self.cfg, self.info)
        groups = (a.envs_per_actor,) if a.inline_policy else (a.envs_per_actor // a.ring,)
        return TrajectoryLayout(a.rollout_len, groups, self.info, a.count, state_spec(self.policy))

    # ------------------------------------------------------------------ loop
    def _poll(self) -> PollResult:
        batch = self._held if self._held is not None else self.intake.take(timeout_s=0.005)
        self._held = None
        if self.dp is not None:
            ready, stop = self.dp.agree(batch is not None, self._stop_meta is not None)
            if stop:
                self._stop_group()
                return PollResult()
            if not ready:
                self._held = batch
                return PollResult()
        if batch is None:
            return PollResult()
        t0 = time.perf_counter()
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        if FRAMES in batch:
            batch = with_stacks(batch, self.info.obs_shape[0])
        self.stats = self.learner.train(batch)
        self.version += 1
        if self.dp is not None:
            self._digest = weights_digest(self.policy)
        self.intake.publish(self.version, self.policy.state_dict())
        learned = int(batch["valid"].sum())
        self.learned_steps += learned
        self._busy_s += time.perf_counter() - t0
        if self._checkpoint_due():
            self._checkpoint(self.counters)
        return PollResult(samples=learned, batches=1)

    def _checkpoint_due(self) -> bool:
        """The first checkpoint right after the first update, then every ``every_seconds``."""
        if self.rank != 0:
            return False
        every = self.cfg.checkpoint.every_seconds
        return self.last_checkpoint_version < 0 or time.monotonic() - self.last_checkpoint_at >= every

    def _report(self) -> dict:
        """Called only once configured (the worker base guarantees it)."""
        lags = self.intake.pop_lags()
        stats, self.stats = self.stats, {}
        now = time.monotonic()  # the fraction of wall time spent learning since the last report
        stats["perf/trainer_busy"] = self._busy_s / max(now - self._busy_mark, 1e-9)
        self._busy_s, self._busy_mark = 0.0, now
        learned, self.learned_steps = self.learned_steps, 0
        report = TrainerReport(version=self.version, rank=self.rank, learned_steps=learned,
                               dropped_stale=self.intake.dropped_stale,
                               policy_lag=float(np.mean(lags)) if lags else float("nan"), digest=self._digest,
                               stats={k: float(v) for k, v in stats.items() if isinstance(v, (int, float))})
        return to_meta(report)

    # ------------------------------------------------------------------ control
    def _handle(self, kind: str, meta: dict) -> None:
        if not self._configured:  # told to stop while still joining the group: nothing to save
            self._stopping = self._stopping or kind == "stop"
            return
        if kind == "stop" and self.dp is not None and not self.controller_gone():
            self._stop_meta = meta  # ranks stop together, at the next agreement
            return
        super()._handle(kind, meta)

    def _on_command(self, kind: str, meta: dict) -> None:
        counters = meta.get("counters")
        if isinstance(counters, dict):
            self.counters = _plain_counters(counters)
        if kind == "checkpoint" and self.rank == 0:
            self._checkpoint(self.counters)

    def _stop_group(self) -> None:
        meta = self._stop_meta or {}
        self._stopping = True
        self._on_stop(meta)

    def _on_stop(self, meta: dict) -> None:
        counters = meta.get("counters")
        if isinstance(counters, dict):
            self.counters = _plain_counters(counters)
        if self.rank == 0:
            self._checkpoint(self.counters)
        self.intake.stop()
        if self.dp is not None:
            self.dp.close()

    def _checkpoint(self, counters: dict) -> None:
        t0 = time.perf_counter()
        path = save_checkpoint(self.spec.run_dir, self.version, self.policy.state_dict(), self.learner.state(),
                               counters, keep=self.cfg.checkpoint.keep)
        self.last_checkpoint_version, self.last_checkpoint_at = self.version, time.monotonic()
        report = self._report()
        report["path"] = path
        report["stats"]["perf/checkpoint_s"] = time.perf_counter() - t0
        self.send_event("checkpoint", report)


def _device(device: str, rank: int) -> str:
    """``cuda`` means one GPU per rank (rank r on GPU r mod the GPUs this process sees)."""
    if device == "cuda" and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return f"cuda:{rank % torch.cuda.device_count()}"
    return device


def _plain_counters(counters: dict) -> dict:
    return {str(k): v for k, v in counters.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
