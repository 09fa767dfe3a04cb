"""``srl eval RUN_DIR``: play episodes with a run's latest checkpoint, optionally record one."""
from __future__ import annotations

import os
from dataclasses import dataclass

import gymnasium
import numpy as np
import torch

from srl.config import load_experiment
from srl.envs.atari import is_ale_id, make_atari_eval_env
from srl.envs.vector import space_info
from srl.errors import SrlError
from srl.plan import build_policy
from srl.system.checkpoint import load_latest


@dataclass
class EvalReport:
    returns: list[float]
    lengths: list[int]
    version: int
    video: str | None = None

    def summary(self) -> str:
        r = np.asarray(self.returns)
        line = (f"eval: episodes={len(r)} mean_return={r.mean():.2f} std={r.std():.2f} min={r.min():.2f} "
                f"max={r.max():.2f} mean_length={np.mean(self.lengths):.1f} version={self.version}")
        return line + (f" video={self.video}" if self.video else "")


def evaluate(run_dir: str, episodes: int = 10, video: str | None = None, deterministic: bool = True,
             seed: int = 0) -> EvalReport:
    """Play ``episodes`` episodes with the latest checkpoint of ``run_dir``."""
    if episodes < 1:
        raise SrlError(f"--episodes must be >= 1, got {episodes}")
    config_path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(config_path):
        raise SrlError(f"{run_dir}: not a run directory (no config.yaml inside)")
    cfg = load_experiment(config_path)
    ckpt = load_latest(run_dir)  # skips checkpoints that fail verification; CheckpointError when none is usable
    if ckpt is None:
        raise SrlError(f"{run_dir}: no checkpoint yet")
    env = _make_env(cfg.env.id, cfg.env.kwargs, video is not None)
    policy = build_policy(space_info(env.observation_space, env.action_space, cfg.env.id), cfg.policy)
    try:
        policy.load_state_dict(ckpt.weights)
    except (RuntimeError, KeyError, ValueError) as exc:
        env.close()
        first = " ".join(str(exc).split())[:200]
        raise SrlError(f"{ckpt.path}: weights do not fit the policy in config.yaml ({first})") from None
    policy.eval()
    returns, lengths, frames = [], [], []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        done, total, n = False, 0.0, 0
        while not done:
            if video is not None and ep == 0:
                frames.append(env.render())
            action, _ = policy.act(torch.as_tensor(obs, dtype=torch.float32)[None], deterministic=deterministic)
            action = action[0].numpy()
            if not policy.info.discrete:
                action = np.clip(action, env.action_space.low, env.action_space.high)
            obs, reward, terminated, truncated, _ = env.step(action)
            total, n, done = total + float(reward), n + 1, terminated or truncated
        returns.append(total)
        lengths.append(n)
    env.close()
    if video is not None:
        _write_video(video, frames, env.metadata.get("render_fps", 30))
    return EvalReport(returns, lengths, int(ckpt.counters.get("version", -1)), video)


def _make_env(env_id: str, kwargs: dict, render: bool):
    if render:
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # render off-screen, no display needed
    if is_ale_id(env_id):  # the training env's preprocessing, as gymnasium wrappers around one game
        return make_atari_eval_env(env_id, kwargs, "rgb_array" if render else None)
    try:
        return gymnasium.make(env_id, render_mode="rgb_array" if render else None, **kwargs)
    except gymnasium.error.DependencyNotInstalled as exc:
        raise SrlError(f"{env_id}: {exc} (pip install 'srl[video]' for recording)") from None


def _write_video(path: str, frames: list, fps: int) -> None:
    try:
        import imageio.v2 as imageio
    except ImportError:
        raise SrlError("--video needs imageio: pip install 'srl[video]'") from None
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        timing = {"duration": 1000.0 / fps} if path.lower().endswith(".gif") else {"fps": fps}
        imageio.mimsave(path, [np.asarray(f) for f in frames], **timing)
    except (ValueError, RuntimeError) as exc:
        raise SrlError(f"cannot write {path}: {exc}") from None
