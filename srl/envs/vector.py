"""gymnasium adapter: any registered id becomes a vector env with next-step autoreset.

srl standardizes on gymnasium's default NEXT_STEP autoreset: when an env finishes at step t,
the observation returned at t is the true final observation (so truncated episodes can be
bootstrapped from it) and step t+1 only resets that env. Samples mark such reset steps with
``valid = 0`` and the learner ignores them.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import gymnasium
import numpy as np
from gymnasium import spaces

from srl.envs.atari import GAME_OVER, SCORE, is_ale_id, make_atari_vector_env, register_ale
from srl.envs.builtin import box_observations, register_srl_envs
from srl.errors import ConfigError

if TYPE_CHECKING:
    from srl.config import EnvConfig

# Extra packages that make whole families of gymnasium ids importable.
_ENV_EXTRAS = {"LunarLander": "gymnasium[box2d]", "BipedalWalker": "gymnasium[box2d]", "CarRacing": "gymnasium[box2d]"}
_MUJOCO = ("HalfCheetah", "Hopper", "Walker2d", "Ant", "Humanoid", "Swimmer", "Reacher", "InvertedPendulum")


@dataclass(frozen=True)
class SpaceInfo:
    """What a policy needs to know about an env's spaces."""

    obs_shape: tuple[int, ...]
    discrete: bool
    n_actions: int
    """Number of choices (discrete) or action dimensions (continuous)."""
    action_low: tuple[float, ...] = ()
    action_high: tuple[float, ...] = ()
    obs_dtype: str = "float32"
    """How observations travel (actor buffers, wire, trainer): ``uint8`` for image envs (the
    policy scales them), ``float32`` for everything else."""

    def to_dict(self) -> dict:
        return {
            "obs_dtype": self.obs_dtype,
            "obs_shape": list(self.obs_shape),
            "discrete": self.discrete,
            "n_actions": self.n_actions,
            "action_low": list(self.action_low),
            "action_high": list(self.action_high),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "SpaceInfo":
        return cls(tuple(d["obs_shape"]), bool(d["discrete"]), int(d["n_actions"]),
                   tuple(d["action_low"]), tuple(d["action_high"]), str(d.get("obs_dtype", "float32")))


def space_info(obs_space: gymnasium.Space, action_space: gymnasium.Space, env_id: str = "") -> SpaceInfo:
    if not isinstance(obs_space, spaces.Box):
        raise ConfigError("env.id", f"{env_id}: observation space {obs_space} is not supported (Box only)")
    obs_dtype = "uint8" if obs_space.dtype == np.uint8 else "float32"
    if isinstance(action_space, spaces.Discrete):
        return SpaceInfo(tuple(obs_space.shape), True, int(action_space.n), obs_dtype=obs_dtype)
    if isinstance(action_space, spaces.Box) and len(action_space.shape) == 1:
        return SpaceInfo(tuple(obs_space.shape), False, int(action_space.shape[0]),
                         tuple(float(x) for x in action_space.low), tuple(float(x) for x in action_space.high),
                         obs_dtype)
    raise ConfigError("env.id", f"{env_id}: action space {action_space} is not supported (Discrete or 1-D Box)")


def check_env_id(env_id: str) -> None:
    """Raise ConfigError unless ``env_id`` is a registered gymnasium or srl environment."""
    register_srl_envs(env_id)
    if is_ale_id(env_id):
        register_ale()
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


def make_vector_env(cfg: "EnvConfig", num_envs: int, seed: int | None = None) -> gymnasium.vector.VectorEnv:
    """Build ``num_envs`` copies of ``cfg.id`` as one gymnasium vector env (next-step autoreset)."""
    register_srl_envs(cfg.id)
    spec = gymnasium.envs.registry.get(cfg.id)
    mode = cfg.vectorize
    if mode == "ale" or (mode == "auto" and is_ale_id(cfg.id)):
        env = make_atari_vector_env(cfg.id, cfg.kwargs, num_envs)
        env.reset(seed=seed)
        return env
    if mode == "auto":
        mode = "vector_entry_point" if spec is not None and spec.vector_entry_point is not None else "sync"
    try:
        wrappers = None if mode == "vector_entry_point" else [box_observations]
        env = gymnasium.make_vec(cfg.id, num_envs=num_envs, vectorization_mode=mode, wrappers=wrappers, **cfg.kwargs)
    except (gymnasium.error.DependencyNotInstalled, ImportError, ModuleNotFoundError) as exc:
        extra = install_hint(cfg.id)
        hint = f"; install it with: pip install '{extra}'" if extra else ""
        raise ConfigError("env.id", f"{cfg.id} cannot be built: {exc}{hint}")
    except TypeError as exc:
        raise ConfigError("env.kwargs", f"{cfg.id} rejected its arguments: {exc}")
    autoreset = env.metadata.get("autoreset_mode", gymnasium.vector.AutoresetMode.NEXT_STEP)
    if autoreset != gymnasium.vector.AutoresetMode.NEXT_STEP:
        raise ConfigError("env.id", f"{cfg.id}: vector env uses {autoreset}, srl needs next-step autoreset")
    env.reset(seed=seed)
    return env


def step_signals(reward: np.ndarray, done: np.ndarray, info: dict) -> tuple[np.ndarray, np.ndarray]:
    """``(reward counted in episode returns, whether each env resets on the next step)``.

    The training reward and ``terminated | truncated`` unless the env reports its game's own
    (Atari: clipped rewards and episodic life train, raw scores of whole games are reported)."""
    return info.get(SCORE, reward), info.get(GAME_OVER, done)


class EpisodeTracker:
    """Running per-env returns and lengths; hands back the episodes that finished."""

    def __init__(self, num_envs: int):
        self.returns = np.zeros(num_envs, np.float64)
        self.lengths = np.zeros(num_envs, np.int64)

    def update(self, reward: np.ndarray, done: np.ndarray, valid: np.ndarray) -> tuple[list[float], list[int]]:
        self.returns += np.where(valid, reward, 0.0)
        self.lengths += valid
        if not done.any():
            return [], []
        finished_r = self.returns[done].tolist()
        finished_l = self.lengths[done].tolist()
        self.returns[done] = 0.0
        self.lengths[done] = 0
        return finished_r, finished_l
