"""srl's own gymnasium ids (``srl/...``), and the packages whose ids srl imports on first use."""
from __future__ import annotations

import importlib

import gymnasium
from gymnasium import spaces
from gymnasium.wrappers import DtypeObservation, FlattenObservation

from srl.envs.memory import register_memory_envs
from srl.envs.null import register_null_envs
from srl.errors import ConfigError

ENV_PACKAGES = {"popgym-": "popgym", "MiniGrid-": "minigrid"}
"""Id prefix -> the package that registers those ids when imported (``pip install <package>``)."""


def register_srl_envs(env_id: str = "") -> None:
    """Register srl's ids, and import the package that registers ``env_id`` (POPGym, MiniGrid)."""
    register_null_envs()
    register_memory_envs()
    for prefix, package in ENV_PACKAGES.items():
        if env_id.startswith(prefix):
            try:
                importlib.import_module(package)
            except ImportError as exc:
                raise ConfigError("env.id", f"{env_id} needs the {package} package: pip install {package} ({exc})")


def box_observations(env: gymnasium.Env) -> gymnasium.Env:
    """Make any observation a float32 Box: MiniGrid's image only (its mission text carries no
    information in the memory tasks), then Discrete / Tuple / Dict flattened to one-hots."""
    if env.spec is not None and env.spec.id.startswith("MiniGrid-"):
        from minigrid.wrappers import ImgObsWrapper

        env = ImgObsWrapper(env)
    if not isinstance(env.observation_space, spaces.Box):
        env = DtypeObservation(FlattenObservation(env), "float32")
    return env
