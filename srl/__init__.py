"""srl: distributed reinforcement learning.

Actor workers step environments, policy workers batch inference, trainer workers learn and
publish weights; they talk over ZMQ streams, on one machine or on a Ray cluster.

Everything here is imported on first use, so ``import srl.system`` (the runtime) loads no RL code.
"""
from __future__ import annotations

import importlib

__all__ = ["Experiment", "ExperimentConfig", "load_experiment", "run", "ConfigError", "SrlError"]
__version__ = "0.1.0"

_LAZY = {"Experiment": "srl.experiment", "ExperimentConfig": "srl.config", "load_experiment": "srl.config",
         "ConfigError": "srl.errors", "SrlError": "srl.errors"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)


def run(path: str, overrides: list[str] | None = None):
    """Run an experiment file locally and return its :class:`~srl.monitor.RunResult`."""
    from srl.experiment import Experiment

    return Experiment.from_yaml(path, overrides).run()
