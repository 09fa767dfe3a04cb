"""Names used in experiment files, mapped to what they build.

Environments are gymnasium ids (srl's own envs register themselves with gymnasium under the
``srl/`` namespace); policies, algorithms and optimizers are small tables here.
"""
from __future__ import annotations

import difflib

from srl.errors import ConfigError

POLICIES = ("mlp",)
ALGORITHMS = ("ppo",)
OPTIMIZERS = ("adam", "adamw", "sgd", "sophia")

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
