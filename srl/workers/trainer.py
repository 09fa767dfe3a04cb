"""Trainer worker: pulls trajectories, learns, publishes versioned weights, writes checkpoints.

The learning math lives in :mod:`srl.algorithms`; this class is the process shell around it:
batching by policy version, staleness, parameter publishing and checkpoints.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from srl.algorithms.ppo import PPOLearner
from srl.envs.vector import SpaceInfo
from srl.policies.mlp import build_policy, weights_to_numpy
from srl.streams.params import ParamServer
from srl.streams.sample import SampleConsumer
from srl.system.checkpoint import load_latest, save_checkpoint
from srl.system.worker import PollResult, Worker
from srl.system.wire import Message


class TrainerWorker(Worker):
    kind = "trainer"

    def _configure(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        torch.set_num_threads(cfg.workers.trainers.torch_threads)
        self.policy = build_policy(SpaceInfo.from_dict(self.spec.space), cfg.policy)
        self.learner = PPOLearner(self.policy, cfg.algorithm, cfg.optimizer, cfg.workers.trainers.device,
                                  total_env_steps=cfg.stop.env_steps, seed=cfg.seed)
        self.version = 0
        self.counters: dict = {}
        ckpt = load_latest(self.spec.run_dir) if (self.spec.resume or self.spec.incarnation > 0) else None
        if ckpt is not None:
            self.policy.load_state_dict(ckpt.weights)
            self.learner.load_state(ckpt.trainer_state)
            self.version = int(ckpt.counters["version"])
            self.counters = ckpt.counters
        names = self.resolver
        self.samples = self.endpoint(SampleConsumer(self.spec.host, self.key, prefer=names.get("trainer/0/samples"),
                                                    hwm=2))
        self.params = self.endpoint(ParamServer(self.spec.host, self.key, prefer=names.get("trainer/0/params"),
                                                epoch=self.spec.incarnation))
        self.params.publish(self.version, weights_to_numpy(self.policy))
        self.received: dict[str, int] = {}
        self.params.status = {"received": self.received}  # every reply carries the receipts
        names.put("trainer/0/samples", self.samples.address)
        names.put("trainer/0/params", self.params.address)
        self.buffer: list[Message] = []
        self.buffered_steps = 0
        self.stats: dict = {}
        self.lags: list[int] = []
        self.dropped_stale = 0
        self.trained_steps = 0

    # ------------------------------------------------------------------ loop
    def _poll(self) -> PollResult:
        self.params.serve()
        # Take only what the next batch needs: what stays queued blocks the actors (back-pressure),
        # which bounds the policy lag instead of producing samples that would be dropped as stale.
        timeout = 5
        while not self._batch_ready():
            msg = self.samples.poll(timeout_ms=timeout)
            if msg is None:
                return PollResult()
            self._accept(msg)
            timeout = 0
        batch = self._take_batch()
        self.stats = self.learner.train(batch)
        self.version += 1
        self.params.publish(self.version, weights_to_numpy(self.policy))
        self.params.serve()
        return PollResult(samples=int(batch["valid"].sum()), batches=1)

    def _accept(self, msg: Message) -> None:
        sender = f"{msg.meta.get('actor')}.{msg.meta.get('incarnation')}"
        self.received[sender] = self.received.get(sender, 0) + 1  # credit back to that actor
        if not {"obs", "action", "logp", "reward", "terminated", "truncated", "valid"} <= msg.arrays.keys():
            self.samples.dropped += 1
            return
        lag = self.version - int(msg.meta.get("version", -1))
        if lag > self.cfg.algorithm.max_policy_lag or lag < 0:
            self.dropped_stale += 1  # too old to correct with the PPO ratio, or from before a restart
            return
        self.lags.append(lag)
        self.buffer.append(msg)
        self.buffered_steps += msg.arrays["valid"].size

    def _batch_ready(self) -> bool:
        if self.cfg.workers.sync:
            actors = {m.meta.get("actor") for m in self.buffer if m.meta.get("version") == self.version}
            return len(actors) >= self.cfg.workers.actors.count
        return self.buffered_steps >= self.cfg.algorithm.batch_size

    def _take_batch(self) -> dict[str, np.ndarray]:
        if self.cfg.workers.sync:  # a deterministic order, whatever order the actors arrived in
            msgs = sorted((m for m in self.buffer if m.meta.get("version") == self.version),
                          key=lambda m: m.meta.get("actor", 0))
        else:
            msgs = self.buffer
        self.buffer = [m for m in self.buffer if m not in msgs]
        self.buffered_steps = sum(m.arrays["valid"].size for m in self.buffer)
        return {k: np.concatenate([m.arrays[k] for m in msgs], axis=1) for k in msgs[0].arrays}

    def _collect_stats(self) -> dict:
        stats = dict(self.stats)
        self.stats = {}
        if self.lags:
            stats["charts/policy_lag"] = float(np.mean(self.lags))
            self.lags = []
        stats.update({"version": self.version, "trainer/dropped_stale": self.dropped_stale,
                      "trainer/env_steps": self.learner.env_steps})
        return stats

    # ------------------------------------------------------------------ checkpoints
    def _on_command(self, kind: str, meta: dict) -> None:
        if kind == "checkpoint":
            self._checkpoint(meta.get("counters", {}))

    def _on_stop(self, meta: dict) -> None:
        self._checkpoint(meta.get("counters", {}))

    def _checkpoint(self, counters: dict) -> None:
        t0 = time.perf_counter()
        path = save_checkpoint(self.spec.run_dir, self.version, self.policy.state_dict(), self.learner.state(),
                               counters, keep=self.cfg.checkpoint.keep)
        self.send_stats({"event": "checkpoint", "path": path, "version": self.version,
                         "seconds": time.perf_counter() - t0})
