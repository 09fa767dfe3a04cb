"""Optimizers for srl learners: torch's Adam / AdamW / SGD and Sophia.

The trainer builds its optimizer from the experiment file's ``optimizer: {type: ..., ...}``
with ``build_optimizer``. When the result is a ``Sophia``, the trainer also refreshes the
Hessian estimate every ``update_period`` steps, on the batch it just trained on (no extra
samples)::

    opt = build_optimizer(model.parameters(), **cfg.optimizer)   # {"type": "sophia", "lr": ...}
    ...
    loss.backward(); opt.step(); opt.zero_grad()
    if isinstance(opt, Sophia) and opt.hessian_due():
        logits = policy(batch.obs)                  # categorical head; gnb_loss_gaussian for
        gnb_loss(logits).backward()                 #   a diagonal-Gaussian head (mean, log_std)
        opt.update_hessian(scale=gnb_num_predictions(logits))   # B = predictions averaged over
        opt.zero_grad()
    log("losses/sophia_win_rate", opt.win_rate())

If gradients are clipped or loss-scaled for the training step, do not scale the refresh
gradients (an fp16 GradScaler must be unscaled first: h would grow by scale**2).

Stability: beta.
"""

from __future__ import annotations

from typing import Iterable

import torch

from srl import registry
from srl.optim.hessian import gnb_loss, gnb_loss_gaussian, gnb_num_predictions, hutchinson_estimate
from srl.optim.sophia import Sophia

__all__ = [
    "OPTIMIZERS",
    "Sophia",
    "build_optimizer",
    "gnb_loss",
    "gnb_loss_gaussian",
    "gnb_num_predictions",
    "hutchinson_estimate",
]

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {name: registry.resolve("optimizer", name)
                                                      for name in registry.names("optimizer")}
"""The optimizers registered when this module was imported (names live in :mod:`srl.registry`)."""


def build_optimizer(params: Iterable, type: str, **kwargs) -> torch.optim.Optimizer:
    """Build an optimizer by name.

    Args:
        params: parameters or parameter-group dicts.
        type: one of ``OPTIMIZERS`` ("adam", "adamw", "sgd", "sophia"), case-insensitive.
        **kwargs: the optimizer's constructor arguments (``lr``, ``betas``, ...). ``betas``
            given as a list (as YAML loads it) is turned into a tuple.

    Returns:
        The optimizer. For ``"sophia"`` see ``Sophia``'s training-loop contract.

    Raises:
        ValueError: for an unknown ``type`` (the message lists the choices) or a bad argument.
    """
    key = str(type).lower()
    if key not in registry.names("optimizer"):
        raise ValueError(f"optimizer type {type!r} is unknown; choose one of {sorted(registry.names('optimizer'))}")
    if "betas" in kwargs and isinstance(kwargs["betas"], list):
        kwargs["betas"] = tuple(kwargs["betas"])
    try:
        return registry.resolve("optimizer", key)(params, **kwargs)
    except TypeError as e:  # unexpected keyword: report it as a configuration error
        raise ValueError(f"optimizer {key!r}: {e}") from e
