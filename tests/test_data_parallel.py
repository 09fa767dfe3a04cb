"""Data-parallel trainers, sticky routing and learners picked by name, in whole-system runs."""
import json
import os
import signal
import threading

import pytest

from srl import registry
from srl.algorithms.ppo import PPOLearner
from srl.config import experiment_from_dict
from srl.experiment import controller_for
from test_faults import _wait

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CARTPOLE = os.path.join(ROOT, "configs", "cartpole_ppo.yaml")


def _cfg(tmp_path, **over):
    import yaml

    data = yaml.safe_load(open(CARTPOLE))
    data["log"] = {"dir": str(tmp_path), "tensorboard": False, "console": False, "every_s": 0.2}
    return experiment_from_dict(data, [f"{k}={v}" for k, v in over.items()])


def _rows(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def test_two_trainers_reach_475_with_identical_weights(tmp_path):
    cfg = _cfg(tmp_path, **{"workers.trainers.count": 2, "workers.actors.count": 2})
    ctl = controller_for(cfg, str(tmp_path / "run"))
    result = ctl.run()
    assert result.reason == "mean_return" and result.mean_return >= 475
    last = _rows(ctl.run_dir)[-1]
    # every version both ranks trained is compared by the controller from their own reports
    assert last["trainer/digests_compared"] >= 10
    assert last["trainer/digest_mismatches"] == 0
    both = [ctl.worker_stats[f"trainer/{r}"] for r in range(2)]
    assert all(s["learned_steps"] >= 0 for s in both) and both[0]["version"] == both[1]["version"]


def test_kill_9_of_one_of_two_trainers_and_the_run_finishes(tmp_path):
    cfg = _cfg(tmp_path, **{"workers.trainers.count": 2, "workers.actors.count": 2, "stop.mean_return": "null",
                            "stop.env_steps": 10**8})
    ctl = controller_for(cfg, str(tmp_path / "run"))
    box = {}
    th = threading.Thread(target=lambda: box.setdefault("result", ctl.run()), daemon=True)
    th.start()
    try:
        _wait(lambda: ctl.worker_stats.get("trainer/1", {}).get("version", 0) >= 5)
        os.kill(ctl.scheduler.pid("trainer/1"), signal.SIGKILL)
        _wait(lambda: ctl.restarts >= 1)
        # the whole group came back from rank 0's checkpoint and learns on, in step
        _wait(lambda: all(ctl.worker_stats.get(f"trainer/{r}", {}).get("incarnation") == 1
                          and "version" in ctl.worker_stats[f"trainer/{r}"] for r in range(2)))
        back_at = ctl.worker_stats["trainer/0"]["version"]
        _wait(lambda: ctl.worker_stats["trainer/1"]["version"] >= back_at + 5)
        steps = ctl.counters["env_steps"]
        _wait(lambda: ctl.counters["env_steps"] > steps + 2000)
    finally:
        ctl.request_stop()
        th.join(timeout=60)
    result = box["result"]
    assert result.reason == "SIGINT" and result.restarts >= 1
    assert _rows(ctl.run_dir)[-1]["trainer/digest_mismatches"] == 0


@pytest.mark.parametrize("routing", ["sticky", "round_robin"])
def test_sticky_routing_keeps_every_env_on_one_policy_worker(tmp_path, routing):
    cfg = _cfg(tmp_path, **{"workers.actors.count": 2, "workers.actors.ring": 2, "workers.actors.inline_policy": "false",
                            "workers.policies.count": 2, "workers.policies.routing": routing,
                            "stop.mean_return": "null", "stop.env_steps": 6000})
    ctl = controller_for(cfg, str(tmp_path / "run"))
    ctl.run()
    served = [set(ctl.worker_stats[f"policy/{p}"]["envs"]) for p in range(2)]
    assert served[0] | served[1] == set(range(16))  # 2 actors x 8 envs, every env was served
    if routing == "sticky":
        assert not served[0] & served[1] and served[0] and served[1]
    else:  # the negative control: DEALER spreads one env's requests over both workers
        assert served[0] & served[1]


class ToyLearner(PPOLearner):
    """A registered learner: PPO that also reports that it ran."""

    def train(self, batch):
        stats = super().train(batch)
        stats["losses/toy_learner"] = 1.0
        return stats


def test_algorithm_type_picks_the_learner(tmp_path):
    registry.register_learner("toy", ToyLearner)
    cfg = _cfg(tmp_path, **{"algorithm.type": "toy", "stop.mean_return": "null", "stop.env_steps": 3000})
    ctl = controller_for(cfg, str(tmp_path / "run"))
    ctl.run()
    assert any(r.get("losses/toy_learner") == 1.0 for r in _rows(ctl.run_dir))
    ppo = controller_for(_cfg(tmp_path, **{"stop.mean_return": "null", "stop.env_steps": 3000}), str(tmp_path / "ppo"))
    ppo.run()
    assert not any("losses/toy_learner" in r for r in _rows(ppo.run_dir))


def test_unknown_learner_is_a_one_line_error_with_a_hint(tmp_path):
    from srl.errors import ConfigError

    with pytest.raises(ConfigError, match="did you mean 'ppo'"):
        _cfg(tmp_path, **{"algorithm.type": "ppp"})
