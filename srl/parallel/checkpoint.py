"""Full (unsharded) state dicts of tensor-parallel models, saved and loaded as safetensors.

The file holds exactly the single-process ``TransformerLM`` state dict (a tied head is stored
once, as ``embed.weight``), so a checkpoint written from N ranks loads on any M that divide the
model, including 1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from srl.parallel.layers import split_of


def _tp(model: nn.Module):
    tp = getattr(model, "tp", None)
    return tp if tp is not None and tp.world_size > 1 else None


def _gather(x: Tensor, name: str, tp) -> Tensor:
    split = split_of(name)
    if tp is None or split is None:
        return x
    parts = [torch.empty_like(x) for _ in range(tp.world_size)]
    dist.all_gather(parts, x.contiguous(), group=tp.group)
    return split.unshard(parts)


def full_state_dict(model: nn.Module, grads: bool = False) -> dict[str, Tensor]:
    """The single-process state dict (``grads``: the parameters' gradients instead), on every rank.

    Collective under tensor parallelism: every rank of the group must call it.
    """
    tp = _tp(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    out = {}
    for name, value in model.state_dict(keep_vars=True).items():
        if grads:
            value = params[name].grad if name in params else None
            if value is None:
                continue
        out[name] = _gather(value.detach(), name, tp)
    return out


def shard_state_dict(model: nn.Module, full: dict[str, Tensor]) -> dict[str, Tensor]:
    """This rank's part of a full state dict, keyed like ``model.state_dict()``."""
    tp = _tp(model)
    tied = getattr(model.config, "tie_embeddings", False)
    local = {}
    for name in model.state_dict():
        key = "embed.weight" if tied and name == "head.weight" else name
        if key not in full:
            raise ValueError(f"checkpoint has no tensor {key!r}")
        value, split = full[key], split_of(key)
        local[name] = value if tp is None or split is None else split.shard(value, tp.rank, tp.world_size)
    return local


def load_full_state_dict(model: nn.Module, full: dict[str, Tensor]) -> None:
    model.load_state_dict(shard_state_dict(model, full))


def save_full(model: nn.Module, path: str) -> None:
    """Write the full weights to ``path`` (safetensors) from rank 0; collective under TP."""
    full = full_state_dict(model)
    if getattr(model.config, "tie_embeddings", False):
        full.pop("head.weight", None)
    tp = _tp(model)
    if tp is None or tp.rank == 0:
        save_file({k: v.cpu().contiguous() for k, v in full.items()}, path)
    if tp is not None:
        dist.barrier(group=tp.group)


def load_full(model: nn.Module, path: str) -> None:
    """Load a full safetensors checkpoint into a single-process or tensor-parallel model."""
    load_full_state_dict(model, load_file(path))
