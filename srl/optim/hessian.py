"""Diagonal Hessian estimators for Sophia (arXiv 2305.14342, Algorithms 1 and 2).

Gauss-Newton-Bartlett (Sophia-G): sample labels from the model's own distribution, average the
negative log-likelihood over the B predictions, back-propagate, and use ``B * grad**2``. Its
expectation is the diagonal of the Gauss-Newton matrix (for a softmax or Gaussian output, the
diagonal Fisher) averaged over the predictions; it is never negative. ``gnb_loss`` and
``gnb_loss_gaussian`` build the loss; ``Sophia.update_hessian(scale=B)`` squares and scales.

Hutchinson (Sophia-H): ``u * (H u)`` with ``u ~ N(0, I)``, one Hessian-vector product; unbiased
for the Hessian diagonal, may be negative (Sophia's ``max(rho * h, eps)`` then clips).

Stability: beta.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["gnb_loss", "gnb_loss_gaussian", "gnb_num_predictions", "hutchinson_estimate"]


def gnb_num_predictions(logits_or_mean: torch.Tensor, mask: torch.Tensor | None = None, *, event_dims: int = 1) -> int:
    """B for ``update_hessian(scale=B)``: predictions the GNB loss averages over.

    ``logits [..., V]`` or ``mean [..., A]`` count ``prod(shape[:-event_dims])``; with a mask,
    its number of true entries (this syncs with the device).
    """
    if mask is not None:
        return int(mask.sum())
    return math.prod(logits_or_mean.shape[: logits_or_mean.dim() - event_dims])


def gnb_loss(
    logits: torch.Tensor, mask: torch.Tensor | None = None, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` against labels sampled from ``softmax(logits)``.

    Args:
        logits: ``[..., V]`` unnormalised log-probabilities of a categorical policy or language
            model, with the graph to the parameters (apply temperature before, if the policy
            samples with one).
        mask: optional boolean ``[...]``: predictions to include (e.g. non-padding tokens).
        generator: optional ``torch.Generator`` for the label draw.

    Returns:
        A scalar loss. After ``loss.backward()``, call ``opt.update_hessian(scale=B)`` with
        ``B = gnb_num_predictions(logits, mask)``.
    """
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    flat = logits.reshape(-1, logits.shape[-1])  # (B, V)
    if flat.dtype in (torch.bfloat16, torch.float16):
        flat = flat.float()
    with torch.no_grad():
        probs = torch.softmax(flat, dim=-1)
        labels = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)
    nll = F.cross_entropy(flat, labels, reduction="none")  # (B,)
    if mask is None:
        return nll.mean()
    m = mask.reshape(-1).to(nll.dtype)
    return (nll * m).sum() / m.sum().clamp_min(1.0)


def gnb_loss_gaussian(
    mean: torch.Tensor,
    log_std: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Diagonal-Gaussian counterpart of ``gnb_loss``: mean NLL of actions sampled from the policy.

    One prediction is one action vector: ``a ~ N(mean, exp(log_std)**2)`` drawn without gradient,
    its negative log-density summed over the action dimensions, averaged over predictions.

    Args:
        mean: ``[..., A]`` action means, with the graph to the parameters.
        log_std: log standard deviations, broadcastable to ``mean`` (state-independent or not).
        mask: optional boolean ``[...]`` of predictions to include.
        generator: optional ``torch.Generator`` for the action draw.

    Returns:
        A scalar loss; ``B = gnb_num_predictions(mean, mask)`` for ``update_hessian(scale=B)``.
    """
    if mean.dtype in (torch.bfloat16, torch.float16):
        mean = mean.float()
    log_std = log_std.to(mean.dtype).expand_as(mean)
    with torch.no_grad():
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        action = mean + log_std.exp() * noise
    z = (action - mean) * torch.exp(-log_std)
    nll = (0.5 * z * z + log_std).sum(-1) + 0.5 * mean.shape[-1] * math.log(2 * math.pi)  # [...]
    nll = nll.reshape(-1)
    if mask is None:
        return nll.mean()
    m = mask.reshape(-1).to(nll.dtype)
    return (nll * m).sum() / m.sum().clamp_min(1.0)


def hutchinson_estimate(
    loss: torch.Tensor,
    params: Sequence[torch.Tensor],
    *,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """Hutchinson diagonal estimate ``u * (H u)``, ``u ~ N(0, I)``, averaged over ``num_samples``.

    Args:
        loss: scalar with its graph still alive (do not call ``backward`` on it first).
        params: parameters to estimate for; pass the optimizer's parameters in order so that the
            result lines up with ``Sophia.update_hessian(estimate)``.
        num_samples: probe vectors to average (each one Hessian-vector product).
        generator: optional ``torch.Generator`` for the probes.

    Returns:
        One tensor per parameter (zeros where the loss does not depend on it). Entries can be
        negative; Sophia's ``max(rho * h, eps)`` then gives a clipped (sign) step.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    params = list(params)
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    out = [torch.zeros_like(p) for p in params]
    for s in range(num_samples):
        us = [torch.randn(params[i].shape, generator=generator, device=params[i].device, dtype=params[i].dtype) for i in live]
        hvps = torch.autograd.grad(
            [grads[i] for i in live], [params[i] for i in live], grad_outputs=us,
            retain_graph=s + 1 < num_samples, allow_unused=True,
        )
        for i, u, hu in zip(live, us, hvps):
            if hu is not None:
                out[i].add_(u * hu.detach(), alpha=1.0 / num_samples)
    return out
