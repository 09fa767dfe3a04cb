"""PPO over tokens (``algorithm.type: ppo`` on a token task): per-token GAE against hand-computed
values, the critic requirement, and a learner that moves the policy toward a rewarded token."""
import numpy as np
import pytest
import torch
import yaml

from srl.algorithms.token_ppo import TokenPPOLearner, token_gae
from srl.config import experiment_from_dict
from srl.envs.tokens import build_task, sampling_params, task_space
from srl.errors import ConfigError
from srl.generation.sampling import token_log_probs
from srl.plan import build_learner
from srl.policies.lm_policy import LMPolicy
from test_rlhf import TINY


def _cfg(**over):
    data = yaml.safe_load(open(TINY))
    return experiment_from_dict(data, [f"{k}={v}" for k, v in over.items()])


def test_token_gae_matches_hand_computed_values():
    values = torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.6, 9.9]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    reward = torch.tensor([1.0, 0.5], dtype=torch.float64)
    adv, ret = token_gae(reward, values, mask, gamma=1.0, lam=1.0)  # Monte Carlo: R - V
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.8, 0.9], [0.2, -0.1, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 1.0], [0.5, 0.5, 0.0]], dtype=torch.float64))
    adv, _ = token_gae(reward[:1], values[:1], mask[:1], gamma=0.5, lam=0.5)
    # deltas 0.5*0.2-0.5 = -0.4, 0.5*0.1-0.2 = -0.15, 1-0.1 = 0.9; adv_t = delta_t + 0.25 adv_{t+1}
    torch.testing.assert_close(adv, torch.tensor([[-0.38125, 0.075, 0.9]], dtype=torch.float64))
    empty, _ = token_gae(reward[:1], values[:1], torch.zeros(1, 3, dtype=torch.bool), 1.0, 1.0)
    assert torch.equal(empty, torch.zeros(1, 3, dtype=torch.float64))


def test_ppo_on_tokens_needs_the_value_head_and_builds_the_token_learner():
    with pytest.raises(ConfigError, match="policy.lm.value_head"):
        _cfg(**{"algorithm.type": "ppo"})
    cfg = _cfg(**{"algorithm.type": "ppo", "policy.lm.value_head": "true"})
    policy = LMPolicy(task_space(cfg, build_task(cfg)), cfg.policy)
    assert isinstance(build_learner(policy, cfg, "cpu"), TokenPPOLearner)


def test_token_ppo_learns_to_emit_the_rewarded_token():
    """Completions whose first token is the target are rewarded: its probability climbs from
    chance (1/vocab) past 0.5 in a few dozen PPO batches sampled from the current policy."""
    torch.set_num_threads(1)
    cfg = _cfg(**{"algorithm.type": "ppo", "policy.lm.value_head": "true", "algorithm.epochs": 2,
                  "algorithm.gamma": 1.0, "algorithm.gae_lambda": 1.0})
    task = build_task(cfg)
    torch.manual_seed(0)
    policy = LMPolicy(task_space(cfg, build_task(cfg)), cfg.policy)
    params = sampling_params(cfg)
    learner = TokenPPOLearner(policy, cfg.algorithm, cfg.optimizer, sampling=params, task=task)
    rng, target, B, N = np.random.default_rng(0), 5, 32, 2
    gen = torch.Generator().manual_seed(1)

    def p_target(prompt):
        with torch.no_grad():
            return torch.softmax(policy(prompt)[:, -1].float(), -1)[:, target].mean().item()

    prompt = torch.from_numpy(task.sample_prompts(B, rng)).long()
    start = p_target(prompt)
    for step in range(40):
        prompt = torch.from_numpy(task.sample_prompts(B, rng)).long()
        completion = torch.zeros(B, 0, dtype=torch.long)
        with torch.no_grad():
            for _ in range(N):
                probs = torch.softmax(policy(torch.cat([prompt, completion], 1))[:, -1].float(), -1)
                completion = torch.cat([completion, torch.multinomial(probs, 1, generator=gen)], 1)
            logp = token_log_probs(policy.completion_logits(prompt, completion), completion, params)
        reward = (completion[:, 0] == target).double()
        batch = {"prompt": prompt.T, "completion": completion.T, "logp": logp.T, "mask": torch.ones(N, B, dtype=torch.bool),
                 "reward": reward[None], "version": torch.full((1, B), step), "valid": torch.ones(1, B, dtype=torch.bool)}
        stats = learner.train(batch)
    assert start < 0.1 and p_target(prompt) > 0.5, (start, p_target(prompt))
    assert np.isfinite(stats["losses/value_loss"])


def test_rlhf_tiny_learns_with_token_ppo_through_the_dataflow(tmp_path):
    """The same dataflow as GRPO's run (actors, speculative generation, draft worker), the
    trainer on PPO with the value head, until the mean reward clearly rises (random: ~0.06)."""
    from srl.experiment import Experiment

    data = yaml.safe_load(open(TINY))
    data["log"] = {"dir": str(tmp_path), "tensorboard": False, "console": False, "every_s": 0.5}
    cfg = experiment_from_dict(data, ["algorithm.type=ppo", "policy.lm.value_head=true", "stop.mean_return=0.3",
                                      "stop.wall_s=150"])
    result = Experiment(cfg, run_dir=str(tmp_path / "run")).run()
    assert result.reason == "mean_return" and result.mean_return > 0.2, result
