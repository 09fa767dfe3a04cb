"""A memory policy's inference step replayed from CUDA graphs.

One eager step of a small memory policy launches a few dozen kernels (the state gather, the reset,
every block's projections, the decode kernel, sampling, the state scatter); at batch sizes a policy
worker sees, their host-side launch cost outweighs the GPU work. :class:`GraphedMemoryStep`
captures the whole step once per batch bucket (powers of two up to the worker's ``max_batch``) and
replays it: a step then costs three host-to-device copies, one replay and the copy back.

The state table is allocated for every env of the run up front (its tensors must not move between
capture and replay) plus one scratch row, which the padding rows of a bucket read and write.
"""
from __future__ import annotations

import numpy as np
import torch

from srl.policies.state import StateTable


def _buckets(max_batch: int) -> list[int]:
    sizes, n = [], 8
    while n < max_batch:
        sizes.append(n)
        n *= 2
    return [*sizes, max_batch]


class GraphedMemoryStep:
    """``step(obs, first, env_ids) -> (action, logp)`` for a memory policy on CUDA, from graphs.

    ``table`` is the state table it reads and writes (shared with any eager step of the same
    worker, which must leave its tensors in place: the table never grows, see ``StateTable``).
    Graphs are captured lazily, the first time a bucket is needed.
    """

    def __init__(self, policy, max_envs: int, max_batch: int, obs_shape: tuple, obs_dtype: str, device):
        self.policy, self.device = policy, torch.device(device)
        self.table = StateTable(policy, max_envs, device, capacity=max_envs + 1)
        self.scratch = max_envs  # never assigned to an env
        self.buckets = _buckets(max_batch)
        n = self.buckets[-1]
        self.obs = torch.zeros((n, *obs_shape), dtype=getattr(torch, obs_dtype), device=device)
        self.first = torch.zeros(n, dtype=torch.bool, device=device)
        self.rows = torch.full((n,), self.scratch, dtype=torch.int64, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.pool = None

    def _body(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.rows[:n]
        state = {k: v[rows] for k, v in self.table.table.items()}
        action, logp, new_state = self.policy.act(self.obs[:n], self.first[:n], state)
        for k, v in new_state.items():
            self.table.table[k].index_copy_(0, rows, v)
        return action, logp

    def _capture(self, n: int):
        saved = {k: v.clone() for k, v in self.table.table.items()}  # warm-up steps write the table
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile and autotune outside the capture
                self._body(n)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            action, logp = self._body(n)
        self.pool = graph.pool()
        for k, v in saved.items():
            self.table.table[k].copy_(v)
        return graph, action, logp

    def step(self, obs: np.ndarray, first: np.ndarray, env_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(obs)
        bucket = next(b for b in self.buckets if b >= n)
        rows = self.table.rows_of(env_ids)
        self.obs[:n].copy_(torch.from_numpy(obs), non_blocking=True)
        self.first[:n].copy_(torch.from_numpy(first), non_blocking=True)
        self.rows[:n].copy_(rows, non_blocking=True)
        self.rows[n:bucket].fill_(self.scratch)
        if bucket not in self.graphs:
            self.graphs[bucket] = self._capture(bucket)
        graph, action, logp = self.graphs[bucket]
        graph.replay()
        return action[:n].cpu().numpy(), logp[:n].cpu().numpy()
