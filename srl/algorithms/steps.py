"""The learners' optimizer step: clip the gradient, skip a step whose gradient is not finite."""
from __future__ import annotations

from typing import Iterable

import torch


class GuardedStep:
    """Clip the gradient to ``max_norm`` and step the optimizer, skipping the step when the norm
    is not finite (a poisoned or overflowing minibatch), on every data-parallel rank alike.

    torch's fused optimizers (``fused=True``: srl's Adam and AdamW) skip it on the device, through
    their ``found_inf``, so a minibatch needs no host sync; any other optimizer is checked on the
    host. Skips are counted either way."""

    def __init__(self, device: str):
        self._device_skips = torch.zeros((), device=device)
        self._host_skips = 0

    def __call__(self, optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter],
                 max_norm: float) -> torch.Tensor | None:
        """The gradient's norm (before clipping), or None when the host check skipped the step."""
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        if optimizer.defaults.get("fused"):
            bad = (~torch.isfinite(grad_norm)).float()
            optimizer.found_inf = bad
            self._device_skips += bad
        elif not torch.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            self._host_skips += 1
            return None
        optimizer.step()
        return grad_norm

    def skipped(self) -> int:
        """Steps skipped so far (a host sync: read it once per batch, not per minibatch)."""
        return self._host_skips + int(self._device_skips)
