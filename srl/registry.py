"""Names used in experiment files, mapped to what they build.

Environments are gymnasium ids (srl's own envs register themselves with gymnasium under the
``srl/`` namespace); policies, algorithms and optimizers are small tables here.
"""
from __future__ import annotations

import difflib

from srl.errors import ConfigError

ALGORITHMS = ("ppo",)
OPTIMIZERS = ("adam", "adamw", "sgd", "sophia")

# Policy classes by name; users add theirs with register_policy or by passing a class to
# srl.Experiment. A policy class is built as cls(space_info, policy_config).
_POLICIES: dict[str, type] = {}
# Environments registered from Python objects in this process, to re-register in workers.
_CUSTOM_ENVS: dict[str, object] = {}


def policy_names() -> tuple[str, ...]:
    return ("mlp", *sorted(_POLICIES))


def register_policy(name: str, cls: type) -> None:
    """Make ``policy: {type: name}`` build ``cls(space_info, policy_config)``."""
    if name == "mlp":
        raise ValueError("'mlp' is srl's built-in policy; choose another name")
    _POLICIES[name] = cls


def policy_class(name: str) -> type:
    if name == "mlp":
        from srl.policies.mlp import ActorCritic

        return ActorCritic
    try:
        return _POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy type {name!r}; known: {', '.join(policy_names())}") from None


def register_env(env_id: str, entry_point, **kwargs) -> None:
    """Register a gymnasium env class or factory under ``env_id`` (usable as ``env.id``)."""
    import gymnasium

    if env_id not in gymnasium.envs.registry:
        gymnasium.register(id=env_id, entry_point=entry_point, **kwargs)
    _CUSTOM_ENVS[env_id] = entry_point


def custom_components() -> dict:
    """What this process registered from Python objects, to ship to worker processes."""
    return {"envs": dict(_CUSTOM_ENVS), "policies": dict(_POLICIES)}


def install_components(components: dict) -> None:
    for env_id, entry in (components.get("envs") or {}).items():
        register_env(env_id, entry)
    for name, cls in (components.get("policies") or {}).items():
        _POLICIES[name] = cls

# Extra packages that make whole families of gymnasium ids importable.
_ENV_EXTRAS = {"LunarLander": "gymnasium[box2d]", "BipedalWalker": "gymnasium[box2d]", "CarRacing": "gymnasium[box2d]"}
_MUJOCO = ("HalfCheetah", "Hopper", "Walker2d", "Ant", "Humanoid", "Swimmer", "Reacher", "InvertedPendulum")


def check_name(field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(field, f"unknown {field.split('.')[0]} type {value!r}{hint} (known: {', '.join(choices)})")


def check_env_id(env_id: str) -> None:
    """Raise ConfigError unless ``env_id`` is a registered gymnasium or srl environment."""
    import gymnasium

    import srl.envs  # noqa: F401 - registers srl/ envs

    registry = gymnasium.envs.registry
    if env_id in registry:
        return
    close = difflib.get_close_matches(env_id, list(registry), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError("env.id", f"unknown environment id {env_id!r}{hint}")


def install_hint(env_id: str) -> str:
    """The pip extra a known env family needs, for error messages."""
    for family, extra in _ENV_EXTRAS.items():
        if env_id.startswith(family):
            return extra
    if env_id.startswith(_MUJOCO):
        return "gymnasium[mujoco]"
    return ""
