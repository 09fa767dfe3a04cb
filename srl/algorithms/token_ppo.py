"""PPO over tokens for language-model policies: a value head, per-token GAE, clipped surrogate.

``algorithm: {type: ppo}`` on a token task (with ``policy.lm.value_head: true``). Each completion
is an episode whose actions are its tokens: the state before token t is the prompt and the tokens
before t, the critic is the LM's value head read at that state, and the reward (the task's score
of the whole completion) arrives with the last token (the first eos, or the last token generated).
Advantages are GAE over the completion's tokens with ``algorithm.gamma`` / ``gae_lambda``
(normalized over the batch's tokens when ``norm_adv``); the loss is the clipped surrogate per token
plus ``vf_coef`` times the value loss, both averaged over each completion's tokens and then over
completions, like GRPO's, plus GRPO's optional KL to the frozen initial policy.

Batches, log-probabilities, epochs and minibatches are :class:`GRPOLearner`'s; this learner
changes the advantages and the loss.
"""
from __future__ import annotations

import torch

from srl.algorithms.grpo import GRPOLearner, grpo_loss, masked_sequence_mean
from srl.generation.sampling import token_log_probs


def token_gae(reward: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
              lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both (B, N), of completions scored ``reward`` (B,) at their last
    token. ``values`` (B, N): the critic before each token; ``mask`` (B, N) a prefix of valid
    tokens per row. After the last token the episode ends (value 0); masked slots get 0."""
    m = mask.to(values.dtype)
    B, N = values.shape
    last = mask.long().sum(1) - 1  # (B,), -1 for an empty completion
    r = torch.zeros_like(values)
    r[torch.arange(B, device=values.device), last.clamp_min(0)] = reward.to(values.dtype) * (last >= 0)
    next_value = torch.cat([values[:, 1:] * m[:, 1:], values.new_zeros(B, 1)], 1)
    delta = (r + gamma * next_value - values) * m
    adv = torch.zeros_like(values)
    running = values.new_zeros(B)
    for t in range(N - 1, -1, -1):  # later slots of a row are masked (zero), so no reset is needed
        running = delta[:, t] + gamma * lam * running
        adv[:, t] = running
    adv = adv * m
    return adv, (adv + values) * m


class TokenPPOLearner(GRPOLearner):
    """PPO with a critic for token tasks; ``train(batch)`` as :class:`GRPOLearner`."""

    def __init__(self, policy: torch.nn.Module, *args, **kwargs):
        if getattr(policy, "value", None) is None:
            raise ValueError("algorithm.type ppo on a token task needs policy.lm.value_head: true (the critic)")
        super().__init__(policy, *args, **kwargs)

    def _logits_values(self, prompt: torch.Tensor, completion: torch.Tensor):
        """(logits (n, N, V), values (n, N)) of each completion token's state, in one causal pass."""
        tokens = torch.cat([prompt, completion], 1)[:, :-1]
        logits, values = self.policy.forward_with_value(tokens)
        P = prompt.shape[1]
        return logits[:, P - 1:], values[:, P - 1:].float()

    @torch.no_grad()
    def _advantages(self, flat: dict[str, torch.Tensor], reward: torch.Tensor) -> None:
        values = self._logits_values(flat["prompt"], flat["completion"])[1]
        adv, ret = token_gae(reward.float(), values, flat["mask"], self.algo.gamma, self.algo.gae_lambda)
        if self.algo.norm_adv and bool(flat["mask"].any()):
            valid = adv[flat["mask"]]
            adv = torch.where(flat["mask"], (adv - valid.mean()) / (valid.std(unbiased=False) + 1e-8), adv)
        flat["adv"], flat["ret"], flat["old_value"] = adv, ret, values

    def _loss(self, mb: dict[str, torch.Tensor]):
        algo = self.algo
        logits, values = self._logits_values(mb["prompt"], mb["completion"])
        logp = token_log_probs(logits, mb["completion"], self.sampling)
        loss, pg, kl = grpo_loss(logp, mb["logp"], mb["adv"], mb["mask"], algo.clip, mb.get("ref"), algo.kl_coef)
        v_err = (values - mb["ret"]).square()
        if algo.value_clip is not None:
            clipped = mb["old_value"] + (values - mb["old_value"]).clamp(-algo.value_clip, algo.value_clip)
            v_err = torch.max(v_err, (clipped - mb["ret"]).square())
        v_loss = 0.5 * masked_sequence_mean(v_err, mb["mask"])
        return loss + algo.vf_coef * v_loss, logp, {"losses/policy_loss": pg, "losses/kl": kl, "losses/value_loss": v_loss}
