"""Lockstep generation in a tensor-parallel group: rank 0 takes the work, every rank runs it.

A generation worker that is a group of ranks talks to the streams on rank 0 only. Each job
(prompts and a token budget) is broadcast so that all ranks make the same sampler calls, the
collectives inside the model line up, and rank 0 alone hands the rollout on::

    if tp.rank == 0:
        for prompts, n in jobs:
            share_job(tp, prompts, n)
            emit(sampler.generate(prompts, n))
        share_job(tp, None)  # stop the followers
    else:
        follow(tp, sampler)
"""

from __future__ import annotations

import torch
from torch import Tensor

from srl.parallel.group import TPContext


def share_job(tp: TPContext, prompts: Tensor | None = None, max_new_tokens: int = 0
              ) -> tuple[Tensor, int] | None:
    """Rank 0's (prompts (B, T) int64, max_new_tokens) on every rank; None from rank 0 means stop.

    Ranks other than 0 pass nothing and get the job (or None).
    """
    header = torch.full((3,), -1, dtype=torch.long, device=tp.device)  # (B, T, max_new_tokens)
    if tp.rank == 0 and prompts is not None:
        if prompts.dim() != 2:
            raise ValueError(f"prompts must be (B, T), got shape {tuple(prompts.shape)}")
        header.copy_(torch.tensor([*prompts.shape, max_new_tokens]))
    tp.broadcast(header)
    B, T, n = header.tolist()
    if B < 0:
        return None
    buf = (prompts.to(tp.device, torch.long) if tp.rank == 0
           else torch.empty(B, T, dtype=torch.long, device=tp.device))
    return tp.broadcast(buf), n


def follow(tp: TPContext, sampler) -> int:
    """Ranks > 0: run ``sampler.generate`` on every job rank 0 shares, until it says stop."""
    jobs = 0
    while (job := share_job(tp)) is not None:
        sampler.generate(*job)
        jobs += 1
    return jobs
