"""A memory policy's inference step replayed from CUDA graphs.

One eager step of a small memory policy launches a few dozen kernels (the state gather, the reset,
every block's projections, the decode kernel, sampling, the state scatter); at batch sizes a policy
worker sees, their host-side launch cost outweighs the GPU work. :class:`GraphedMemoryStep`
captures the whole step once per batch bucket (powers of two up to the worker's ``max_batch``) and
replays it: a step then costs three host-to-device copies, one replay and the copy back.

The state table is allocated for every env of the run up front (its tensors must not move between
capture and replay) plus one scratch row, which the padding rows of a bucket read and write.

:class:`GraphedStackStep` does the same for a feed-forward policy over the frame stacks a policy
worker keeps per env (Atari's CNN with frame deltas on the inference stream).
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


class GraphedStackStep:
    """``step(ids, newest, rows, full) -> (action, logp)`` for a feed-forward policy over the frame
    stacks a policy worker keeps (:class:`srl.envs.frames.StackTable`), replayed from CUDA graphs.

    The step slides each env's stack by its newest frame, puts the whole stacks of ``rows`` in
    place, stores the stacks and samples actions: about thirty launches eagerly, one replay here.
    The whole stacks go in through two fixed buffers (a flag and a stack per row) set before the
    replay, so that their number, which varies, is not part of the graph. Padding rows of a bucket
    read and write the table's scratch row. Inputs are device tensors (the worker's staged upload);
    outputs are the graph's own tensors, valid until the next step.
    """

    def __init__(self, policy, table: torch.Tensor, max_batch: int, device, graphs: bool = True):
        self.policy, self.table, self.device = policy, table, torch.device(device)
        self.scratch = len(table) - 1  # never an env's row
        self.buckets = _buckets(max_batch)
        self.graphs_on = graphs
        n, shape = self.buckets[-1], table.shape[1:]
        self.ids = torch.full((n,), self.scratch, dtype=torch.int64, device=device)
        self.newest = torch.zeros((n, 1, *shape[1:]), dtype=table.dtype, device=device)
        self.is_full = torch.zeros(n, dtype=torch.bool, device=device)
        self.full = torch.zeros((n, *shape), dtype=table.dtype, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.pool = None

    def _body(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.ids[:n]
        slid = torch.cat([self.table[ids][:, 1:], self.newest[:n]], dim=1)
        stacks = torch.where(self.is_full[:n, None, None, None], self.full[:n], slid)
        self.table[ids] = stacks
        return self.policy.act(stacks)

    def _capture(self, n: int):
        saved = self.table.clone()  # warm-up steps write the table
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # cuDNN's algorithm search and lazy inits outside the capture
                self._body(n)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            action, logp = self._body(n)
        self.pool = graph.pool()
        self.table.copy_(saved)
        return graph, action, logp

    def step(self, ids: torch.Tensor, newest: torch.Tensor, rows: torch.Tensor,
             full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(ids)
        bucket = next(b for b in self.buckets if b >= n)
        self.ids[:n].copy_(ids)
        self.ids[n:bucket].fill_(self.scratch)
        self.newest[:n].copy_(newest)
        if len(rows):
            self.is_full[rows] = True
            self.full[rows] = full
        if not self.graphs_on:
            action, logp = self._body(bucket)
        else:
            if bucket not in self.graphs:
                self.graphs[bucket] = self._capture(bucket)
            graph, action, logp = self.graphs[bucket]
            graph.replay()
        if len(rows):
            self.is_full[rows] = False
        return action[:n], logp[:n]
