"""The run's reported result is the value its stop rule met."""
import os

import numpy as np
import pytest
import yaml

from srl.config import experiment_from_dict
from srl.monitor import RLMonitor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_games_ending_while_the_workers_stop_do_not_change_the_reported_mean(tmp_path):
    cfg = experiment_from_dict(yaml.safe_load(open(os.path.join(ROOT, "configs", "cartpole_ppo.yaml"))),
                               ["stop.mean_return=18", "stop.env_steps=null"])
    monitor = RLMonitor(cfg, str(tmp_path))
    window = monitor.returns.maxlen
    monitor.returns.extend([17.0] * window)
    assert monitor.stop_reason(1.0) == ""
    monitor.returns.extend([19.0] * (window // 2))  # the mean reaches 18
    assert monitor.stop_reason(2.0) == "mean_return"
    reached = monitor.mean_return()
    monitor.returns.extend([-21.0, -21.0])  # games that finish during the shutdown
    assert monitor.mean_return() < 18 <= reached
    assert monitor.result(str(tmp_path), "mean_return", 3.0, 0).mean_return == reached
    assert monitor.result(str(tmp_path), "wall_s", 3.0, 0).mean_return == monitor.mean_return()  # other stops: live


def test_worker_seconds_become_fractions_of_wall_time_per_worker(tmp_path):
    cfg = experiment_from_dict(yaml.safe_load(open(os.path.join(ROOT, "configs", "cartpole_ppo.yaml"))),
                               ["workers.actors.count=4", "workers.policies.count=2"])
    monitor = RLMonitor(cfg, str(tmp_path))
    rng = np.random.default_rng(0)
    env_wait, reply_wait, busy = rng.uniform(0.1, 0.9, 4), rng.uniform(0.0, 0.1, 4), rng.uniform(0.2, 0.8, 2)
    for i in range(4):
        monitor.on_report(f"actor{i}", "actor", "stats", {"env_steps": 1, "env_wait_s": float(env_wait[i]),
                                                           "reply_wait_s": float(reply_wait[i])})
    for i in range(2):
        monitor.on_report(f"policy{i}", "policy", "stats", {"requests": 3, "busy_s": float(busy[i]), "forward_s": 0.1})
    monitor._mark -= 1.0  # the window is one second (plus the time this test takes)
    row = monitor.row()
    assert abs(row["perf/actor_env_wait"] - env_wait.mean()) < 0.01
    assert abs(row["perf/actor_reply_wait"] - reply_wait.mean()) < 0.01
    assert abs(row["perf/policy_busy"] - busy.mean()) < 0.01
    assert "perf/actor_env_wait" not in monitor.row()  # reset with the window
    with pytest.raises(ValueError, match="env_wait_s"):
        monitor.on_report("actor0", "actor", "stats", {"env_steps": 1, "env_wait_s": -1.0})
