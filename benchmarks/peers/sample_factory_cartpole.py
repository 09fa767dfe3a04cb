"""Sample Factory APPO on CartPole-v1 with Sample Factory's CartPole example settings.

The flags are the ones in the docstring of Sample Factory's own
``sf_examples/train_gym_env.py`` CartPole-v1 example (everything else is Sample
Factory's default, e.g. num_workers = CPU count), plus ``--device=cpu`` since
the benchmark machine has no GPU.

Stops once the mean return over the last 20 finished episodes reaches 475 and
prints ``final: env_steps=N mean_return=R wall_s=S`` (S from process launch).

Usage: .venv-sample_factory/bin/python sample_factory_cartpole.py --seed 1
"""

import peer_common  # first: records the launch time before heavy imports

import argparse
import importlib.metadata
import os
import shutil
import sys
import tempfile
import time

import gymnasium as gym
from sample_factory.algo.utils.misc import EPISODIC
from sample_factory.cfg.arguments import parse_full_cfg, parse_sf_args
from sample_factory.envs.env_utils import register_env
from sample_factory.train import make_runner

# From the CartPole-v1 command line in sf_examples/train_gym_env.py (2.1.1).
EXAMPLE_FLAGS = [
    "--algo=APPO",
    "--use_rnn=False",
    "--num_envs_per_worker=20",
    "--policy_workers_per_policy=2",
    "--recurrence=1",
    "--with_vtrace=False",
    "--batch_size=512",
    "--reward_scale=0.1",
    "--save_every_sec=10",
    "--experiment_summaries_interval=10",
    "--env=CartPole-v1",
]


def make_cartpole(full_env_name, cfg=None, env_config=None, render_mode=None):
    return gym.make(full_env_name, render_mode=render_mode)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-env-steps", type=int, default=4_000_000)
    args, extra = parser.parse_known_args()

    train_dir = tempfile.mkdtemp(prefix="sf_cartpole_")
    argv = EXAMPLE_FLAGS + [
        "--device=cpu",
        f"--seed={args.seed}",
        f"--train_dir={train_dir}",
        f"--experiment=cartpole_seed{args.seed}",
        f"--train_for_env_steps={args.max_env_steps}",
    ] + extra

    register_env("CartPole-v1", make_cartpole)
    sf_parser, _ = parse_sf_args(argv=argv)
    cfg = parse_full_cfg(sf_parser, argv)
    cfg, runner = make_runner(cfg)

    rule = peer_common.StopRule()
    at_stop = {}
    raw_max = [0.0]

    def on_episode(runner, msg, policy_id):
        # One message per finished episode, sent by the rollout workers.
        if rule.reached:
            return
        reward = msg[EPISODIC]["reward"]  # raw env return (reward_scale applies in the learner)
        raw_max[0] = max(raw_max[0], reward)
        if rule.add(reward):
            at_stop["env_steps"] = runner.env_steps.get(0, 0)
            at_stop["samples_collected"] = runner.samples_collected[0]
            runner._stop_training()

    runner.register_episodic_stats_handler(on_episode)
    t_train_start = time.time()
    status = runner.init()
    if status == 0:
        status = runner.run()
    env_steps = at_stop.get("env_steps", runner.env_steps.get(0, 0))
    peer_common.report(
        rule, env_steps, t_train_start,
        extra={
            "peer": "sample_factory",
            "version": importlib.metadata.version("sample-factory"),
            "seed": args.seed,
            "samples_collected": at_stop.get("samples_collected", runner.samples_collected[0]),
            "num_workers": cfg.num_workers,
            "max_episode_return_seen": raw_max[0],
            "status": int(status),
        },
    )
    sys.stdout.flush()
    shutil.rmtree(train_dir, ignore_errors=True)  # checkpoints and summaries of this run
    os._exit(0)


if __name__ == "__main__":
    main()
