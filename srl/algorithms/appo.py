"""APPO: PPO's clipped surrogate on V-trace targets (IMPALA, Espeholt et al. 2018; as in Sample
Factory's APPO).

Asynchronous actors act with weights a few versions old. V-trace corrects the value targets and
the advantages for that lag with truncated importance ratios of the current policy pi over the
behaviour policy mu that acted:

    rho_t = min(rho_bar, pi(a_t|x_t) / mu(a_t|x_t)),    c_t = lambda * min(c_bar, pi / mu)
    delta_t = rho_t * (r_t + gamma * V(x_{t+1}) - V(x_t))
    v_t - V(x_t) = delta_t + gamma * c_t * (v_{t+1} - V(x_{t+1}))          (the trace, backwards)
    A_t = rho_t * (r_t + gamma * v_{t+1} - V(x_t))                          (policy-gradient advantage)

Episode ends follow srl's sample layout, as :func:`srl.algorithms.ppo.gae` does: ``terminated``
drops the bootstrap term, ``done`` (terminated or truncated) cuts the trace, and after a done
``v_{t+1}`` is the plain value of the final observation (a truncated episode is bootstrapped from
it). Steps with ``valid = 0`` (resets) carry no transition: their reward is zero and the done
before them keeps them out of every other step's targets. With rho_bar, c_bar >= 1 and no lag
(pi = mu), ``v_t`` are GAE(lambda)'s returns, and ``A_t`` GAE's advantages when lambda = 1.

The targets are computed once per batch, with the weights at the start of its epochs; the
epochs, minibatches, losses and statistics are :class:`srl.algorithms.ppo.PPOLearner`'s.
"""
from __future__ import annotations

import torch

from srl.algorithms.ppo import PPOLearner
from srl.algorithms.steps import averages
from srl.errors import ConfigError


# --------------------------------------------------------------------------- ALGO LOGIC


def vtrace(log_rho: torch.Tensor, reward: torch.Tensor, value: torch.Tensor, next_value: torch.Tensor,
           terminated: torch.Tensor, done: torch.Tensor, gamma: float, lam: float = 1.0, rho_bar: float = 1.0,
           c_bar: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """V-trace over [T, B]; returns ``(vs, pg_adv)``: value targets and policy-gradient advantages.

    ``log_rho`` is log pi(a_t|x_t) - log mu(a_t|x_t); ``value[t]`` is V(x_t) and ``next_value[t]``
    V(x_{t+1}) (the final observation after a done)."""
    ratio = torch.exp(log_rho)
    rho = torch.clamp(ratio, max=rho_bar)
    c = lam * torch.clamp(ratio, max=c_bar)
    not_term, not_done = 1.0 - terminated, 1.0 - done
    delta = rho * (reward + gamma * not_term * next_value - value)
    vs_minus_v = torch.zeros_like(value)
    acc = torch.zeros_like(value[0])
    for t in reversed(range(value.shape[0])):
        acc = delta[t] + gamma * c[t] * not_done[t] * acc
        vs_minus_v[t] = acc
    vs = value + vs_minus_v
    # v_{t+1}: the next step's target inside an episode; the plain value after a done or at the end
    vs_next = not_done * torch.cat([vs[1:], next_value[-1:]]) + done * next_value
    pg_adv = rho * (reward + gamma * not_term * vs_next - value)
    return vs, pg_adv


# --------------------------------------------------------------------------- learner


class APPOLearner(PPOLearner):
    """PPOLearner whose advantages and value targets are V-trace's (``algorithm.rho_bar``,
    ``c_bar``, ``gae_lambda`` as lambda). Feed-forward policies (``mlp``, ``cnn``)."""

    def __init__(self, policy: torch.nn.Module, *args, **kwargs):
        if getattr(policy, "recurrent", False):
            raise ConfigError("algorithm.type",
                              "appo takes feed-forward policies (mlp, cnn); use ppo for memory policies")
        super().__init__(policy, *args, **kwargs)
        self._vtrace_stats: dict[str, float] = {}
        self._logp: torch.Tensor | None = None

    def _values(self, b: dict[str, torch.Tensor], T: int, B: int) -> torch.Tensor:
        """The critic's values [T + 1, B] and, from the same forward pass, the current policy's
        log-probabilities of the actions taken (kept for :meth:`_advantages`)."""
        obs, action = b["obs"], b["action"]
        logp, _, value, _ = self.policy.evaluate(obs[:T].reshape(T * B, *obs.shape[2:]),
                                                 action.reshape(T * B, *action.shape[2:]))
        self._logp = logp.reshape(T, B).float()
        return torch.cat([value.reshape(T, B), self.policy.value(obs[T]).reshape(1, B)])

    def _advantages(self, b: dict[str, torch.Tensor], reward: torch.Tensor, values: torch.Tensor,
                    terminated: torch.Tensor, done: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """V-trace from the current critic's ``values`` [T + 1, B] and the current policy's
        log-probabilities of the actions taken (both from :meth:`_values`)."""
        T, B = reward.shape
        logp, self._logp = self._logp, None
        valid = b["valid"].float()
        log_rho = (logp - b["logp"].float()) * valid  # resets carry no transition: ratio 1 there
        a = self.algo
        vs, pg_adv = vtrace(log_rho, reward, values[:T], values[1:], terminated, done, a.gamma, a.gae_lambda,
                            a.rho_bar, a.c_bar)
        n = valid.sum().clamp_min(1.0)
        ratio = torch.exp(log_rho)
        self._vtrace_stats = {"losses/vtrace_rho_mean": (ratio * valid).sum() / n,
                              "losses/vtrace_rho_clipped": ((ratio > a.rho_bar).float() * valid).sum() / n}
        return pg_adv, vs

    def train(self, batch: dict) -> dict[str, float]:
        stats = super().train(batch)
        stats.update(averages(self._vtrace_stats, 1))
        return stats
