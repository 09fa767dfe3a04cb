"""The Python entry point: build an experiment from YAML or objects, then run it.

This is where the RL layer meets the runtime: the experiment is compiled into a plan
(:func:`srl.plan.compile_plan`), the env is probed for its spaces, and the runtime's controller
gets the plan, an :class:`srl.monitor.RLMonitor` and the workers' entry point.
"""
from __future__ import annotations

import os
import time
from typing import Callable

from srl import registry
from srl.config import ExperimentConfig, dump_yaml, load_experiment
from srl.envs.vector import make_vector_env, space_info
from srl.errors import SrlError
from srl.monitor import RLMonitor, RunResult
from srl.plan import WORKER_ENTRY, RunPayload, compile_plan
from srl.system.checkpoint import load_latest
from srl.system.controller import Controller, RunSettings


class Experiment:
    """An experiment ready to run.

    Examples:
        >>> exp = Experiment.from_yaml("configs/cartpole_ppo.yaml", overrides=["seed=3"])
        >>> result = exp.run()
        >>> print(result.final_line())
    """

    def __init__(self, config: ExperimentConfig, run_dir: str | None = None, resume: bool = False,
                 env: Callable | None = None, policy: type | None = None, task: type | None = None):
        """Args:
            config: the experiment; ``env.id`` and ``policy.type`` may name the objects below.
            env: a gymnasium.Env class or factory; registered as ``custom/<Name>-v0`` unless
                ``config.env.id`` already starts with ``custom/``.
            policy: a torch policy class built as ``policy(space_info, policy_config)`` with the
                interface of :class:`srl.policies.ActorCritic` (subclassing it is easiest).
            task: a token task class (:class:`srl.envs.text.TokenTask`'s protocol: vocab_size,
                eos_id, pad_id, sample_prompts, reward) built as ``task(**env.kwargs)``;
                registered as ``custom/<Name>-v0`` unless ``config.env.id`` starts with ``custom/``.
        """
        if task is not None:
            if not config.env.id.startswith("custom/"):
                config.env.id = f"custom/{getattr(task, '__name__', 'Task')}-v0"
            registry.register_task(config.env.id, task)
        if env is not None:
            if not config.env.id.startswith("custom/"):
                config.env.id = f"custom/{getattr(env, '__name__', 'Env')}-v0"
            registry.register_env(config.env.id, env)
        if policy is not None:
            config.policy.type = getattr(policy, "__name__", "custom_policy")
            registry.register_policy(config.policy.type, policy)
        self.config = config.validate()
        self.run_dir = run_dir or new_run_dir(config)
        self.resume = resume
        self.launch_time: float | None = None
        """When the run counts its ``wall_s`` from (None: when it starts)."""

    @classmethod
    def from_yaml(cls, path: str, overrides: list[str] | None = None, run_dir: str | None = None) -> "Experiment":
        return cls(load_experiment(path, overrides or []), run_dir=run_dir)

    def controller(self, scheduler=None, launch_time: float | None = None) -> Controller:
        return controller_for(self.config, self.run_dir, scheduler=scheduler, resume=self.resume,
                              launch_time=launch_time or self.launch_time)

    def run(self, backend: str | None = None) -> RunResult:
        backend = backend or self.config.cluster.backend
        if backend == "ray":
            from srl.system.ray_scheduler import RayScheduler

            scheduler = RayScheduler(self.config.cluster.address)
            try:
                return self.controller(scheduler).run()
            finally:
                scheduler.shutdown()
        if backend != "local":
            raise ValueError(f"backend must be 'local' or 'ray', got {backend!r}")
        return self.controller().run()


def controller_for(cfg: ExperimentConfig, run_dir: str, scheduler=None, resume: bool = False,
                   launch_time: float | None = None) -> Controller:
    """A controller that runs ``cfg`` in ``run_dir``: plan, probed spaces, monitor and settings."""
    if resume and load_latest(run_dir) is None:
        raise SrlError(f"{run_dir}: --resume found no usable checkpoint; refusing to start from scratch")
    plan = compile_plan(cfg)
    space = _probe_space(cfg)
    _write_config(run_dir, cfg)
    components = registry.custom_components()
    by_value = tuple(obj for group in components.values() for obj in group.values() if not isinstance(obj, str))
    w = cfg.workers
    settings = RunSettings(heartbeat_s=w.heartbeat_s, heartbeat_timeout_s=w.heartbeat_timeout_s,
                           max_restarts=w.max_restarts, start_method=w.start_method,
                           checkpoint_every_s=cfg.checkpoint.every_seconds, checkpoint_role="trainer",
                           log_every_s=cfg.log.every_s, tensorboard=cfg.log.tensorboard, console=cfg.log.console,
                           host=cfg.network.host, authenticate=cfg.network.hmac)
    return Controller(plan, settings, RLMonitor(cfg, run_dir), run_dir, WORKER_ENTRY,
                      payload=RunPayload(cfg, space, components), scheduler=scheduler, resume=resume,
                      launch_time=launch_time, by_value=by_value)


def _probe_space(cfg: ExperimentConfig) -> dict:
    """The env's spaces as a dict; for a token task, prompts as observations and tokens as actions."""
    from srl.envs.tokens import build_task, is_token_task, task_space

    if is_token_task(cfg):
        return task_space(cfg, build_task(cfg)).to_dict()
    env = make_vector_env(cfg.env, 1, seed=cfg.seed)
    space = space_info(env.single_observation_space, env.single_action_space, cfg.env.id).to_dict()
    env.close()
    return space


def _write_config(run_dir: str, cfg: ExperimentConfig) -> None:
    try:
        os.makedirs(run_dir, exist_ok=True)
        tmp = os.path.join(run_dir, f".config.yaml.tmp-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(dump_yaml(cfg))
        os.replace(tmp, os.path.join(run_dir, "config.yaml"))
    except OSError as exc:
        raise SrlError(f"{run_dir}: cannot write the run directory ({exc.strerror or exc})") from None


def new_run_dir(cfg: ExperimentConfig) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = os.path.join(cfg.log.dir, f"{cfg.name}-{stamp}")
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    return path
