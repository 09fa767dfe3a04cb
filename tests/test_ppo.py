"""PPO's pieces against hand-computed values, and the learner on a toy problem."""
import numpy as np
import pytest
import torch

from srl.algorithms.ppo import PPOLearner, gae, policy_loss, value_loss
from srl.config import AlgorithmConfig, OptimizerConfig, PolicyConfig
from srl.envs.vector import SpaceInfo
from srl.policies.mlp import ActorCritic


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_gae_by_hand_with_termination_and_truncation():
    gamma, lam = 0.9, 0.8
    # one env, 4 steps: r=[1,2,3,4], V(s_t)=[.5,.6,.7,.8], V(s_{t+1})=[.6,.7,.9,1.0]
    # step 1 terminates (no bootstrap, cut), step 3 truncates (bootstrap from V=1.0, cut)
    r, v, nv = t([[1.0], [2.0], [3.0], [4.0]]), t([[0.5], [0.6], [0.7], [0.8]]), t([[0.6], [0.7], [0.9], [1.0]])
    term, done = t([[0.0], [1.0], [0.0], [0.0]]), t([[0.0], [1.0], [0.0], [1.0]])
    adv, ret = gae(r, v, nv, term, done, gamma, lam)
    d3 = 4 + 0.9 * 1.0 - 0.8
    d2 = 3 + 0.9 * 0.9 - 0.7
    a2 = d2 + 0.9 * 0.8 * d3
    d1 = 2 - 0.6
    d0 = 1 + 0.9 * 0.6 - 0.5
    a0 = d0 + 0.9 * 0.8 * d1
    np.testing.assert_allclose(adv[:, 0].numpy(), [a0, d1, a2, d3], rtol=1e-12)
    np.testing.assert_allclose(ret.numpy(), (adv + v).numpy())


def test_gae_with_lambda_one_is_discounted_return_minus_value():
    rng = np.random.default_rng(0)
    T, B, gamma = 6, 3, 0.97
    r = t(rng.standard_normal((T, B)))
    v = t(rng.standard_normal((T, B)))
    nv = torch.cat([v[1:], t(rng.standard_normal((1, B)))])
    zeros = torch.zeros(T, B, dtype=torch.float64)
    adv, _ = gae(r, v, nv, zeros, zeros, gamma, 1.0)
    expected = np.zeros((T, B))
    for b in range(B):
        for s in range(T):
            g = sum(gamma ** (k - s) * r[k, b].item() for k in range(s, T)) + gamma ** (T - s) * nv[-1, b].item()
            expected[s, b] = g - v[s, b].item()
    np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-10)


def test_clipped_surrogate_by_hand():
    logp = t([np.log(1.5), np.log(0.5), np.log(1.1)])
    old = t([0.0, 0.0, 0.0])
    adv = t([1.0, -2.0, 3.0])
    # ratio 1.5 (A>0): min(1.5, 1.2)*1 = 1.2 ; ratio 0.5 (A<0): min(-1.0, -1.6) = -1.6 ; ratio 1.1: 3.3
    expected = -(1.2 - 1.6 + 3.3) / 3
    assert policy_loss(logp, old, adv, 0.2).item() == pytest.approx(expected, rel=1e-12)


def test_value_loss_with_and_without_clipping():
    value, old, ret = t([2.0, 0.0]), t([1.0, 0.5]), t([3.0, 1.0])
    assert value_loss(value, old, ret, None).item() == pytest.approx(0.5 * (1.0 + 1.0) / 2)
    # clipped values: 1.2 and 0.3 -> (1.8^2, 0.7^2); max with unclipped (1, 1) -> 3.24, 1.0
    assert value_loss(value, old, ret, 0.2).item() == pytest.approx(0.5 * (3.24 + 1.0) / 2)


def _bandit_batch(policy, T=16, B=8, seed=0):
    """A one-step bandit: action 1 pays 1, action 0 pays 0; every step ends the episode."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.ones(T + 1, B, 2)
    with torch.no_grad():
        logits = policy.actor(obs[:T].reshape(-1, 2))
        probs = torch.softmax(logits, -1)
        action = torch.multinomial(probs, 1, generator=g).squeeze(-1)
        logp = torch.log(probs.gather(-1, action[:, None]).squeeze(-1))
    reward = action.float()
    ones = np.ones((T, B), bool)
    return {"obs": obs.numpy(), "action": action.reshape(T, B).numpy(), "logp": logp.reshape(T, B).numpy(),
            "reward": reward.reshape(T, B).numpy(), "terminated": ones, "truncated": ~ones, "valid": ones}


@pytest.mark.parametrize("optimizer", ["adam", "sophia"])
def test_learner_prefers_the_paying_action(optimizer):
    torch.manual_seed(0)
    info = SpaceInfo((2,), True, 2)
    policy = ActorCritic(info, PolicyConfig(hidden=[16]))
    lr = 0.01 if optimizer == "adam" else 0.003
    learner = PPOLearner(policy, AlgorithmConfig(epochs=2, minibatches=2), OptimizerConfig(type=optimizer, lr=lr))
    p0 = torch.softmax(policy.actor(torch.ones(1, 2)), -1)[0, 1].item()
    for i in range(30):
        stats = learner.train(_bandit_batch(policy, seed=i))
    p1 = torch.softmax(policy.actor(torch.ones(1, 2)), -1)[0, 1].item()
    assert p1 > max(0.9, p0 + 0.3), (p0, p1)
    assert np.isfinite(stats["losses/policy_loss"]) and learner.env_steps == 30 * 16 * 8


def _train_once(batch):
    torch.manual_seed(0)
    policy = ActorCritic(SpaceInfo((2,), True, 2), PolicyConfig(hidden=[8]))
    learner = PPOLearner(policy, AlgorithmConfig(epochs=1, minibatches=1), OptimizerConfig(lr=0.01))
    learner.train(batch)
    return learner, torch.cat([p.detach().flatten() for p in policy.parameters()])


def test_invalid_autoreset_steps_are_ignored():
    torch.manual_seed(0)
    batch = _bandit_batch(ActorCritic(SpaceInfo((2,), True, 2), PolicyConfig(hidden=[8])))
    batch["valid"][1::2] = False
    learner, params = _train_once(batch)
    assert learner.env_steps == 8 * 8
    garbage = {k: v.copy() for k, v in batch.items()}
    garbage["reward"][1::2] = 1e6  # whatever sits on reset steps must not reach the loss
    garbage["action"][1::2] = 1 - garbage["action"][1::2]
    garbage["logp"][1::2] = -50.0
    _, params_garbage = _train_once(garbage)
    torch.testing.assert_close(params, params_garbage)
    control = {k: v.copy() for k, v in garbage.items()}
    control["valid"][:] = True  # negative control: counted as transitions, the garbage does matter
    _, params_control = _train_once(control)
    assert not torch.allclose(params, params_control)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])  # fused Adam skips on the device; SGD on the host
def test_a_non_finite_minibatch_is_skipped_and_a_finite_one_is_not(optimizer):
    torch.manual_seed(0)
    policy = ActorCritic(SpaceInfo((2,), True, 2), PolicyConfig(hidden=[16]))
    learner = PPOLearner(policy, AlgorithmConfig(epochs=1, minibatches=2), OptimizerConfig(type=optimizer, lr=0.01))
    assert bool(learner.optimizer.defaults.get("fused")) == (optimizer == "adam")  # the device path is tested
    before = [p.detach().clone() for p in policy.parameters()]
    poisoned = _bandit_batch(policy, seed=1)
    poisoned["reward"] = np.full_like(poisoned["reward"], np.nan)  # every advantage and loss is NaN
    stats = learner.train(poisoned)
    assert stats["losses/skipped_steps"] == 2 and learner.skipped_steps == 2
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))  # not a single weight moved
    stats = learner.train(_bandit_batch(policy, seed=2))
    assert learner.skipped_steps == 2 and np.isfinite(stats["losses/policy_loss"])
    assert not all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    assert all(torch.isfinite(p).all() for p in policy.parameters())


def _minibatch(rng, m: int, obs_dim: int = 3, n_actions: int = 4) -> dict[str, torch.Tensor]:
    t32 = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    return {"obs": t32(rng.normal(0, 1, (m, obs_dim))), "action": torch.as_tensor(rng.integers(0, n_actions, m)),
            "logp": t32(-rng.uniform(0.5, 2.0, m)), "adv": t32(rng.normal(0, 1, m)),
            "ret": t32(rng.normal(0, 1, m)), "value": t32(rng.normal(0, 1, m))}


def _pair(algo: AlgorithmConfig):
    import copy

    torch.manual_seed(3)
    policy = ActorCritic(SpaceInfo((3,), True, 4), PolicyConfig(hidden=[16]))
    make = lambda p: PPOLearner(p, algo, OptimizerConfig(type="adam", lr=0.01))  # noqa: E731
    return make(policy), make(copy.deepcopy(policy))


@pytest.mark.parametrize("m", [37, 1])
def test_a_padded_weighted_step_is_the_eager_step(m):
    """The graphed step's body on a minibatch padded with rows of zeros of weight 0 moves the
    weights and reports the statistics exactly as the eager step on the real rows does."""
    from srl.algorithms.graphed_step import STATS, padded

    rng = np.random.default_rng(m)
    algo = AlgorithmConfig(epochs=1, minibatches=1, clip=0.2, value_clip=0.2, ent_coef=0.01)
    eager, graphed = _pair(algo)
    mb = _minibatch(rng, m)
    size = padded(m)
    assert size % 64 == 0 and size >= m
    inputs = {k: torch.cat([v, torch.zeros((size - m, *v.shape[1:]), dtype=v.dtype)]) for k, v in mb.items()}
    weight = torch.cat([torch.ones(m), torch.zeros(size - m)])
    want = eager._minibatch_step(dict(mb))
    got = graphed._graph_body(inputs, weight)
    for a, b in zip(eager.policy.parameters(), graphed.policy.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for name, value in zip(STATS, got.tolist()):
        assert value == pytest.approx(float(want[name]), rel=1e-4, abs=1e-6), name
    _, control = _pair(algo)
    control._graph_body(inputs, torch.ones(size))  # negative control: the padding rows weigh in
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(eager.policy.parameters(), control.policy.parameters()))


@pytest.mark.gpu
def test_gpu_graphed_learner_trains_as_the_eager_learner():
    torch.manual_seed(0)
    batches = [_bandit_batch(ActorCritic(SpaceInfo((2,), True, 2), PolicyConfig(hidden=[16])), seed=i) for i in range(4)]
    for b in batches:
        b["valid"][::5] = False  # minibatch sizes that need padding
    params = {}
    for graphed in (False, True):
        torch.manual_seed(1)
        policy = ActorCritic(SpaceInfo((2,), True, 2), PolicyConfig(hidden=[16]))
        learner = PPOLearner(policy, AlgorithmConfig(epochs=2, minibatches=3, cuda_graph=graphed),
                             OptimizerConfig(type="adam", lr=0.01, anneal_lr=True), device="cuda", total_env_steps=2000)
        assert (learner.graphed is not None) == graphed
        stats = [learner.train(b) for b in batches]
        params[graphed] = torch.cat([p.detach().flatten() for p in policy.parameters()])
        assert learner.updates == 4 * 2 * 3
    torch.testing.assert_close(params[True], params[False], rtol=1e-4, atol=1e-5)
    assert np.isfinite(stats[-1]["losses/policy_loss"])


def test_a_failed_graph_capture_leaves_the_learner_stepping_eagerly(monkeypatch):
    from srl.algorithms.graphed_step import GraphedMinibatchStep

    torch.manual_seed(0)
    policy = ActorCritic(SpaceInfo((2,), True, 2), PolicyConfig(hidden=[16]))
    learner = PPOLearner(policy, AlgorithmConfig(epochs=1, minibatches=2), OptimizerConfig(type="adam", lr=0.01))
    learner.graphed = GraphedMinibatchStep(learner._graph_body, learner._graph_state, "cpu")

    def broken(*args):
        raise RuntimeError("operation failed due to a previous error during capture")

    monkeypatch.setattr(learner.graphed, "_capture", broken)
    before = [p.detach().clone() for p in policy.parameters()]
    with pytest.warns(UserWarning, match="stepping eagerly"):
        stats = learner.train(_bandit_batch(policy))
    assert learner.graphed is None and learner.updates == 2 and np.isfinite(stats["losses/policy_loss"])
    assert not all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))
