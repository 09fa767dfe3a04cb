"""Per-env state of memory policies where inference runs, keyed by run-wide env id."""
from __future__ import annotations

import numpy as np
import torch

State = dict[str, torch.Tensor]


def state_spec(policy, device="cpu") -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (per-env shape, numpy dtype name) of a memory policy's state; {} for others."""
    if not getattr(policy, "recurrent", False):
        return {}
    fresh = policy.initial_state(1, device)
    return {k: (tuple(v.shape[1:]), str(v.cpu().numpy().dtype)) for k, v in fresh.items()}


class StateTable:
    """Rows of state for the envs one process serves; an env's row is made fresh on first sight.

    Rows are assigned lazily (a policy worker behind sticky routing sees only its share of the
    run's envs) and the table doubles when full, so memory follows the envs actually served.
    ``max_envs`` bounds the run-wide env ids (checked by the caller).
    """

    def __init__(self, policy, max_envs: int, device="cpu", capacity: int = 64):
        self.policy, self.device = policy, device
        self.row_of = np.full(max_envs, -1, np.int64)
        """env id -> row, -1 until the env is first seen."""
        self.size = 0
        self.table = policy.initial_state(capacity, device)

    def rows_of(self, env_ids: np.ndarray) -> torch.Tensor:
        """The table rows of ``env_ids`` (a device tensor), assigning rows to envs seen first."""
        new = np.unique(env_ids[self.row_of[env_ids] < 0])
        if len(new):
            self.row_of[new] = np.arange(self.size, self.size + len(new))
            self.size += len(new)
            while self.size > next(iter(self.table.values())).shape[0]:
                self._grow()
        return torch.as_tensor(self.row_of[env_ids], device=self.device)

    def _grow(self) -> None:
        n = next(iter(self.table.values())).shape[0]
        fresh = self.policy.initial_state(n, self.device)
        self.table = {k: torch.cat([v, fresh[k]]) for k, v in self.table.items()}

    def get(self, env_ids: np.ndarray) -> tuple[torch.Tensor, State]:
        """(row index, state of those envs)."""
        rows = self.rows_of(env_ids)
        return rows, {k: v[rows] for k, v in self.table.items()}

    def put(self, rows: torch.Tensor, state: State) -> None:
        for k, v in state.items():
            self.table[k][rows] = v

    def __len__(self) -> int:
        return self.size


def state_to_numpy(state: State) -> dict[str, np.ndarray]:
    """``state/<name>`` arrays shaped [1, B, ...] for a trajectory or a reply."""
    return {f"state/{k}": v.cpu().numpy()[None] for k, v in state.items()}
