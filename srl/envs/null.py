"""A null environment for system benchmarks: steps cost almost nothing, so throughput
measures srl's own overhead (streams, batching, serialization), not the simulator."""
from __future__ import annotations

import gymnasium
import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv


class NullVectorEnv(VectorEnv):
    """``num_envs`` copies of an env with fixed-length episodes and zero observations.

    Follows gymnasium's next-step autoreset: the step after a done returns the reset
    observation and ignores the action.
    """

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(self, num_envs: int = 1, obs_dim: int = 4, n_actions: int = 2, episode_len: int = 200, **_: object):
        self.num_envs = num_envs
        self.episode_len = episode_len
        self.single_observation_space = spaces.Box(-1.0, 1.0, (obs_dim,), np.float32)
        self.single_action_space = spaces.Discrete(n_actions)
        self.observation_space = gymnasium.vector.utils.batch_space(self.single_observation_space, num_envs)
        self.action_space = gymnasium.vector.utils.batch_space(self.single_action_space, num_envs)
        self._obs = np.zeros((num_envs, obs_dim), np.float32)
        self._t = np.zeros(num_envs, np.int64)
        self._prev_done = np.zeros(num_envs, bool)
        self._reward = np.ones(num_envs, np.float32)
        self._false = np.zeros(num_envs, bool)

    def reset(self, *, seed=None, options=None):
        self._t[:] = 0
        self._prev_done[:] = False
        return self._obs.copy(), {}

    def step(self, actions):
        self._t[self._prev_done] = 0
        self._t += 1
        truncated = self._t >= self.episode_len
        reward = np.where(self._prev_done, 0.0, 1.0).astype(np.float32)
        truncated &= ~self._prev_done
        self._prev_done = truncated.copy()
        return self._obs.copy(), reward, self._false.copy(), truncated, {}


def _single_null_env(**kwargs):
    raise gymnasium.error.Error("srl/Null-v0 is vector-only: use gymnasium.make_vec or srl.envs.make_vector_env")


def register_null_envs() -> None:
    if "srl/Null-v0" not in gymnasium.envs.registry:
        gymnasium.register(
            id="srl/Null-v0",
            entry_point=_single_null_env,
            vector_entry_point=NullVectorEnv,
        )
