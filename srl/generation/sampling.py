"""Sampling utilities shared by the policy and the draft.

One :class:`SamplingParams` is passed to both models of a speculative pair, so the draft's q and
the target's p are the post-temperature, post-top-k, post-top-p distributions actually sampled
from (speculative sampling is exact only for those).

Everything here is free of host synchronisation (no ``.item()``, no ``multinomial``, no boolean
indexing), so it can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    """How logits become the distribution that is sampled from."""

    temperature: float = 1.0
    """Divides the logits; 0 means greedy (a one-hot distribution on the argmax)."""
    top_k: int | None = None
    """Keep only the k largest logits (None: all)."""
    top_p: float | None = None
    """Keep the smallest set of tokens whose probability reaches top_p (None or 1: all)."""

    def validate(self) -> "SamplingParams":
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"SamplingParams.top_k must be >= 1 or None, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1] or None, got {self.top_p}")
        return self


def logits_to_probs(
    logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> Tensor:
    """The distribution sampled from, over the last dimension (float32, or float64 if given)."""
    if logits.dtype != torch.float64:
        logits = logits.float()
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = sorted_p.cumsum(-1) - sorted_p  # mass of strictly more likely tokens
        keep_sorted = mass_before < top_p  # always keeps the most likely token
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = probs * keep
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def probs_from_params(logits: Tensor, params: SamplingParams) -> Tensor:
    return logits_to_probs(logits, params.temperature, params.top_k, params.top_p)


def sample_from_probs(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One exact draw per row of ``probs`` (..., V) -> (...) int64.

    Exponential race: argmax_x p(x) / E_x with E_x ~ Exp(1) is distributed as p, zero-probability
    tokens are never chosen, and no host synchronisation is needed.
    """
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(-1)


def token_log_probs(logits: Tensor, tokens: Tensor, params: SamplingParams) -> Tensor:
    """log of the sampling distribution at ``tokens``: what a learner compares with rollout logps."""
    if params.temperature > 0 and params.top_k is None and (params.top_p or 1.0) >= 1.0:
        logits = logits if logits.dtype == torch.float64 else logits.float()
        logp = torch.log_softmax(logits / params.temperature, dim=-1)
        return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    probs = probs_from_params(logits, params)
    return probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).clamp_min(1e-30).log()
