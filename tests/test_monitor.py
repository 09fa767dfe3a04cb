"""The run's reported result is the value its stop rule met."""
import os

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
