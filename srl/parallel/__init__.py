"""Tensor-parallel ``TransformerLM`` policies over torch.distributed (Megatron-style splits).

Entry points:

- ``launch_group(world_size, fn, *args, backend=...)``: spawn one process per rank on this host
  and run ``fn(ctx: TPContext, *args)`` in each; ``init_group`` joins an existing launch.
- ``parallelize(model, ctx)``: the rank's shard of a ``TransformerLM`` (standard or ladder
  residual); its forward takes the same arguments and returns full logits on every rank.
- ``save_full`` / ``load_full`` / ``full_state_dict``: unsharded safetensors checkpoints, so
  a model written from N ranks loads on M.

Generation (``srl.generation``) runs a parallelized model as it is, one sampler per rank, fed
the same prompts and seeded alike (the same ``generator`` seed, or ``torch.manual_seed`` on every
rank): ``share_job`` / ``follow`` keep a group in lockstep behind rank 0.
"""

from srl.parallel.checkpoint import full_state_dict, load_full, load_full_state_dict, save_full
from srl.parallel.comm import BranchReduce, copy_to_ranks, gather_from_ranks, reduce_from_ranks
from srl.parallel.group import TPContext, init_group, launch_group, serve_store
from srl.parallel.layers import SPLITS, Split, split_of
from srl.parallel.serve import follow, share_job
from srl.parallel.shard import check_divisible, parallelize

__all__ = [
    "BranchReduce", "SPLITS", "Split", "TPContext", "check_divisible", "copy_to_ranks", "follow",
    "full_state_dict", "gather_from_ranks", "init_group", "launch_group",
    "load_full", "load_full_state_dict", "parallelize", "reduce_from_ranks", "save_full",
    "serve_store", "share_job", "split_of",
]
