"""srl: distributed reinforcement learning.

Actor workers step environments, policy workers batch inference, trainer workers learn and
publish weights; they talk over ZMQ streams, on one machine or on a Ray cluster.
"""
from srl.config import ExperimentConfig, load_experiment
from srl.errors import ConfigError, SrlError

__all__ = ["Experiment", "ExperimentConfig", "load_experiment", "run", "ConfigError", "SrlError"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "Experiment":
        from srl.experiment import Experiment

        return Experiment
    raise AttributeError(name)


def run(path: str, overrides: list[str] | None = None):
    """Run an experiment file locally and return its :class:`~srl.system.controller.RunResult`."""
    from srl.experiment import Experiment

    return Experiment.from_yaml(path, overrides).run()
