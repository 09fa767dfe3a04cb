"""What the learners share around their optimizer steps: the guarded step (clip the gradient,
skip a step whose gradient is not finite) and statistics read back once per batch."""
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
        self.device_skips = torch.zeros((), device=device)
        """Steps the fused optimizers skipped (a device counter, updated inside graphed steps too)."""
        self._host_skips = 0

    def __call__(self, optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter],
                 max_norm: float) -> torch.Tensor | None:
        """The gradient's norm (before clipping), or None when the host check skipped the step."""
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        if optimizer.defaults.get("fused"):
            bad = (~torch.isfinite(grad_norm)).float()
            optimizer.found_inf = bad
            self.device_skips += bad
        elif not torch.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            self._host_skips += 1
            return None
        optimizer.step()
        return grad_norm

    def skipped(self) -> int:
        """Steps skipped so far (a host sync: read it once per batch, not per minibatch)."""
        return self._host_skips + int(self.device_skips)


def averages(sums: dict[str, torch.Tensor | float], count: int) -> dict[str, float]:
    """``sums / count`` as floats; the tensors among them (on one device) are read back in one
    transfer: one host sync instead of one per statistic and minibatch."""
    tensors = [v.detach().float().reshape(()) for v in sums.values() if torch.is_tensor(v)]
    read = iter(torch.stack(tensors).tolist() if tensors else [])
    return {k: (next(read) if torch.is_tensor(v) else float(v)) / max(count, 1) for k, v in sums.items()}
