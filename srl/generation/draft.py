"""Draft alignment: distil the policy into the draft on the policy's own generations.

FastDraft-style alignment in the one-epoch regime: every batch of policy-generated sequences is
used for exactly one gradient step and then dropped, so the draft follows a moving policy on
fresh data instead of re-fitting old rollouts.

Loss at each position: KL(p || q) between the policy's and the draft's temperature-scaled
distributions (``loss="tv"`` minimises total variation instead, which is exactly 1 - acceptance).
Logged before each update, on data the draft has not trained on:

- ``charts/acceptance_rate``: mean over positions of sum_x min(p, q), the probability that
  standard speculative sampling accepts a drafted token;
- ``charts/block_efficiency``: expected tokens per target pass for draft length ``gamma``,
  (1 - a^(gamma + 1)) / (1 - a) at that mean acceptance a.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from srl.generation.sampling import SamplingParams


@dataclass
class DraftAlignConfig:
    """Settings of :class:`DraftAligner`."""

    lr: float = 1e-3
    """AdamW learning rate of the draft."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping of each update."""
    loss: str = "kl"
    """"kl": KL(p || q) per position; "tv": total variation, 1 - acceptance."""
    gamma: int = 4
    """Draft length for the logged block efficiency."""
    params: SamplingParams = field(default_factory=SamplingParams)
    """Sampling parameters shared with generation (the temperature scales both models)."""
    bf16: bool = False
    """Both models' passes under bfloat16 autocast on CUDA (float32 master weights for the draft):
    the numerics a bfloat16 generation copy samples with."""

    def validate(self) -> "DraftAlignConfig":
        if self.loss not in ("kl", "tv"):
            raise ValueError(f"DraftAlignConfig.loss must be 'kl' or 'tv', got {self.loss!r}")
        if self.lr <= 0 or self.gamma < 1:
            raise ValueError("DraftAlignConfig.lr must be > 0 and gamma >= 1")
        self.params.validate()
        return self


def block_efficiency(alpha: float, gamma: int) -> float:
    """Expected tokens per target pass of standard speculative sampling, (1 - a^(g+1)) / (1 - a)."""
    return float(gamma + 1) if alpha >= 1.0 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


def distill_loss(draft_logits: Tensor, target_logits: Tensor, temperature: float = 1.0,
                 mask: Tensor | None = None, loss: str = "kl") -> tuple[Tensor, Tensor]:
    """(loss, acceptance per position): logits (B, T, V), mask (B, T) of positions to count."""
    t = max(temperature, 1e-6)
    logq = F.log_softmax(draft_logits.float() / t, dim=-1)
    with torch.no_grad():
        p = F.softmax(target_logits.float() / t, dim=-1)
        accept = torch.minimum(p, logq.exp()).sum(-1)  # (B, T)
    if loss == "kl":
        per_pos = (p * (p.clamp_min(1e-30).log() - logq)).sum(-1)
    else:
        per_pos = 0.5 * (p - logq.exp()).abs().sum(-1)
    if mask is None:
        return per_pos.mean(), accept
    m = mask.float()
    return (per_pos * m).sum() / m.sum().clamp_min(1), accept[mask.bool()]


class DraftAligner:
    """Keeps a draft aligned with a policy: ``step(sequences)`` once per fresh batch."""

    def __init__(self, draft, target, config: DraftAlignConfig = DraftAlignConfig()):
        self.draft, self.target, self.config = draft, target, config.validate()
        self.optimizer = torch.optim.AdamW(draft.parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay)
        self.samples_seen = 0
        self.updates = 0

    def step(self, tokens: Tensor, mask: Tensor | None = None, update: bool = True) -> dict[str, float]:
        """One update on policy-generated ``tokens`` (B, T); the batch is not kept. ``update=False``
        only measures (the loss and acceptance the update would have started from)."""
        amp = torch.autocast("cuda", torch.bfloat16, enabled=self.config.bf16 and tokens.is_cuda)
        with torch.no_grad(), amp:
            target_logits = self.target(tokens)
        self.draft.train(update)
        with torch.set_grad_enabled(update), amp:
            draft_logits = self.draft(tokens)
            loss, accept = distill_loss(draft_logits, target_logits, self.config.params.temperature,
                                        mask, self.config.loss)
        if update:
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.draft.parameters(), self.config.max_grad_norm)
            self.optimizer.step()
            self.updates += 1
        self.samples_seen += tokens.shape[0]
        alpha = float(accept.mean())
        return {
            "losses/distill": float(loss.detach()),
            "charts/acceptance_rate": alpha,
            "charts/block_efficiency": block_efficiency(alpha, self.config.gamma),
            "charts/samples_seen": float(self.samples_seen),
        }

    def run(self, batches: Iterable[Tensor], log: Callable[[dict], None] | None = None
            ) -> list[dict[str, float]]:
        """Consume a stream of fresh batches, one update each (one epoch, no reuse)."""
        history = []
        for tokens in batches:
            metrics = self.step(tokens)
            history.append(metrics)
            if log is not None:
                log(metrics)
        return history


def policy_batches(generate: Callable[[], Tensor], n: int) -> Iterator[Tensor]:
    """``n`` fresh batches, each from a new call of ``generate`` (e.g. a sampler on new prompts)."""
    for _ in range(n):
        yield generate()


@torch.no_grad()
def measure_acceptance(draft, target, tokens: Tensor, temperature: float = 1.0) -> float:
    """Mean sum_x min(p, q) over all positions of ``tokens`` (B, T): held-out acceptance."""
    draft.eval()
    _, accept = distill_loss(draft(tokens), target(tokens), temperature)
    return float(accept.mean())
