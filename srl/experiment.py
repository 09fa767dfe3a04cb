"""The Python entry point: build an experiment from YAML or objects, then run it."""
from __future__ import annotations

from typing import Callable

from srl.config import ExperimentConfig, load_experiment
from srl.registry import register_env, register_policy
from srl.system.controller import Controller, RunResult, new_run_dir  # noqa: F401 - new_run_dir is public


class Experiment:
    """An experiment ready to run.

    Examples:
        >>> exp = Experiment.from_yaml("configs/cartpole_ppo.yaml", overrides=["seed=3"])
        >>> result = exp.run()
        >>> print(result.final_line())
    """

    def __init__(self, config: ExperimentConfig, run_dir: str | None = None, resume: bool = False,
                 env: Callable | None = None, policy: type | None = None):
        """Args:
            config: the experiment; ``env.id`` and ``policy.type`` may name the objects below.
            env: a gymnasium.Env class or factory; registered as ``custom/<Name>-v0`` unless
                ``config.env.id`` already starts with ``custom/``.
            policy: a torch policy class built as ``policy(space_info, policy_config)`` with the
                interface of :class:`srl.policies.ActorCritic` (subclassing it is easiest).
        """
        if env is not None:
            if not config.env.id.startswith("custom/"):
                config.env.id = f"custom/{getattr(env, '__name__', 'Env')}-v0"
            register_env(config.env.id, env)
        if policy is not None:
            config.policy.type = getattr(policy, "__name__", "custom_policy")
            register_policy(config.policy.type, policy)
        self.config = config.validate()
        self.run_dir = run_dir or new_run_dir(config)
        self.resume = resume

    @classmethod
    def from_yaml(cls, path: str, overrides: list[str] | None = None, run_dir: str | None = None) -> "Experiment":
        return cls(load_experiment(path, overrides or []), run_dir=run_dir)

    def run(self, backend: str | None = None) -> RunResult:
        backend = backend or self.config.cluster.backend
        if backend == "ray":
            from srl.system.ray_scheduler import RayScheduler

            scheduler = RayScheduler(self.config)
            controller = Controller(self.config, self.run_dir, scheduler=scheduler, resume=self.resume)
            try:
                return controller.run()
            finally:
                scheduler.shutdown()
        elif backend == "local":
            controller = Controller(self.config, self.run_dir, resume=self.resume)
        else:
            raise ValueError(f"backend must be 'local' or 'ray', got {backend!r}")
        return controller.run()
