"""Atari through ale-py's C++ vector env: the env contract srl relies on (uint8 frames, episodic
life that ends training episodes but not games, clipped training rewards beside raw scores), the
config's one-line errors, and a short APPO run with a tiny CNN through actors, a policy worker and
the trainer, with uint8 observations checked where they arrive."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("ale_py")

from srl import registry  # noqa: E402
from srl.algorithms.appo import APPOLearner  # noqa: E402
from srl.config import EnvConfig, PolicyConfig, experiment_from_dict  # noqa: E402
from srl.envs.atari import GAME_OVER, SCORE  # noqa: E402
from srl.envs.vector import make_vector_env, space_info, step_signals  # noqa: E402
from srl.errors import ConfigError  # noqa: E402
from srl.experiment import controller_for  # noqa: E402
from srl.policies.cnn import CNNActorCritic  # noqa: E402
from srl.system.checkpoint import load_latest  # noqa: E402
from srl.workers.eval import _make_env as _make_eval_env  # noqa: E402

TINY_CNN = {"type": "cnn", "channels": [4, 8, 8], "hidden": [32]}


def _play(env_id: str, steps: int, n: int = 2, **kwargs):
    env = make_vector_env(EnvConfig(id=env_id, kwargs={"repeat_action_probability": 0.0, **kwargs}), n, seed=3)
    rng = np.random.default_rng(0)
    out = []
    for _ in range(steps):
        action = rng.integers(0, env.single_action_space.n, n)
        obs, reward, terminated, truncated, info = env.step(action)
        out.append((obs, reward, terminated, truncated, info))
    env.close()
    return env, out


def test_frames_are_uint8_stacks_and_the_space_says_so():
    env, steps = _play("ALE/Pong-v5", 3)
    info = space_info(env.single_observation_space, env.single_action_space, "ALE/Pong-v5")
    assert info.obs_shape == (4, 84, 84) and info.obs_dtype == "uint8" and info.discrete and info.n_actions == 6
    obs = steps[-1][0]
    assert obs.dtype == np.uint8 and obs.shape == (2, 4, 84, 84) and obs.max() > 0
    cartpole = make_vector_env(EnvConfig(id="CartPole-v1"), 1)
    assert space_info(cartpole.single_observation_space, cartpole.single_action_space).obs_dtype == "float32"


def test_episodic_life_ends_training_episodes_not_games():
    """Breakout: a lost life is ``terminated`` (no bootstrap) while the game goes on (no reset,
    lives keep falling); a game over resets. Without episodic life only game overs terminate."""
    _, steps = _play("ALE/Breakout-v5", 400)
    lives = np.stack([s[4]["lives"] for s in steps])
    terminated = np.stack([s[2] for s in steps])
    game_over = np.stack([s[4][GAME_OVER] for s in steps])
    life_lost = terminated & ~game_over
    assert life_lost.sum() >= 4 and game_over.sum() >= 1
    t, e = np.argwhere(life_lost)[0]
    assert lives[t + 1, e] == lives[t, e]  # the next step continues the game: no reset to 5 lives
    assert (lives[:-1][game_over[:-1]] == 0).all()
    _, plain = _play("ALE/Breakout-v5", 400, episodic_life=False)
    plain_terminated = np.stack([s[2] for s in plain])
    assert (plain_terminated == np.stack([s[4][GAME_OVER] for s in plain])).all()  # negative control
    assert plain_terminated.sum() < terminated.sum()


def test_training_rewards_are_clipped_scores_are_not():
    _, steps = _play("ALE/SpaceInvaders-v5", 300)
    score = np.stack([s[4][SCORE] for s in steps])
    reward = np.stack([s[1] for s in steps])
    assert score.max() > 1  # space invaders pays 5 to 30 a hit
    np.testing.assert_array_equal(reward, np.sign(score))
    reported, resets = step_signals(reward, np.zeros(2, bool), steps[0][4])
    assert reported is steps[0][4][SCORE] and resets is steps[0][4][GAME_OVER]
    _, raw = _play("ALE/SpaceInvaders-v5", 300, reward_clipping=False)
    assert max(s[1].max() for s in raw) > 1  # negative control: unclipped when asked


def _experiment(tmp_path, **over) -> dict:
    return {
        "name": "atari-test", "seed": 1,
        "env": {"id": "ALE/Breakout-v5", "kwargs": {"repeat_action_probability": 0.0}},
        "policy": dict(TINY_CNN),
        "algorithm": {"type": "appo", "epochs": 1, "minibatches": 2, "batch_size": 512, "ent_coef": 0.01},
        "workers": {"actors": {"count": 2, "envs_per_actor": 8, "ring": 2, "rollout_len": 32, "inline_policy": False},
                    "policies": {"count": 1}, "trainers": {"count": 1}},
        "stop": {"env_steps": 4000},
        "log": {"dir": str(tmp_path), "tensorboard": False, "console": False, "every_s": 0.5},
        **over,
    }


@pytest.mark.parametrize("field, value, message", [
    ("env", {"id": "CartPole-v1", "vectorize": "ale"}, "env.vectorize: ale needs an ALE/... id"),
    ("env", {"id": "ALE/Pong-v5", "kwargs": {"stack": 4}}, "env.kwargs.stack: unknown ALE vector env argument"),
    ("env", {"id": "ALE/Pong-v5", "kwargs": {"num_envs": 4}}, "env.kwargs.num_envs: is set by srl"),
    ("env", {"id": "ALE/Pong-v5", "kwargs": {"episodic_life": "yes"}},
     "env.kwargs.episodic_life: must be true or false"),
    ("env", {"id": "ALE/Pongg-v5"}, "did you mean 'ALE/Pong-v5'"),
    ("policy", {**TINY_CNN, "autocast": "fp8"}, "policy.autocast: must be none or bf16"),
    ("policy", {**TINY_CNN, "channels": [4, 8]}, "policy.channels: must be three channel counts in [1, 4096]"),
    ("policy", {**TINY_CNN, "obs_norm": True}, "policy.obs_norm: cnn scales uint8 pixels"),
    ("algorithm", {"type": "appo", "rho_bar": 1.0, "c_bar": 2.0}, "algorithm.c_bar: must be in (0.0, 1.0]"),
    ("algorithm", {"type": "apo"}, "did you mean 'appo'"),
])
def test_bad_config_is_one_line_naming_the_field(tmp_path, field, value, message):
    with pytest.raises(ConfigError) as err:
        experiment_from_dict(_experiment(tmp_path, **{field: value}))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cnn_refuses_observations_it_cannot_see():
    cartpole = make_vector_env(EnvConfig(id="CartPole-v1"), 1)
    info = space_info(cartpole.single_observation_space, cartpole.single_action_space)
    with pytest.raises(ConfigError, match="policy.type: cnn needs"):
        CNNActorCritic(info, PolicyConfig(**TINY_CNN))


def test_cnn_scales_uint8_inside():
    env, steps = _play("ALE/Pong-v5", 2)
    info = space_info(env.single_observation_space, env.single_action_space)
    policy = CNNActorCritic(info, PolicyConfig(**TINY_CNN))
    obs = torch.from_numpy(steps[-1][0])
    want = policy.critic(policy.trunk(obs.float() / 255.0)).squeeze(-1)
    torch.testing.assert_close(policy.value(obs), want)
    unscaled = CNNActorCritic(dataclasses.replace(info, obs_dtype="float32"), PolicyConfig(**TINY_CNN))
    unscaled.load_state_dict(policy.state_dict())
    assert not torch.allclose(unscaled.value(obs), want)  # negative control: a float env's pixels are taken as they are


class _ProbeLearner(APPOLearner):
    """Records what reaches the learner: the dtype and shape of every batch's observations."""

    out_dir = ""

    def train(self, batch):
        with open(os.path.join(self.out_dir, f"trainer-{os.getpid()}.jsonl"), "a") as fh:
            fh.write(json.dumps({"dtype": str(batch["obs"].dtype), "shape": list(batch["obs"].shape)}) + "\n")
        return super().train(batch)


class _ProbePolicy(CNNActorCritic):
    """Records the dtype of the observations the policy worker's forward pass gets."""

    out_dir = ""

    def act(self, obs, deterministic=False):
        if self.out_dir:
            with open(os.path.join(self.out_dir, f"act-{os.getpid()}.txt"), "a") as fh:
                fh.write(f"{obs.dtype}\n")
        return super().act(obs, deterministic)


def test_short_appo_run_with_a_tiny_cnn_through_the_whole_dataflow(tmp_path):
    probes = tmp_path / "probes"
    probes.mkdir()
    _ProbeLearner.out_dir = _ProbePolicy.out_dir = str(probes)
    registry.register_learner("appo_probe_atari", _ProbeLearner)
    registry.register_policy("cnn_probe_atari", _ProbePolicy)
    try:
        data = _experiment(tmp_path)
        data["algorithm"]["type"] = "appo_probe_atari"
        data["policy"]["type"] = "cnn_probe_atari"
        result = controller_for(experiment_from_dict(data), str(tmp_path / "run")).run()
    finally:
        registry._USER["learner"].pop("appo_probe_atari", None)
        registry._USER["policy"].pop("cnn_probe_atari", None)
    assert result.env_steps >= 4000
    batches = [json.loads(line) for f in probes.glob("trainer-*.jsonl") for line in open(f)]
    assert len(batches) >= 3
    assert all(b["dtype"] == "torch.uint8" and b["shape"][2:] == [4, 84, 84] for b in batches)
    acts = {line.strip() for f in probes.glob("act-*.txt") for line in open(f)}
    assert acts == {"torch.uint8"}
    rows = [json.loads(line) for line in open(os.path.join(result.run_dir, "metrics.jsonl"))]
    learned = [r for r in rows if "losses/vtrace_rho_mean" in r]
    assert learned and all(np.isfinite(r["losses/policy_loss"]) for r in learned)
    episodes = [json.loads(line) for line in open(os.path.join(result.run_dir, "episodes.jsonl"))]
    assert episodes  # whole games of five lives: a random player's is 100+ steps, one life's about 25
    assert np.mean([e["length"] for e in episodes]) > 80
    # srl eval's env (gymnasium's wrappers around one game) fits the trained weights
    env = _make_eval_env("ALE/Breakout-v5", data["env"]["kwargs"], False)
    policy = CNNActorCritic(space_info(env.observation_space, env.action_space), PolicyConfig(**TINY_CNN))
    policy.load_state_dict(load_latest(result.run_dir).weights)
    obs, _ = env.reset(seed=0)
    action, _ = policy.act(torch.as_tensor(obs, dtype=torch.float32)[None], deterministic=True)
    assert env.step(int(action[0]))[0].shape == (4, 84, 84)


@pytest.mark.gpu
def test_cnn_channels_last_and_bf16_match_float32_on_cuda():
    """The GPU paths compute the same function: channels-last exactly, bf16 within its precision."""
    env, steps = _play("ALE/Pong-v5", 2)
    info = space_info(env.single_observation_space, env.single_action_space)
    nature = {"type": "cnn", "channels": [32, 64, 64], "hidden": [512]}
    plain = CNNActorCritic(info, PolicyConfig(**nature)).cuda()
    obs = torch.from_numpy(steps[-1][0]).cuda()
    action = torch.zeros(len(obs), dtype=torch.long, device="cuda")
    want = plain.evaluate(obs, action)
    for fast, tol in (({"channels_last": True}, 1e-4), ({"channels_last": True, "autocast": "bf16"}, 3e-2)):
        policy = CNNActorCritic(info, PolicyConfig(**nature, **fast)).cuda()
        policy.load_state_dict(plain.state_dict())
        got = policy.evaluate(obs, action)
        for a, b in zip(got[:3], want[:3]):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
