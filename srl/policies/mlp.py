"""MLP actor-critic with a categorical or diagonal-Gaussian head.

Inference avoids ``torch.distributions`` on the hot path: a tiny CPU policy spends more time
in Python than in matmuls, so sampling is a few tensor ops.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from srl.envs.vector import SpaceInfo

if TYPE_CHECKING:
    from srl.config import PolicyConfig

_LOG_2PI = math.log(2 * math.pi)


class RunningNorm(nn.Module):
    """Running mean / variance of observations, stored as buffers so they travel with the weights."""

    def __init__(self, shape: tuple[int, ...], clip: float = 10.0):
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("var", torch.ones(shape, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(1e-4, dtype=torch.float64))
        self.clip = clip

    @torch.no_grad()
    def update(self, x: torch.Tensor, sync=None) -> None:
        """Fold a batch in; with ``sync`` (data-parallel ranks) the batch is every rank's."""
        x = x.reshape(-1, *self.mean.shape).to(torch.float64)
        m = torch.cat([torch.tensor([float(x.shape[0])], dtype=torch.float64, device=x.device), x.sum(0), (x * x).sum(0)])
        if sync is not None:
            sync.sum(m)
        d = self.mean.numel()
        b_n = float(m[0])
        if b_n == 0:
            return
        b_mean = (m[1:1 + d] / b_n).reshape(self.mean.shape)
        b_var = (m[1 + d:] / b_n).reshape(self.mean.shape) - b_mean**2
        b_var = b_var.clamp_min(0.0)
        delta, total = b_mean - self.mean, self.count + b_n
        self.mean += delta * b_n / total
        self.var.copy_((self.var * self.count + b_var * b_n + delta**2 * self.count * b_n / total) / total)
        self.count.copy_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        std = torch.sqrt(self.var + 1e-8).to(x.dtype)
        return torch.clamp((x - self.mean.to(x.dtype)) / std, -self.clip, self.clip)


def _mlp(sizes: list[int], activation: str, out: int, out_gain: float) -> nn.Sequential:
    act = nn.Tanh if activation == "tanh" else nn.ReLU
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [_init(nn.Linear(a, b), math.sqrt(2)), act()]
    layers.append(_init(nn.Linear(sizes[-1], out), out_gain))
    return nn.Sequential(*layers)


def _init(layer: nn.Linear, gain: float) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


class ActorCriticHeads(nn.Module):
    """Acting and evaluation shared by every feed-forward actor-critic: a subclass sets ``info``,
    ``obs_norm``, ``actor`` and ``critic`` (modules on the features), ``log_std`` for continuous
    actions, and defines ``_features(obs)``."""

    info: SpaceInfo

    def _features(self, obs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(self._features(obs)).squeeze(-1)

    # ------------------------------------------------------------------ acting
    @torch.inference_mode()
    def act(self, obs: torch.Tensor, deterministic: bool = False):
        """Sample actions; returns ``(action, logp)``. No critic pass: the learner recomputes
        values itself, and a tiny CPU policy's cost is the number of ops, not their size."""
        return sample_action(self.actor(self._features(obs)), self.info.discrete,
                             getattr(self, "log_std", None), deterministic)

    # ------------------------------------------------------------------ learning
    def evaluate(self, obs: torch.Tensor, action: torch.Tensor):
        """``(logp, entropy, value, head_output)`` of given actions under the current weights."""
        x = self._features(obs)
        out = self.actor(x)
        value = self.critic(x).squeeze(-1)
        logp, entropy = action_logp_entropy(out, action, self.info.discrete, getattr(self, "log_std", None))
        return logp, entropy, value, out


class ActorCritic(ActorCriticHeads):
    """Separate MLP trunks for the actor and the critic on the flattened observation."""

    def __init__(self, info: SpaceInfo, cfg: "PolicyConfig"):
        super().__init__()
        self.info = info
        obs_dim = int(np.prod(info.obs_shape))
        self.obs_norm = RunningNorm((obs_dim,)) if cfg.obs_norm else None
        sizes = [obs_dim, *cfg.hidden]
        self.actor = _mlp(sizes, cfg.activation, info.n_actions, 0.01)
        self.critic = _mlp(sizes, cfg.activation, 1, 1.0)
        if not info.discrete:
            self.log_std = nn.Parameter(torch.full((info.n_actions,), float(cfg.init_log_std)))

    def _features(self, obs: torch.Tensor) -> torch.Tensor:
        obs = obs.reshape(obs.shape[0], -1).float()
        return self.obs_norm(obs) if self.obs_norm is not None else obs


def sample_action(out: torch.Tensor, discrete: bool, log_std: torch.Tensor | None, deterministic: bool = False):
    """``(action, logp)`` from a head's output: logits (categorical) or means (diagonal Gaussian)."""
    if discrete:
        logp_all = torch.log_softmax(out, -1)
        if deterministic:
            action = out.argmax(-1)
        elif out.is_cuda:  # exponential race (Gumbel-max): no host sync, so a CUDA graph can hold it
            action = (logp_all.exp() / torch.empty_like(logp_all).exponential_()).argmax(-1)
        else:
            action = torch.multinomial(logp_all.exp(), 1).squeeze(-1)
        return action, logp_all.gather(-1, action.unsqueeze(-1)).squeeze(-1)
    action = out if deterministic else out + log_std.exp() * torch.randn_like(out)
    return action, _gaussian_logp(action, out, log_std)


def action_logp_entropy(out: torch.Tensor, action: torch.Tensor, discrete: bool, log_std: torch.Tensor | None):
    """``(logp, entropy)`` of given actions under a head's output (any leading shape)."""
    if discrete:
        logp_all = torch.log_softmax(out, -1)
        logp = logp_all.gather(-1, action.long().unsqueeze(-1)).squeeze(-1)
        return logp, -(logp_all.exp() * logp_all).sum(-1)
    logp = _gaussian_logp(action, out, log_std)
    return logp, (0.5 + 0.5 * _LOG_2PI + log_std).sum(-1).expand(out.shape[:-1])


def _gaussian_logp(action: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    z = (action - mean) / log_std.exp()
    return (-0.5 * z.pow(2) - log_std - 0.5 * _LOG_2PI).sum(-1)
