"""Stable-Baselines3 PPO on CartPole-v1 with the rl-zoo hyperparameters.

Stops once the mean return over the last 20 finished episodes reaches 475 and
prints ``final: env_steps=N mean_return=R wall_s=S`` (S from process launch).

Usage: .venv-sb3/bin/python sb3_cartpole.py --seed 1
"""

import peer_common  # first: records the launch time before heavy imports

import argparse
import time

import stable_baselines3
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env

# rl-baselines3-zoo hyperparams/ppo.yml, CartPole-v1 (marked "Tuned" there).
ZOO = dict(
    n_envs=8,
    n_timesteps=100_000,
    n_steps=32,
    batch_size=256,
    gae_lambda=0.8,
    gamma=0.98,
    n_epochs=20,
    ent_coef=0.0,
    learning_rate=0.001,  # linear decay to 0 over n_timesteps ("lin_0.001")
    clip_range=0.2,  # linear decay to 0 over n_timesteps ("lin_0.2")
)


def linear(start: float):
    """Schedule in the zoo's sense: value * progress_remaining (1 -> 0)."""
    def schedule(progress_remaining: float) -> float:
        return progress_remaining * start
    return schedule


class StopAt475(BaseCallback):
    def __init__(self, rule: peer_common.StopRule) -> None:
        super().__init__()
        self.rule = rule

    def _on_step(self) -> bool:
        for info in self.locals["infos"]:
            episode = info.get("episode")  # set by the Monitor wrapper at episode end
            if episode is not None and self.rule.add(episode["r"]):
                self.env_steps_at_stop = self.num_timesteps
                return False
        return True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    env = make_vec_env("CartPole-v1", n_envs=ZOO["n_envs"], seed=args.seed)
    model = PPO(
        "MlpPolicy",
        env,
        n_steps=ZOO["n_steps"],
        batch_size=ZOO["batch_size"],
        gae_lambda=ZOO["gae_lambda"],
        gamma=ZOO["gamma"],
        n_epochs=ZOO["n_epochs"],
        ent_coef=ZOO["ent_coef"],
        learning_rate=linear(ZOO["learning_rate"]),
        clip_range=linear(ZOO["clip_range"]),
        seed=args.seed,
        device="cpu",
        verbose=0,
    )
    rule = peer_common.StopRule()
    callback = StopAt475(rule)
    t_train_start = time.time()
    model.learn(total_timesteps=ZOO["n_timesteps"], callback=callback)
    env_steps = getattr(callback, "env_steps_at_stop", model.num_timesteps)
    peer_common.report(
        rule, env_steps, t_train_start,
        extra={"peer": "sb3", "version": stable_baselines3.__version__, "seed": args.seed},
    )


if __name__ == "__main__":
    main()
