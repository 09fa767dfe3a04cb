"""Loading policy weights that arrive as numpy arrays (what the parameter stream carries)."""
from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn


def load_numpy_weights(module: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Load weights received from a peer into the module's own tensors, in place; a name or shape
    that does not match the module's raises ValueError naming it (strict, so a foreign tensor never
    slips in). Float32 weights load into a bfloat16 module (a generation worker's copy) as well.
    Returns once the copies are done (from page-locked memory they are asynchronous)."""
    own = module.state_dict()
    if set(arrays) != set(own):
        missing, extra = sorted(set(own) - set(arrays)), sorted(set(arrays) - set(own))
        raise ValueError(f"weights do not match the policy: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, v in arrays.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"weights {k!r}: shape {tuple(v.shape)}, the policy has {tuple(own[k].shape)}")
    with torch.no_grad(), warnings.catch_warnings():
        # frames off the wire are read-only buffers: torch warns, though they are only read here
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for k, v in arrays.items():  # in place: graphs keep reading them
            src, dst = torch.from_numpy(np.asarray(v)), own[k]
            if dst.is_cuda and src.dtype != dst.dtype:  # cast on the GPU (torch would cast on the host)
                src = src.to(dst.device, non_blocking=True)
            dst.copy_(src, non_blocking=dst.is_cuda)
    if any(t.is_cuda for t in own.values()):
        torch.cuda.synchronize()  # the source may be a shared file that is checked right after
