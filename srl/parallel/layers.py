"""Tensor-parallel layers and how each weight of a ``TransformerLM`` is split over ranks.

Column-parallel layers hold a slice of the output features (QKV by heads, MLP up and gate by
hidden units), row-parallel layers the matching slice of the input features (attention out and
MLP down) and return partial sums that ``Block.reduce`` adds up over ranks. The embedding and the
LM head are split over the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from srl.parallel.comm import copy_to_ranks, gather_from_ranks, reduce_from_ranks
from srl.parallel.group import TPContext


@dataclass(frozen=True)
class Split:
    """How a full weight is cut into ``world`` equal shards."""

    dim: int
    """0: output features (column-parallel, vocabulary); 1: input features (row-parallel)."""
    groups: int = 1
    """Fused weights are cut group by group (QKV: 3, so each rank keeps q, k and v of its heads)."""

    def shard(self, full: Tensor, rank: int, world: int) -> Tensor:
        n = full.shape[self.dim]
        if n % (self.groups * world):
            raise ValueError(f"dim {self.dim} of size {n} does not split into {self.groups} groups "
                             f"x {world} ranks")
        # (.., n, ..) -> (.., groups, world, n / (groups world), ..), take [.., :, rank, :, ..]
        g = full.unflatten(self.dim, (self.groups, world, n // (self.groups * world)))
        return g.select(self.dim + 1, rank).flatten(self.dim, self.dim + 1).contiguous()

    def unshard(self, parts: list[Tensor]) -> Tensor:
        # each (.., groups * m, ..) -> (.., groups, m, ..); cat over ranks inside each group
        grouped = [p.unflatten(self.dim, (self.groups, -1)) for p in parts]
        return torch.cat(grouped, self.dim + 1).flatten(self.dim, self.dim + 1)


# Module name (last component before ``.weight``) -> split; anything else is replicated.
SPLITS = {
    "qkv": Split(0, groups=3), "proj": Split(1),
    "fc": Split(0), "fc_out": Split(1),  # GELU MLP
    "gate": Split(0), "up": Split(0), "down": Split(1),  # gated (SwiGLU) MLP
    "embed": Split(0), "head": Split(0),  # vocabulary
}


def split_of(param_name: str) -> Split | None:
    """The split of a ``TransformerLM`` parameter (state-dict name), None if replicated."""
    parts = param_name.split(".")
    return SPLITS.get(parts[-2]) if len(parts) >= 2 and parts[-1] == "weight" else None


class ColumnParallelLinear(nn.Module):
    """y[..., this rank's features] = x W_shard^T; x replicated (its gradient is all-reduced)."""

    def __init__(self, weight: Tensor, tp: TPContext):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.tp = tp

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(copy_to_ranks(x, self.tp), self.weight)


class RowParallelLinear(nn.Module):
    """x[..., this rank's features] W_shard^T: this rank's partial sum of the full output."""

    def __init__(self, weight: Tensor, tp: TPContext):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.tp = tp

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + n) of the embedding; other tokens give 0, summed over ranks."""

    def __init__(self, weight: Tensor, start: int, tp: TPContext):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.start, self.tp = start, tp

    def forward(self, tokens: Tensor) -> Tensor:
        local = tokens - self.start
        mine = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        return reduce_from_ranks(out.masked_fill(~mine[..., None], 0.0), self.tp)


class VocabParallelHead(nn.Module):
    """Logits of this rank's vocabulary slice, gathered into full logits on every rank."""

    def __init__(self, weight: Tensor | nn.Parameter, tp: TPContext):
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.tp = tp

    def forward(self, h: Tensor) -> Tensor:
        return gather_from_ranks(F.linear(copy_to_ranks(h, self.tp), self.weight), self.tp)
