"""Memory tasks generated in code: an observation policy (MLP) cannot solve them.

``srl/RepeatFirst-v0``: step 0 shows one of ``n_cues`` cues; the next ``delay - 1`` steps show
nothing; step ``delay`` raises a query flag and the action taken there must name the cue (reward
1, else 0; the episode ends). Actions before the query do nothing. A memoryless policy scores
``1 / n_cues``; a policy that remembers ``delay`` steps back scores 1. The cue-to-answer delay is
the parameter that sizes the memory a policy needs (a memory window ``M >= delay``).

Observation: ``n_cues`` one-hot cue channels, then the query flag. Vectorized in numpy with
gymnasium's next-step autoreset, like every srl vector env.
"""
from __future__ import annotations

import gymnasium
import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv

REPEAT_FIRST = "srl/RepeatFirst-v0"


class RepeatFirstVectorEnv(VectorEnv):
    """``num_envs`` copies of the repeat-the-first-cue task."""

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(self, num_envs: int = 1, delay: int = 16, n_cues: int = 4, **_: object):
        if delay < 1 or n_cues < 2:
            raise ValueError(f"RepeatFirst: delay must be >= 1 and n_cues >= 2, got {delay}, {n_cues}")
        self.num_envs, self.delay, self.n_cues = num_envs, delay, n_cues
        self.single_observation_space = spaces.Box(0.0, 1.0, (n_cues + 1,), np.float32)
        self.single_action_space = spaces.Discrete(n_cues)
        self.observation_space = gymnasium.vector.utils.batch_space(self.single_observation_space, num_envs)
        self.action_space = gymnasium.vector.utils.batch_space(self.single_action_space, num_envs)
        self._rng = np.random.default_rng()
        self._cue = np.zeros(num_envs, np.int64)
        self._t = np.zeros(num_envs, np.int64)
        self._prev_done = np.zeros(num_envs, bool)

    def _obs(self) -> np.ndarray:
        obs = np.zeros((self.num_envs, self.n_cues + 1), np.float32)
        first = self._t == 0
        obs[first, self._cue[first]] = 1.0
        obs[self._t == self.delay, self.n_cues] = 1.0
        return obs

    def _new_episodes(self, which: np.ndarray) -> None:
        self._cue[which] = self._rng.integers(0, self.n_cues, int(which.sum()))
        self._t[which] = 0

    def reset(self, *, seed=None, options=None):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self._new_episodes(np.ones(self.num_envs, bool))
        self._prev_done[:] = False
        return self._obs(), {}

    def step(self, actions):
        actions = np.asarray(actions).reshape(self.num_envs)
        resetting = self._prev_done
        query = (self._t == self.delay) & ~resetting
        reward = np.where(query & (actions == self._cue), 1.0, 0.0).astype(np.float32)
        self._t += 1
        self._new_episodes(resetting)
        self._prev_done = query
        return self._obs(), reward, query.copy(), np.zeros(self.num_envs, bool), {}


class RepeatFirstEnv(gymnasium.Env):
    """The single-env form of the task (for ``gymnasium.make`` and wrappers)."""

    def __init__(self, delay: int = 16, n_cues: int = 4):
        self._vec = RepeatFirstVectorEnv(1, delay, n_cues)
        self.observation_space = self._vec.single_observation_space
        self.action_space = self._vec.single_action_space

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        obs, info = self._vec.reset(seed=seed)
        return obs[0], info

    def step(self, action):
        obs, reward, terminated, truncated, info = self._vec.step(np.array([action]))
        if terminated[0]:
            self._vec._prev_done[:] = False  # the single env is reset by its caller
        return obs[0], float(reward[0]), bool(terminated[0]), bool(truncated[0]), info


def register_memory_envs() -> None:
    if REPEAT_FIRST not in gymnasium.envs.registry:
        gymnasium.register(id=REPEAT_FIRST, entry_point=RepeatFirstEnv,
                           vector_entry_point=RepeatFirstVectorEnv)
