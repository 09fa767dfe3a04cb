"""PPO's minibatch step replayed from CUDA graphs.

One eager minibatch step of a small network (forward, the clipped losses, backward, gradient
clipping, Adam) launches a few hundred kernels; on the trainer's GPU their host-side cost, not
the arithmetic, sets the learning rate (5 ms per step of 512 Atari frames on an H200, about the
same in bfloat16). :class:`GraphedMinibatchStep` captures the whole step once per padded
minibatch size and replays it: a step then costs the row gathers into its input buffers and one
replay.

Minibatch sizes vary with the valid steps of each batch, so a minibatch is padded to a multiple of
:data:`PAD` with rows of zeros whose weight is zero: every mean of the step is a weighted mean, and
the padding changes no loss, no gradient and no statistic (the eager step is the same function
without weights). The optimizer must be torch's fused Adam or AdamW, built ``capturable`` with its
learning rate a device tensor (the schedule writes into it), so that the step, its skip of a
non-finite gradient (``found_inf``) and its state live on the device.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

PAD = 64
"""Minibatch sizes are rounded up to a multiple of this (one graph per size seen)."""
STATS = ("losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/approx_kl", "losses/clipfrac",
         "losses/grad_norm")
"""The statistics a step returns, in the order of its stats vector."""


def padded(n: int) -> int:
    return -(-n // PAD) * PAD


class GraphedMinibatchStep:
    """``step(data, index) -> stats`` (a device vector in :data:`STATS` order) for the rows
    ``index`` of ``data`` (name -> tensor with rows first), from a CUDA graph of ``body``.

    ``body(inputs, weight)`` is the learner's whole minibatch step on the static ``inputs`` and
    row ``weight`` buffers; ``state()`` lists every tensor it updates (parameters, optimizer
    state, counters), which warming up before a capture must leave as it found them."""

    def __init__(self, body: Callable[[dict, torch.Tensor], torch.Tensor], state: Callable[[], list[torch.Tensor]],
                 device):
        self.body, self.state, self.device = body, state, torch.device(device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict, torch.Tensor, torch.Tensor]] = {}
        self.pool = None

    def prepare(self, data: dict[str, torch.Tensor], sizes: list[int]) -> bool:
        """Capture the graphs that minibatches of ``sizes`` rows need; False (with a warning) if
        a capture fails, in which case the caller steps eagerly from then on."""
        try:
            for size in {padded(n) for n in sizes} - set(self.graphs):
                self.graphs[size] = self._capture(data, size)
        except RuntimeError as exc:
            warnings.warn(f"CUDA graph capture of the learner's step failed; stepping eagerly ({exc})")
            return False
        return True

    def step(self, data: dict[str, torch.Tensor], index: torch.Tensor) -> torch.Tensor:
        """One minibatch step; its padded size must have been :meth:`prepare`-d."""
        n = len(index)
        size = padded(n)
        graph, inputs, weight, stats = self.graphs[size]
        for name, buf in inputs.items():
            torch.index_select(data[name], 0, index, out=buf[:n])
            if n < size:
                buf[n:].zero_()  # padding rows of zeros: finite whatever the last rows held
        weight[:n].fill_(1.0)
        if n < size:
            weight[n:].zero_()
        graph.replay()
        return stats

    def _capture(self, data: dict[str, torch.Tensor], size: int):
        inputs = {k: torch.zeros((size, *v.shape[1:]), dtype=v.dtype, device=self.device) for k, v in data.items()}
        weight = torch.ones(size, device=self.device)
        saved = [t.clone() for t in self.state()]  # warming up steps the optimizer
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.body(inputs, weight)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        for t, s in zip(self.state(), saved):
            t.copy_(s)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the trainer's intake thread allocates pinned batches meanwhile, which in
        # the default (global) mode invalidates the capture
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            stats = self.body(inputs, weight)
        self.pool = graph.pool()
        return graph, inputs, weight, stats
