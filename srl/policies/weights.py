"""Policy weights as numpy arrays: what the parameter stream carries."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def weights_to_numpy(module: nn.Module) -> dict[str, np.ndarray]:
    """A snapshot of the weights. Always a copy: on CPU ``.cpu().numpy()`` would alias the live
    parameters, which the next optimizer step changes while the parameter stream sends them
    without copying (torn weights, and frames whose HMAC no longer matches)."""
    return {k: v.detach().to("cpu", copy=True).numpy() for k, v in module.state_dict().items()}


def load_numpy_weights(module: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Load weights received from a peer; a name or shape that does not match the module's
    raises ValueError naming it (strict, so a foreign tensor never slips in)."""
    own = module.state_dict()
    if set(arrays) != set(own):
        missing, extra = sorted(set(own) - set(arrays)), sorted(set(arrays) - set(own))
        raise ValueError(f"weights do not match the policy: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, v in arrays.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"weights {k!r}: shape {tuple(v.shape)}, the policy has {tuple(own[k].shape)}")
    module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()})
