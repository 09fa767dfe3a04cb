"""The trainer's receiving side, on a thread of its own: sockets are drained while the learner
works.

:class:`SampleIntake` owns the samples and parameter sockets. It checks every trajectory against
the run's layout, counts receipts per actor (the actors' credit), drops trajectories whose policy
is too old, assembles batches straight into (pinned) host buffers and queues them for the
learner, and answers parameter requests with the newest published weights.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Mapping
import numpy as np
import torch
import zmq

from srl.envs.frames import FULL, FULL_AT
from srl.streams.params import ParamServer
from srl.streams.sample import SampleConsumer
from srl.system.wire import Message
from srl.workers.layout import TrajectoryLayout


class SampleIntake(threading.Thread):
    def __init__(self, samples: SampleConsumer, params: ParamServer, layout: TrajectoryLayout, batch_steps: int,
                 max_lag: int, sync_actors: int = 0, pin: bool = False):
        super().__init__(name="srl-intake", daemon=True)
        self.samples, self.params, self.layout = samples, params, layout
        self.batch_steps, self.max_lag = batch_steps, max_lag
        self.sync_actors = sync_actors
        """Sync mode: a batch is exactly one trajectory per actor of this rank, at the version."""
        self.pin = pin
        self.batches: queue.Queue = queue.Queue(maxsize=1)
        self.lock = threading.Lock()
        self.version = params.version
        self.received: dict[str, int] = {}
        self._latest_incarnation: dict[int, int] = {}
        self.params.status = {"received": self.received}  # every reply carries the receipts
        self.buffer: list[Message] = []
        self.buffered_steps = 0
        self.lags: list[int] = []
        self.dropped_stale = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()

    # ------------------------------------------------------------------ learner side
    def publish(self, version: int, weights: Mapping) -> None:
        with self.lock:
            self.params.publish(version, weights)
            self.version = version

    def take(self, timeout_s: float) -> dict[str, torch.Tensor] | None:
        if self.error is not None:
            raise RuntimeError(f"sample intake failed: {self.error}") from self.error
        try:
            return self.batches.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def pop_lags(self) -> list[int]:
        lags, self.lags = self.lags, []
        return lags

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=2.0)

    # ------------------------------------------------------------------ the thread
    def run(self) -> None:
        both, params_only = zmq.Poller(), zmq.Poller()
        both.register(self.samples.sock, zmq.POLLIN)
        both.register(self.params.sock, zmq.POLLIN)
        params_only.register(self.params.sock, zmq.POLLIN)
        ready: dict | None = None
        try:
            while not self._halt.is_set():
                # while a batch waits for the learner, samples stay queued (back-pressure on the
                # actors) and only parameter requests wake this thread
                (both if ready is None else params_only).poll(5 if ready is None else 1)
                with self.lock:
                    self.params.serve()
                if ready is None:
                    self._receive()
                    if self._batch_ready():
                        ready = self._take_batch()
                if ready is not None:
                    try:
                        self.batches.put_nowait(ready)
                        ready = None
                    except queue.Full:
                        pass  # the learner is busy: hold the batch, keep serving parameters
        except BaseException as exc:  # noqa: BLE001 - handed to the learner's thread
            self.error = exc

    def _receive(self, budget: int = 64) -> None:
        for _ in range(budget):
            got = self.samples.recv(check=self.layout.check)
            if got is None:
                return
            self._accept(got[1])

    def _accept(self, msg: Message) -> None:
        actor, incarnation = msg.meta["actor"], msg.meta["incarnation"]
        if incarnation < self._latest_incarnation.get(actor, -1):
            return  # a late message from an actor that has been replaced
        if incarnation > self._latest_incarnation.get(actor, -1):
            self.received.pop(f"{actor}.{self._latest_incarnation.get(actor)}", None)
            self._latest_incarnation[actor] = incarnation
        sender = f"{actor}.{incarnation}"
        self.received[sender] = self.received.get(sender, 0) + 1  # credit back to that actor
        lag = self.version - msg.meta["version"]
        if lag > self.max_lag or lag < 0:
            self.dropped_stale += 1  # too old to correct with the PPO ratio, or from before a restart
            return
        self.lags.append(lag)
        self.buffer.append(msg)
        self.buffered_steps += msg.arrays["valid"].size

    def _batch_ready(self) -> bool:
        if self.sync_actors:
            current = {m.meta["actor"] for m in self.buffer if m.meta["version"] == self.version}
            return len(current) >= self.sync_actors
        return self.buffered_steps >= self.batch_steps

    def _take_batch(self) -> dict[str, torch.Tensor]:
        if self.sync_actors:  # a deterministic order, whatever order the actors arrived in
            msgs = sorted((m for m in self.buffer if m.meta["version"] == self.version), key=lambda m: m.meta["actor"])
            self.buffer = [m for m in self.buffer if m.meta["version"] != self.version]
        else:
            msgs, self.buffer = self.buffer, []
        self.buffered_steps = sum(m.arrays["valid"].size for m in self.buffer)
        return assemble(msgs, self.pin)


def assemble(msgs: list[Message], pin: bool) -> dict[str, torch.Tensor]:
    """Concatenate trajectories along the env axis, straight into one (pinned) buffer per key.
    The whole stacks of frame trajectories (srl.envs.frames) are stacked along their rows, their
    env column shifted to the env's place in the batch."""
    out = {}
    if FULL_AT in msgs[0].arrays:
        offsets = np.cumsum([0] + [m.arrays["valid"].shape[1] for m in msgs[:-1]])
        out[FULL_AT] = torch.from_numpy(np.concatenate([m.arrays[FULL_AT] + [0, o] for m, o in zip(msgs, offsets)]))
        out[FULL] = torch.from_numpy(np.concatenate([m.arrays[FULL] for m in msgs]))
    for key, first in msgs[0].arrays.items():
        if key in out:
            continue
        B = sum(m.arrays[key].shape[1] for m in msgs)
        shape = (first.shape[0], B, *first.shape[2:])
        tensor = torch.empty(shape, dtype=torch.from_numpy(first[:0]).dtype, pin_memory=pin)
        np.concatenate([m.arrays[key] for m in msgs], axis=1, out=tensor.numpy())
        out[key] = tensor
    return out
