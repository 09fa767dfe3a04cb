"""Atari through ale-py's threaded C++ vector env, with the standard preprocessing.

``env: {id: ALE/Pong-v5}`` (``vectorize: ale``, chosen automatically for ``ALE/`` ids) builds
:class:`ale_py.vector_env.AtariVectorEnv`: frame skip 4 with max-pooling of the last two frames,
grayscale 84x84, a stack of the last 4 frames, up to 30 no-op starts, FIRE on reset where the game
needs it, all in C++ threads. Observations are ``uint8 [4, 84, 84]`` and stay uint8 until the
policy scales them (never converted on the way).

srl adds two things on top, so that training signals and reported scores can differ the way the
Atari literature does it:

- **Episodic life** (``episodic_life``, on by default): a lost life ends the *training* episode
  (``terminated``: no bootstrap across it) but the game goes on; the next step is a real
  transition, not a reset. ale-py's own ``episodic_life`` restarts the whole game at each lost
  life, so srl asks for ``life_loss_info`` instead and tells life losses from game overs itself.
- **Reward clipping** (``reward_clipping``, on by default): the learner sees ``sign(reward)``;
  the episode statistics count the game's raw score.

Both reach the actor through ``info``: :data:`SCORE` (raw reward) and :data:`GAME_OVER` (the
env resets on the next step). :func:`srl.envs.vector.step_signals` reads them; other envs have
neither, and their reward and ``terminated | truncated`` serve for both.

Frames are counted the way EnvPool and Sample Factory count them: env steps x frame skip.
"""
from __future__ import annotations

import inspect

import gymnasium
import numpy as np

from srl.errors import ConfigError

ALE_PREFIX = "ALE/"
SCORE = "score"
"""info key: the game's raw reward of the step (before clipping)."""
GAME_OVER = "game_over"
"""info key: the game ended (or was truncated) this step; the env resets on the next one."""
DEFAULT_THREADS = 1
"""ALE threads per vector env unless ``env.kwargs.num_threads`` says otherwise: an actor process
is one core's worth of work, and 14 actors on 16 cores should not start 16 threads each."""
_SRL_KWARGS = ("episodic_life", "reward_clipping")
"""Same names as ale-py's, interpreted by srl (see the module docstring)."""
_FIXED_KWARGS = ("game", "num_envs", "autoreset_mode", "life_loss_info", "batch_size", "continuous")
"""Set by srl; an experiment file may not override them."""


def is_ale_id(env_id: str) -> bool:
    return env_id.startswith(ALE_PREFIX)


def register_ale() -> None:
    """Make ``ALE/...`` ids known to gymnasium; ConfigError with the install line without ale-py."""
    try:
        import ale_py
    except ImportError:
        raise ConfigError("env.id", "ALE ids need ale-py: pip install 'srl[atari]'") from None
    if "ALE/Pong-v5" not in gymnasium.envs.registry:
        gymnasium.register_envs(ale_py)


def frame_skip(kwargs: dict) -> int:
    """Emulator frames per env step (for frames/s), as the env will be built."""
    return int(kwargs.get("frameskip", 4))


def check_kwargs(kwargs: dict) -> None:
    """One-line ConfigError naming the first ``env.kwargs`` field AtariVectorEnv cannot take."""
    from ale_py.vector_env import AtariVectorEnv

    accepted = set(inspect.signature(AtariVectorEnv.__init__).parameters) - {"self", *_FIXED_KWARGS}
    for key in kwargs:
        if key in _FIXED_KWARGS:
            raise ConfigError(f"env.kwargs.{key}", "is set by srl for ALE vector envs")
        if key not in accepted:
            known = ", ".join(sorted(accepted))
            raise ConfigError(f"env.kwargs.{key}", f"unknown ALE vector env argument (known: {known})")
    for key in _SRL_KWARGS:
        if key in kwargs and not isinstance(kwargs[key], bool):
            raise ConfigError(f"env.kwargs.{key}", f"must be true or false, got {kwargs[key]!r}")


class AtariVectorAdapter(gymnasium.vector.VectorWrapper):
    """AtariVectorEnv with srl's episodic life and reward clipping (module docstring)."""

    def __init__(self, env: gymnasium.vector.VectorEnv, episodic_life: bool, reward_clipping: bool):
        super().__init__(env)
        self.episodic_life, self.reward_clipping = episodic_life, reward_clipping
        self.lives = np.zeros(env.num_envs, np.int32)

    def reset(self, *, seed=None, options=None):
        obs, info = self.env.reset(seed=seed, options=options)
        self.lives = np.asarray(info["lives"]).copy()
        return obs, info

    def step(self, actions: np.ndarray):
        self.send(actions)
        return self.recv()

    def send(self, actions: np.ndarray) -> None:
        """Start a step: the emulators run in ale-py's threads until :meth:`recv`."""
        self.env.send(actions)

    def recv(self):
        """Finish the step :meth:`send` started: ``step``'s five values, srl's signals in ``info``."""
        obs, reward, terminated, truncated, info = self.env.recv()
        lives = np.asarray(info["lives"])
        score = np.asarray(reward, np.float32)
        life_lost = terminated & (lives > 0) & (lives < self.lives) if self.episodic_life else False
        self.lives = lives.copy()
        info = dict(info)
        info[SCORE] = score
        info[GAME_OVER] = (terminated & ~life_lost) | truncated
        train_reward = np.sign(score) if self.reward_clipping else score
        return obs, train_reward.astype(np.float32, copy=False), terminated, truncated, info


def make_atari_vector_env(env_id: str, kwargs: dict, num_envs: int, training: bool = True) -> AtariVectorAdapter:
    """``num_envs`` games of ``env_id`` in one C++ vector env (next-step autoreset).

    ``training=False`` (evaluation) turns episodic life off whatever ``kwargs`` say."""
    register_ale()
    spec = gymnasium.envs.registry.get(env_id)
    if spec is None or not str(spec.entry_point).startswith("ale_py"):
        raise ConfigError("env.vectorize", f"ale needs an ALE/... id, got {env_id!r}")
    check_kwargs(kwargs)
    from ale_py.vector_env import AtariVectorEnv

    merged = {k: v for k, v in spec.kwargs.items() if k != "game"}
    merged.update(kwargs)
    episodic_life = bool(merged.pop("episodic_life", True)) and training
    reward_clipping = bool(merged.pop("reward_clipping", True))
    merged.setdefault("num_threads", DEFAULT_THREADS)
    try:
        env = AtariVectorEnv(spec.kwargs["game"], num_envs, life_loss_info=episodic_life, episodic_life=False,
                             reward_clipping=False, **merged)
    except (TypeError, ValueError, gymnasium.error.Error) as exc:
        raise ConfigError("env.kwargs", f"{env_id} rejected its arguments: {' '.join(str(exc).split())}")
    return AtariVectorAdapter(env, episodic_life, reward_clipping)


def make_atari_eval_env(env_id: str, kwargs: dict, render_mode: str | None = None) -> gymnasium.Env:
    """One game for ``srl eval``, through gymnasium's wrappers (``AtariPreprocessing``,
    ``FrameStackObservation``): the C++ env's preprocessing, one env that can render, whole games
    with raw scores (no episodic life, no clipping). FIRE on reset is left to the policy."""
    register_ale()
    stack, size = int(kwargs.get("stack_num", 4)), int(kwargs.get("img_height", 84))
    env = gymnasium.make(env_id, frameskip=1, render_mode=render_mode,
                         repeat_action_probability=kwargs.get("repeat_action_probability", 0.25))
    env = gymnasium.wrappers.AtariPreprocessing(env, noop_max=int(kwargs.get("noop_max", 30)),
                                                frame_skip=frame_skip(kwargs), screen_size=size,
                                                grayscale_obs=bool(kwargs.get("grayscale", True)))
    return gymnasium.wrappers.FrameStackObservation(env, stack)
