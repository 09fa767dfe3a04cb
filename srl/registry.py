"""Every name an experiment file can use, in one place.

Each kind (``policy``, ``learner``, ``optimizer``, ``role``, ``task``) maps names to classes. Built-ins are
listed as ``module:attribute`` strings and imported only when used, so looking names up costs
nothing and this module imports no other part of srl. Users add their own names with
:func:`register` (or ``srl.Experiment(config, policy=MyPolicy)``), or from an installed package
through the entry-point group ``srl.<kind>`` (``[project.entry-points."srl.policy"] name =
"pkg.module:Class"``). Environments are gymnasium ids; :func:`register_env` registers a class. Token tasks (prompts and
rewards for language-model policies) are named by ``env.id`` too, from the ``task`` kind.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.metadata
from typing import Any

from srl.errors import ConfigError

KINDS = ("policy", "learner", "optimizer", "role", "task")

_BUILTIN: dict[str, dict[str, str]] = {
    "policy": {"mlp": "srl.policies.mlp:ActorCritic", "gru": "srl.policies.memory:GRUActorCritic",
               "transformer": "srl.policies.memory:TransformerActorCritic", "cnn": "srl.policies.cnn:CNNActorCritic",
               "lm": "srl.policies.lm_policy:LMPolicy"},
    "learner": {"ppo": "srl.algorithms.ppo:PPOLearner", "appo": "srl.algorithms.appo:APPOLearner",
                "grpo": "srl.algorithms.grpo:GRPOLearner", "token_ppo": "srl.algorithms.token_ppo:TokenPPOLearner"},
    "optimizer": {"adam": "torch.optim:Adam", "adamw": "torch.optim:AdamW", "sgd": "torch.optim:SGD",
                  "sophia": "srl.optim.sophia:Sophia"},
    "role": {"actor": "srl.workers.actor:ActorWorker", "policy": "srl.workers.policy:PolicyWorker",
             "trainer": "srl.workers.trainer:TrainerWorker", "token_actor": "srl.workers.token_actor:TokenActorWorker",
             "generation": "srl.workers.generation:GenerationWorker", "draft": "srl.workers.draft:DraftWorker"},
    "task": {"srl/Addition-v0": "srl.envs.text:Addition", "srl/Sort-v0": "srl.envs.text:Sort"},
}
_USER: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
_ENTRY_POINTS_LOADED: set[str] = set()
_CUSTOM_ENVS: dict[str, object] = {}
"""Environments registered from Python objects in this process, to re-register in workers."""


def register(kind: str, name: str, obj: Any) -> None:
    """Make ``name`` build ``obj`` (a class, or a ``module:attribute`` string) for ``kind``."""
    _check_kind(kind)
    if name in _BUILTIN[kind]:
        raise ValueError(f"{name!r} is srl's built-in {kind}; choose another name")
    _USER[kind][name] = obj


def names(kind: str) -> tuple[str, ...]:
    _check_kind(kind)
    _load_entry_points(kind)
    return (*_BUILTIN[kind], *sorted(_USER[kind]))


def resolve(kind: str, name: str) -> Any:
    """The class registered as ``name``; ValueError naming the choices if there is none."""
    _check_kind(kind)
    _load_entry_points(kind)
    target = _BUILTIN[kind].get(name, _USER[kind].get(name))
    if target is None:
        raise ValueError(f"unknown {kind} type {name!r}; known: {', '.join(names(kind))}")
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module), attr)
    return target


def check_name(field: str, value: str, kind: str) -> None:
    """ConfigError with a did-you-mean unless ``value`` is a registered ``kind`` name."""
    choices = names(kind)
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(field, f"unknown {field.split('.')[0]} type {value!r}{hint} (known: {', '.join(choices)})")


def register_policy(name: str, cls: type) -> None:
    """Make ``policy: {type: name}`` build ``cls(space_info, policy_config)``."""
    register("policy", name, cls)


def register_learner(name: str, cls: type) -> None:
    """Make ``algorithm: {type: name}`` build ``cls(policy, algorithm_config, optimizer_config,
    device=..., total_env_steps=..., seed=..., grad_sync=...)`` in the trainers."""
    register("learner", name, cls)


def register_task(name: str, cls: type) -> None:
    """Make ``env: {id: name}`` build the token task ``cls(**env.kwargs)`` (the protocol of
    :class:`srl.envs.text.TokenTask`): the run then has generation workers and a token learner."""
    register("task", name, cls)


def register_env(env_id: str, entry_point, **kwargs) -> None:
    """Register a gymnasium env class or factory under ``env_id`` (usable as ``env.id``)."""
    import gymnasium

    if env_id not in gymnasium.envs.registry:
        gymnasium.register(id=env_id, entry_point=entry_point, **kwargs)
    _CUSTOM_ENVS[env_id] = entry_point


def custom_components() -> dict:
    """What this process registered from Python objects, to ship to worker processes."""
    return {"envs": dict(_CUSTOM_ENVS), **{kind: dict(_USER[kind]) for kind in KINDS}}


def install_components(components: dict) -> None:
    for env_id, entry in (components.get("envs") or {}).items():
        register_env(env_id, entry)
    for kind in KINDS:
        _USER[kind].update(components.get(kind) or {})


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown registry kind {kind!r}; known: {', '.join(KINDS)}")


def _load_entry_points(kind: str) -> None:
    if kind in _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED.add(kind)
    for ep in importlib.metadata.entry_points(group=f"srl.{kind}"):
        _USER[kind].setdefault(ep.name, ep.value)
