"""Turn a ``TransformerLM`` into this rank's tensor-parallel shard of it."""

from __future__ import annotations

from torch import nn

from srl.parallel.comm import BranchReduce
from srl.parallel.group import TPContext
from srl.parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                 VocabParallelHead, split_of)


def check_divisible(config, world_size: int) -> None:
    """ValueError naming the first size that ``world_size`` ranks cannot split evenly."""
    sizes = {"n_heads": config.n_heads, "vocab_size": config.vocab_size,
             "mlp.hidden": config.mlp["hidden"]}
    for name, n in sizes.items():
        if n % world_size:
            raise ValueError(f"LMConfig.{name} ({n}) is not divisible by tensor_parallel "
                             f"({world_size})")
    if world_size > 1 and config.attention.get("pattern", "dense") not in ("dense", "sink_window"):
        # per-head patterns (s2) index heads globally; a shard would see its heads as 0..H/N-1
        raise ValueError(f"LMConfig.attention.pattern {config.attention['pattern']!r} differs "
                         "between heads: not supported under tensor parallelism")


def parallelize(model: nn.Module, tp: TPContext) -> nn.Module:
    """Replace ``model``'s (a ``TransformerLM``) layers by this rank's shards, in place.

    Every rank passes a model with the same weights (same seed, or loaded from the same full
    checkpoint); each keeps its heads, MLP hidden units and vocabulary rows, moved to
    ``tp.device``. Blocks reduce their branch outputs over the group (``BranchReduce``); the
    model's ``forward`` then returns full logits on every rank. Returns ``model``.
    """
    cfg = model.config
    check_divisible(cfg, tp.world_size)
    model.to(tp.device)
    for i, block in enumerate(model.blocks):
        _shard_linears(block, f"blocks.{i}.", tp)
        block.n_heads = cfg.n_heads // tp.world_size
        block.reduce = BranchReduce(tp)
    split = split_of("embed.weight")
    n = cfg.vocab_size // tp.world_size
    model.embed = VocabParallelEmbedding(split.shard(model.embed.weight.data, tp.rank, tp.world_size),
                                         tp.rank * n, tp)
    head = (model.embed.weight if cfg.tie_embeddings
            else split.shard(model.head.weight.data, tp.rank, tp.world_size))
    model.head = VocabParallelHead(head, tp)
    model.local_heads = cfg.n_heads // tp.world_size  # KV cache width of this rank
    model.tp = tp
    return model


def _shard_linears(block: nn.Module, prefix: str, tp: TPContext) -> None:
    """Swap every split linear of ``block`` for its shard; refuse linears with no known split."""
    for name, module in list(block.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        split = split_of(f"{prefix}{name}.weight")
        if split is None or module.bias is not None:
            raise ValueError(f"no tensor-parallel split for layer {prefix}{name} "
                             f"(bias={module.bias is not None})")
        weight = split.shard(module.weight.data, tp.rank, tp.world_size)
        layer = (ColumnParallelLinear if split.dim == 0 else RowParallelLinear)(weight, tp)
        parent, _, attr = name.rpartition(".")
        setattr(block.get_submodule(parent) if parent else block, attr, layer)
