"""Collectives of Megatron-style tensor parallelism, as autograd functions.

- ``copy_to_ranks``: identity forward, all-reduce backward (the input of a column-parallel layer:
  every rank's shard contributes to the gradient of the replicated input).
- ``reduce_from_ranks``: all-reduce forward, identity backward (the partial sums of a
  row-parallel layer or of a vocabulary-split embedding).
- ``gather_from_ranks``: all-gather along the last dim forward, this rank's slice backward
  (vocabulary-split logits; the loss is computed on the full logits, identically on every rank).
- ``BranchReduce``: the reduction of a block's branch output as a pending callable; in inference
  the all-reduce is asynchronous, so Ladder Residual overlaps it with the next branch.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from srl.parallel.group import TPContext


def _all_reduce(x: Tensor, group) -> Tensor:
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


class _CopyToRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _GatherFromRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        ctx.rank, ctx.n = dist.get_rank(group), x.shape[-1]
        world = dist.get_world_size(group)
        x = x.contiguous()
        if x.is_cuda:  # one buffer, (world, ...) -> (..., world * n)
            out = x.new_empty((world, *x.shape))
            dist.all_gather_into_tensor(out, x, group=group)
            return out.movedim(0, -2).reshape(*x.shape[:-1], world * ctx.n)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, -1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad[..., ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None


def copy_to_ranks(x: Tensor, tp: TPContext) -> Tensor:
    return _CopyToRanks.apply(x, tp.group) if tp.world_size > 1 else x


def reduce_from_ranks(x: Tensor, tp: TPContext) -> Tensor:
    return _ReduceFromRanks.apply(x, tp.group) if tp.world_size > 1 else x


def gather_from_ranks(x: Tensor, tp: TPContext) -> Tensor:
    return _GatherFromRanks.apply(x, tp.group) if tp.world_size > 1 else x


class BranchReduce:
    """``Block.reduce`` under tensor parallelism: branch partial sums -> callable of the full sum.

    With autograd recording, the reduction is the synchronous ``reduce_from_ranks`` (training;
    same numbers). Otherwise the all-reduce starts now (``async_op``) and the callable waits for
    it: standard wiring calls it at once, Ladder wiring one branch later, computing meanwhile.
    """

    def __init__(self, tp: TPContext):
        self.tp = tp

    def __call__(self, branch: Tensor) -> Callable[[], Tensor]:
        if self.tp.world_size == 1:
            return lambda: branch
        if torch.is_grad_enabled() and branch.requires_grad:
            out = reduce_from_ranks(branch, self.tp)
            return lambda: out
        branch = branch.contiguous()
        work = dist.all_reduce(branch, group=self.tp.group, async_op=True)

        def wait() -> Tensor:
            work.wait()
            return branch

        return wait
