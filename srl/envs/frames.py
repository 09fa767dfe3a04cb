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

Trajectories still carry whole stacks (the trainer keeps no per-env state).
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


def stacked_pixels(obs_shape: tuple, obs_dtype: str) -> bool:
    """Observations that are stacks of uint8 frames (``[C, H, W]`` with C > 1)."""
    return obs_dtype == "uint8" and len(obs_shape) == 3 and obs_shape[0] > 1


def stack_delta(last: np.ndarray | None, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What to send for ``obs`` [n, C, H, W] after ``last`` (the stacks sent before, or None):
    ``(newest frames [n, 1, H, W], rows that must go whole int64 [k], their stacks [k, C, H, W])``."""
    n = len(obs)
    if last is None or last.shape != obs.shape:
        rows = np.arange(n, dtype=np.int64)
    else:
        slid = (obs[:, :-1] == last[:, 1:]).reshape(n, -1).all(axis=1)
        rows = np.flatnonzero(~slid).astype(np.int64)
    return obs[:, -1:], rows, obs[rows]


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
