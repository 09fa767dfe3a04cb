"""An experiment built in Python with your own environment and policy classes.

    python examples/custom_env_policy.py [--steps 20000] [--backend local|ray]
"""
from __future__ import annotations

import argparse

import gymnasium
import numpy as np
import torch
from torch import nn

import srl
from srl.config import (ActorsConfig, AlgorithmConfig, ExperimentConfig, LogConfig, OptimizerConfig,
                        StopConfig, WorkersConfig)
from srl.policies import ActorCritic


class Corridor(gymnasium.Env):
    """Walk right along a corridor of ``length`` cells; +1 at the far end, -0.01 per step."""

    def __init__(self, length: int = 8):
        self.length = length
        self.observation_space = gymnasium.spaces.Box(0.0, 1.0, (length,), np.float32)
        self.action_space = gymnasium.spaces.Discrete(2)
        self.pos, self.t = 0, 0

    def _obs(self):
        obs = np.zeros(self.length, np.float32)
        obs[self.pos] = 1.0
        return obs

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.pos, self.t = 0, 0
        return self._obs(), {}

    def step(self, action):
        self.pos = int(np.clip(self.pos + (1 if action == 1 else -1), 0, self.length - 1))
        self.t += 1
        reached = self.pos == self.length - 1
        reward = 1.0 if reached else -0.01
        return self._obs(), reward, reached, self.t >= 4 * self.length, {}


class LayerNormPolicy(ActorCritic):
    """The built-in actor-critic with a LayerNorm + ReLU actor trunk of our own."""

    def __init__(self, info, cfg):
        super().__init__(info, cfg)
        obs_dim = int(np.prod(info.obs_shape))
        self.actor = nn.Sequential(nn.Linear(obs_dim, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, info.n_actions))


def build(steps: int) -> srl.Experiment:
    config = ExperimentConfig(
        name="corridor",
        seed=1,
        algorithm=AlgorithmConfig(gamma=0.97, gae_lambda=0.9, epochs=8, minibatches=2, batch_size=512),
        optimizer=OptimizerConfig(lr=3e-3),
        workers=WorkersConfig(actors=ActorsConfig(count=1, envs_per_actor=8, rollout_len=32)),
        stop=StopConfig(env_steps=steps),
        log=LogConfig(dir="runs", tensorboard=False),
    )
    return srl.Experiment(config, env=Corridor, policy=LayerNormPolicy)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--backend", default="local", choices=["local", "ray"])
    p.add_argument("--log-dir", default="runs")
    args = p.parse_args()
    exp = build(args.steps)
    exp.config.log.dir = args.log_dir
    exp.run_dir = srl.experiment.new_run_dir(exp.config)
    result = exp.run(backend=args.backend)
    print(result.final_line())
    print(f"run_dir={result.run_dir}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
