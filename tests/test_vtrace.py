"""V-trace against hand-computed values and the definition's direct sum (float64), against GAE when
there is no policy lag, and the APPO learner end to end on a batch."""
import math

import numpy as np
import pytest
import torch

from srl.algorithms.appo import APPOLearner, vtrace
from srl.algorithms.ppo import PPOLearner, gae
from srl.config import AlgorithmConfig, OptimizerConfig, PolicyConfig
from srl.envs.vector import SpaceInfo
from srl.policies.mlp import ActorCritic

D = torch.float64


def _t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=D).reshape(len(rows), 1)


def test_vtrace_hand_computed():
    """T = 3, one env, gamma 0.9, ratios (2, 0.5, 1) clipped at 1; worked out by hand:
    rho = c = (1, 0.5, 1); delta = (1.4, -0.95, 5.7); v - V = (2.8535, 1.615, 5.7)."""
    log_rho = _t(math.log(2.0), math.log(0.5), 0.0)
    reward, value, next_value = _t(1.0, 0.0, 2.0), _t(0.5, 1.0, -1.0), _t(1.0, -1.0, 3.0)
    zeros = torch.zeros_like(reward)
    vs, adv = vtrace(log_rho, reward, value, next_value, zeros, zeros, gamma=0.9)
    torch.testing.assert_close(vs, _t(3.3535, 2.615, 4.7), rtol=0, atol=1e-12)
    # A_t = rho_t (r_t + gamma v_{t+1} - V_t); the last step bootstraps from V(x_T) = 3
    torch.testing.assert_close(adv, _t(1 + 0.9 * 2.615 - 0.5, 0.5 * (0.9 * 4.7 - 1.0), 2 + 0.9 * 3.0 + 1.0),
                               rtol=0, atol=1e-12)
    # negative controls: no ratio clipping, or no trace cut, give other numbers
    vs_unclipped, _ = vtrace(log_rho, reward, value, next_value, zeros, zeros, gamma=0.9, rho_bar=10.0, c_bar=10.0)
    assert not torch.allclose(vs_unclipped, vs)
    vs_lam, _ = vtrace(log_rho, reward, value, next_value, zeros, zeros, gamma=0.9, lam=0.5)
    assert not torch.allclose(vs_lam, vs)


def _direct_sum(log_rho, reward, value, next_value, terminated, done, gamma, lam, rho_bar, c_bar):
    """v_s = V(x_s) + sum_{t>=s} gamma^(t-s) (prod_{s<=i<t} c_i) delta_t, the sum stopping at the
    episode's end; written from the paper's definition, with no recursion."""
    ratio = np.exp(log_rho)
    rho, c = np.minimum(rho_bar, ratio), lam * np.minimum(c_bar, ratio)
    delta = rho * (reward + gamma * (1 - terminated) * next_value - value)
    T, B = reward.shape
    vs = value.copy()
    for b in range(B):
        for s in range(T):
            weight = 1.0
            for t in range(s, T):
                vs[s, b] += gamma ** (t - s) * weight * delta[t, b]
                if done[t, b]:
                    break
                weight *= c[t, b]
    adv = np.empty_like(vs)
    for b in range(B):
        for t in range(T):
            nxt = vs[t + 1, b] if t + 1 < T and not done[t, b] else next_value[t, b]
            adv[t, b] = rho[t, b] * (reward[t, b] + gamma * (1 - terminated[t, b]) * nxt - value[t, b])
    return vs, adv


def _random_case(rng, T=12, B=5, lag=True):
    terminated = (rng.random((T, B)) < 0.15).astype(np.float64)
    truncated = ((rng.random((T, B)) < 0.1) & (terminated == 0)).astype(np.float64)
    value = rng.normal(size=(T + 1, B))  # V of obs[0..T]: after a done, obs[t + 1] is the final observation
    return {
        "log_rho": rng.normal(0, 0.7, (T, B)) if lag else np.zeros((T, B)),
        "reward": rng.normal(size=(T, B)), "value": value[:T], "next_value": value[1:],
        "terminated": terminated, "done": np.maximum(terminated, truncated),
    }


@pytest.mark.parametrize("seed", range(4))
def test_vtrace_matches_definition_with_episode_ends(seed):
    rng = np.random.default_rng(seed)
    case = _random_case(rng)
    params = dict(gamma=0.97, lam=float(rng.uniform(0.5, 1.0)), rho_bar=float(rng.uniform(0.8, 2.0)))
    params["c_bar"] = params["rho_bar"] * 0.9
    want_vs, want_adv = _direct_sum(*case.values(), **params)
    vs, adv = vtrace(*(torch.tensor(v, dtype=D) for v in case.values()), **params)
    np.testing.assert_allclose(vs.numpy(), want_vs, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(adv.numpy(), want_adv, rtol=1e-12, atol=1e-12)
    # negative control: the same sums without the cut at episode ends disagree
    uncut = dict(case, done=np.zeros_like(case["done"]))
    vs_uncut, _ = vtrace(*(torch.tensor(v, dtype=D) for v in uncut.values()), **params)
    assert not np.allclose(vs_uncut.numpy(), want_vs)


@pytest.mark.parametrize("seed", range(3))
def test_vtrace_without_lag_is_gae(seed):
    """pi = mu, rho_bar = c_bar = 1: v_t are GAE(lambda)'s returns, and with lambda = 1 the
    policy-gradient advantages are GAE's advantages."""
    rng = np.random.default_rng(100 + seed)
    case = {k: torch.tensor(v, dtype=D) for k, v in _random_case(rng, lag=False).items()}
    args = (case["reward"], case["value"], case["next_value"], case["terminated"], case["done"])
    vs, adv = vtrace(case["log_rho"], *args, gamma=0.99, lam=1.0)
    gae_adv, gae_ret = gae(*args, gamma=0.99, lam=1.0)
    torch.testing.assert_close(vs, gae_ret, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(adv, gae_adv, rtol=1e-12, atol=1e-12)
    vs_l, adv_l = vtrace(case["log_rho"], *args, gamma=0.99, lam=0.9)
    gae_adv_l, gae_ret_l = gae(*args, gamma=0.99, lam=0.9)
    torch.testing.assert_close(vs_l, gae_ret_l, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(adv_l, gae_adv_l)  # with lambda < 1 the advantages are IMPALA's, not GAE's
    lagged, _ = vtrace(torch.full_like(case["log_rho"], -0.5), *args, gamma=0.99, lam=1.0)
    assert not torch.allclose(lagged, gae_ret)  # negative control: a lag changes the targets


def _batch(rng, info: SpaceInfo, T=8, B=4) -> dict[str, np.ndarray]:
    valid = np.ones((T, B), bool)
    terminated = rng.random((T, B)) < 0.1
    valid[1:][terminated[:-1]] = False  # the step after a done only resets
    return {"obs": rng.normal(size=(T + 1, B, *info.obs_shape)).astype(np.float32),
            "action": rng.integers(0, info.n_actions, (T, B)), "logp": np.zeros((T, B), np.float32),
            "reward": rng.normal(size=(T, B)).astype(np.float32), "terminated": terminated,
            "truncated": np.zeros((T, B), bool), "valid": valid}


def _learners(algo: AlgorithmConfig):
    info = SpaceInfo((3,), True, 2)
    torch.manual_seed(0)
    policy = ActorCritic(info, PolicyConfig(hidden=[8]))
    twin = ActorCritic(info, PolicyConfig(hidden=[8]))
    twin.load_state_dict(policy.state_dict())
    return info, APPOLearner(policy, algo, OptimizerConfig()), PPOLearner(twin, algo, OptimizerConfig())


def test_appo_learner_without_lag_takes_ppo_targets():
    """The learner's V-trace targets on a batch acted by the current weights are PPO's GAE
    targets (lambda = 1); a batch from an older policy gives other targets."""
    info, appo, ppo = _learners(AlgorithmConfig(type="appo", gae_lambda=1.0))
    rng = np.random.default_rng(0)
    batch = _batch(rng, info)
    b = {k: torch.as_tensor(v) for k, v in batch.items()}
    T, B = b["reward"].shape
    with torch.no_grad():
        flat = b["obs"][:T].reshape(T * B, -1)
        b["logp"] = appo.policy.evaluate(flat, b["action"].reshape(-1))[0].reshape(T, B)
        values = appo.policy.value(b["obs"].reshape((T + 1) * B, -1)).reshape(T + 1, B)
        # APPO's one forward pass gives the critic's values and the log-probs V-trace needs
        torch.testing.assert_close(appo._values(b, T, B), values)
    term, done = b["terminated"].float(), b["terminated"].float()
    reward = b["reward"] * b["valid"].float()
    adv, ret = appo._advantages(b, reward, values, term, done)
    want_adv, want_ret = ppo._advantages(b, reward, values, term, done)
    m = b["valid"]
    torch.testing.assert_close(adv[m], want_adv[m], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret[m], want_ret[m], rtol=1e-5, atol=1e-5)
    b["logp"] = b["logp"] - 0.7  # an older behaviour policy: pi / mu = e^0.7, clipped to 1 by rho_bar
    b["logp"][0] += 1.4  # ... except at t = 0, where pi / mu = e^-0.7
    with torch.no_grad():
        appo._values(b, T, B)
    adv_lag, _ = appo._advantages(b, reward, values, term, done)
    assert not torch.allclose(adv_lag[m], want_adv[m])


def test_appo_learner_trains():
    info, appo, _ = _learners(AlgorithmConfig(type="appo", epochs=2, minibatches=2))
    before = [p.detach().clone() for p in appo.policy.parameters()]
    stats = appo.train(_batch(np.random.default_rng(1), info))
    assert all(math.isfinite(stats[k]) for k in ("losses/policy_loss", "losses/value_loss", "losses/vtrace_rho_mean"))
    assert 0.0 <= stats["losses/vtrace_rho_clipped"] <= 1.0
    assert any(not torch.equal(a, p) for a, p in zip(before, appo.policy.parameters()))
