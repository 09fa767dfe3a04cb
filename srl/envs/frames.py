"""Stacked frames sent as deltas on the inference stream.

An Atari observation is a stack of the last 4 frames (``uint8 [4, 84, 84]``); from one step to
the next, 3 of them are the previous step's. With sticky routing every request of an env reaches
the same policy worker, so that worker can keep each env's last stack and the actor need only
send the newest frame: a quarter of the bytes to copy, sign and check per step.

The rule is exact whatever the env does at a reset: the actor compares the new stack with the
last one it sent for that env; an env whose stack is the old one slid by one frame sends only its
newest frame, any other (a reset, a first request, a request asked again after a timeout) sends
its whole stack. The policy worker's :class:`StackTable` then holds, bit for bit, the stack the
actor holds.

Trajectories are sent the same way without any state at the trainer: a trajectory's T + 1
stacks travel as T + C frames (the first stack whole, then each step's newest frame) plus the whole
stacks of the steps whose stack did not slide (:class:`TrajectoryFrames`);
:func:`rebuild_stacks` turns them back into the stacks, bit for bit, on the trainer's device.
"""
from __future__ import annotations

import numpy as np
import torch

FULL = "stack_full"
"""Request array: whole stacks ``[k, C, H, W]`` of the envs that cannot slide."""
FULL_ROWS = "stack_full_rows"
"""Request array: which rows of the request (``int64 [k]``) the whole stacks replace."""
DELTA = "delta"
"""Request metadata flag: ``obs`` holds only the newest frame of each env (``[n, 1, H, W]``)."""
FRAMES = "frames"
"""Trajectory array ``uint8 [T + C, B, H, W]``: step 0's stack, then the newest frame of each step."""
FULL_AT = "stack_full_at"
"""Trajectory array ``int64 [k, 2]``: (step, env) of each step whose stack did not slide; its
whole stack is row i of the trajectory's ``stack_full`` (``FULL``) array."""


def stacked_pixels(obs_shape: tuple, obs_dtype: str) -> bool:
    """Observations that are stacks of uint8 frames (``[C, H, W]`` with C > 1)."""
    return obs_dtype == "uint8" and len(obs_shape) == 3 and obs_shape[0] > 1


def unslid_rows(last: np.ndarray | None, obs: np.ndarray) -> np.ndarray:
    """Rows (``int64 [k]``) of ``obs`` [n, C, H, W] that are not ``last`` slid by one frame (all
    of them without a ``last`` of the same shape)."""
    n = len(obs)
    if last is None or last.shape != obs.shape:
        return np.arange(n, dtype=np.int64)
    slid = (obs[:, :-1] == last[:, 1:]).reshape(n, -1).all(axis=1)
    return np.flatnonzero(~slid).astype(np.int64)


def stack_delta(last: np.ndarray | None, obs: np.ndarray,
                rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What to send for ``obs`` [n, C, H, W] after ``last`` (the stacks sent before, or None):
    ``(newest frames [n, 1, H, W], rows that must go whole int64 [k], their stacks [k, C, H, W])``.
    ``rows``: ``unslid_rows(last, obs)`` when the caller has it already."""
    if rows is None or last is None:
        rows = unslid_rows(last, obs)
    return obs[:, -1:], rows, obs[rows]


class TrajectoryFrames:
    """One trajectory's stacks, recorded as :data:`FRAMES` plus the whole stacks that did not slide."""

    def __init__(self, T: int, B: int, obs_shape: tuple):
        C, H, W = obs_shape
        self.shape = (C, H, W)
        self.frames = np.empty((T + C, B, H, W), np.uint8)
        self._at: list[np.ndarray] = []
        self._full: list[np.ndarray] = []

    def put(self, t: int, obs: np.ndarray, unslid: np.ndarray | None) -> None:
        """Step ``t``'s stacks [B, C, H, W]; ``unslid``: :func:`unslid_rows` against step t - 1's."""
        C = obs.shape[1]
        if t == 0:
            self.frames[:C] = obs.swapaxes(0, 1)
            return
        self.frames[t + C - 1] = obs[:, -1]
        if unslid is not None and len(unslid):
            self._at.append(np.stack([np.full(len(unslid), t, np.int64), unslid.astype(np.int64)], axis=1))
            self._full.append(obs[unslid])

    def arrays(self) -> dict[str, np.ndarray]:
        full = np.concatenate(self._full) if self._full else np.empty((0, *self.shape), np.uint8)
        at = np.concatenate(self._at) if self._at else np.empty((0, 2), np.int64)
        return {FRAMES: self.frames, FULL_AT: at, FULL: full}


def rebuild_stacks(frames: torch.Tensor, at: torch.Tensor, full: torch.Tensor, channels: int) -> torch.Tensor:
    """The stacks ``[T + 1, B, C, H, W]`` that :class:`TrajectoryFrames` recorded (batched: ``at``'s
    env column counts envs across the batch). Every stack is its predecessor slid by the step's
    newest frame unless ``at`` names it; only envs with such steps are rebuilt step by step."""
    stacks = frames.unfold(0, channels, 1).permute(0, 1, 4, 2, 3).contiguous()  # (T + 1, B, C, H, W)
    if len(at) == 0:
        return stacks
    envs, env_of = torch.unique(at[:, 1], return_inverse=True)
    which = torch.full(stacks.shape[:1] + envs.shape, -1, dtype=torch.int64, device=frames.device)
    which[at[:, 0], env_of] = torch.arange(len(at), device=frames.device)
    sub, newest = stacks[:, envs], frames[channels - 1:, envs]  # (T + 1, E, C, H, W), (T + 1, E, H, W)
    fill = full[which.clamp(min=0)]  # (T + 1, E, C, H, W)
    whole = (which >= 0)[..., None, None, None]
    for t in range(1, len(sub)):
        slid = torch.cat([sub[t - 1, :, 1:], newest[t, :, None]], dim=1)
        sub[t] = torch.where(whole[t], fill[t], slid)
    stacks[:, envs] = sub
    return stacks


class StackTable:
    """Each env's last stack, where inference runs (a policy worker), indexed by run-wide env id."""

    def __init__(self, n_envs: int, obs_shape: tuple, device: str):
        self.stacks = torch.zeros((n_envs, *obs_shape), dtype=torch.uint8, device=device)

    def apply(self, ids: torch.Tensor, newest: torch.Tensor, rows: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        """Slide the stacks of envs ``ids`` [n] by their ``newest`` frames [n, 1, H, W], put the
        whole stacks ``full`` [k, C, H, W] in ``rows`` [k], store and return the result [n, C, H, W]."""
        stacks = torch.cat([self.stacks[ids][:, 1:], newest], dim=1)  # (n, C, H, W)
        if len(rows):
            stacks[rows] = full
        self.stacks[ids] = stacks
        return stacks


def with_stacks(batch: dict[str, torch.Tensor], channels: int) -> dict[str, torch.Tensor]:
    """A batch of frame trajectories with ``obs`` stacks in place of :data:`FRAMES`, :data:`FULL_AT`
    and :data:`FULL` (on the batch's device)."""
    batch = dict(batch)
    batch["obs"] = rebuild_stacks(batch.pop(FRAMES), batch.pop(FULL_AT), batch.pop(FULL), channels)
    return batch
