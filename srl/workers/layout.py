"""The trajectory layout a trainer accepts: names, dtypes and shapes of every array.

Checked on arrival, before a trajectory reaches a learner: a peer's mistake (or an attack)
becomes a counted drop, never a crash or a silently wrong batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from srl.envs.frames import FRAMES, FULL, FULL_AT, stacked_pixels
from srl.envs.vector import SpaceInfo
from srl.system.wire import Message, WireError

META_INTS = ("version", "actor", "seq", "incarnation")


@dataclass(frozen=True)
class TrajectoryLayout:
    T: int
    group_sizes: tuple[int, ...]
    """Env counts an actor's trajectories may have (its env groups)."""
    info: SpaceInfo
    actors: int
    state_spec: dict = field(default_factory=dict)
    """A memory policy's state (name -> (per-env shape, dtype)): trajectories then carry
    ``first`` flags ([T + 1, B]) and ``state/<name>`` ([1, B, ...]), the state before step 0."""

    @property
    def stacked(self) -> bool:
        """Observations travel as frames plus the stacks that did not slide (srl.envs.frames)."""
        return stacked_pixels(self.info.obs_shape, self.info.obs_dtype) and not self.state_spec

    @property
    def arrays(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """name -> (shape after [rows, B], dtype)."""
        i = self.info
        action = ((), "int64") if i.discrete else ((i.n_actions,), "float32")
        obs = {FRAMES: (tuple(i.obs_shape[1:]), "uint8")} if self.stacked else {"obs": (tuple(i.obs_shape), i.obs_dtype)}
        arrays = {**obs, "action": action, "logp": ((), "float32"),
                  "reward": ((), "float32"), "terminated": ((), "bool"), "truncated": ((), "bool"),
                  "valid": ((), "bool")}
        if self.state_spec:
            arrays["first"] = ((), "bool")
            arrays.update({f"state/{k}": (tuple(shape), dtype) for k, (shape, dtype) in self.state_spec.items()})
        return arrays

    def rows(self, name: str) -> int:
        """Leading dimension of an array: T + 1 observations, one start state, else T steps."""
        if name == FRAMES:
            return self.T + self.info.obs_shape[0]
        return self.T + 1 if name in ("obs", "first") else 1 if name.startswith("state/") else self.T

    def check(self, msg: Message) -> None:
        """WireError naming the first thing wrong with a trajectory message."""
        check_sample_header(msg, self.actors, {**self.arrays, **(dict.fromkeys((FULL_AT, FULL)) if self.stacked else {})})
        B = msg.arrays["valid"].shape[1] if msg.arrays["valid"].ndim == 2 else -1
        if B not in self.group_sizes:
            raise WireError(f"sample with {B} envs, expected one of {self.group_sizes}")
        for name, (tail, dtype) in self.arrays.items():
            rows = self.rows(name)
            arr = msg.arrays[name]
            if arr.shape != (rows, B, *tail) or arr.dtype != np.dtype(dtype):
                raise WireError(f"sample {name!r}: {arr.dtype}{arr.shape}, expected {dtype}{(rows, B, *tail)}")
        if self.stacked:
            self._check_full_stacks(msg, B)
        floats = ("obs",) if self.info.obs_dtype == "float32" else ()  # uint8 pixels are finite by type
        floats += tuple(f"state/{k}" for k, (_, dtype) in self.state_spec.items() if dtype.startswith("float"))
        for name in floats + ("reward", "logp") + (() if self.info.discrete else ("action",)):
            if not np.isfinite(msg.arrays[name]).all():
                raise WireError(f"sample {name!r} holds non-finite values")
        if self.info.discrete:
            a = msg.arrays["action"]
            if a.size and (a.min() < 0 or a.max() >= self.info.n_actions):
                raise WireError(f"sample actions outside [0, {self.info.n_actions})")


    def _check_full_stacks(self, msg: Message, B: int) -> None:
        at, full = msg.arrays[FULL_AT], msg.arrays[FULL]
        k = len(at)
        if at.dtype != np.int64 or at.shape != (k, 2) or k > self.T * B:
            raise WireError(f"sample {FULL_AT!r}: {at.dtype}{at.shape}, expected int64 (k <= {self.T * B}, 2)")
        if full.dtype != np.uint8 or full.shape != (k, *self.info.obs_shape):
            raise WireError(f"sample {FULL!r}: {full.dtype}{full.shape}, expected uint8 {(k, *self.info.obs_shape)}")
        if k and (at[:, 0].min() < 1 or at[:, 0].max() > self.T or at[:, 1].min() < 0 or at[:, 1].max() >= B):
            raise WireError(f"sample {FULL_AT!r}: steps outside [1, {self.T}] or envs outside [0, {B})")


def check_sample_header(msg: Message, actors: int, arrays: dict) -> None:
    """The metadata every sample carries (integers, a known actor) and exactly ``arrays``' names."""
    for key in META_INTS:
        v = msg.meta.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or not -1 <= v < 1 << 40:
            raise WireError(f"sample meta {key!r}: expected an integer, got {type(v).__name__}")
    if not 0 <= msg.meta["actor"] < actors:
        raise WireError(f"sample from actor {msg.meta['actor']}, the run has {actors}")
    if set(msg.arrays) != set(arrays):
        raise WireError(f"sample arrays {sorted(msg.arrays)[:8]}, expected {sorted(arrays)}")
