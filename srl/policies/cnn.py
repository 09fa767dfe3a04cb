"""Nature CNN actor-critic (Mnih et al. 2015) for image observations such as Atari's.

One shared trunk, as in cleanrl's ``ppo_atari.py`` and Sample Factory's ``convnet_atari``:
three convolutions (``policy.channels``, 8x8 stride 4, 4x4 stride 2, 3x3 stride 1), then the dense
layers of ``policy.hidden`` (``[512]`` in the paper), then a linear actor head and a linear critic
head. Acting and evaluation are :class:`srl.policies.mlp.ActorCriticHeads`'s.

Observations arrive as they travel, ``uint8 [N, C, H, W]``, and are scaled by 1/255 here (a float
image env is taken as it is). On CUDA, ``policy.channels_last`` lays the convolutions out
channels-last and ``policy.autocast: bf16`` runs the trunk in bfloat16; heads, log-probs and losses
stay float32. Both are ignored on CPU.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from srl.envs.vector import SpaceInfo
from srl.errors import ConfigError
from srl.policies.mlp import ActorCriticHeads, _init

if TYPE_CHECKING:
    from srl.config import PolicyConfig

KERNELS = ((8, 4), (4, 2), (3, 1))
"""(kernel size, stride) of the Nature CNN's three convolutions."""


def nature_cnn(in_channels: int, channels: list[int], height: int, width: int, hidden: list[int]) -> nn.Sequential:
    """The trunk: convolutions, flatten, dense layers (ReLU throughout, orthogonal init)."""
    layers: list[nn.Module] = []
    c = in_channels
    for out, (k, s) in zip(channels, KERNELS):
        layers += [_init(nn.Conv2d(c, out, k, s), math.sqrt(2)), nn.ReLU()]
        c = out
    layers.append(nn.Flatten())
    convs = nn.Sequential(*layers)
    with torch.no_grad():
        flat = convs(torch.zeros(1, in_channels, height, width)).shape[1]  # (1, C*H'*W')
    sizes = [flat, *hidden]
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [_init(nn.Linear(a, b), math.sqrt(2)), nn.ReLU()]
    return nn.Sequential(*layers)


class CNNActorCritic(ActorCriticHeads):
    """Nature CNN trunk shared by a linear actor head and a linear critic head."""

    def __init__(self, info: SpaceInfo, cfg: "PolicyConfig"):
        super().__init__()
        if len(info.obs_shape) != 3:
            raise ConfigError("policy.type", f"cnn needs [channels, height, width] observations, got {info.obs_shape}")
        c, h, w = info.obs_shape
        smallest = 36  # 8x8/4, 4x4/2 and 3x3/1 leave at least one pixel
        if h < smallest or w < smallest:
            raise ConfigError("policy.type", f"cnn needs images of at least {smallest}x{smallest}, got {h}x{w}")
        self.info = info
        self.obs_norm = None
        self.scale = 1.0 / 255.0 if info.obs_dtype == "uint8" else 1.0
        self.channels_last, self.bf16 = cfg.channels_last, cfg.autocast == "bf16"
        self.trunk = nature_cnn(c, cfg.channels, h, w, cfg.hidden)
        self.actor = _init(nn.Linear(cfg.hidden[-1], info.n_actions), 0.01)
        self.critic = _init(nn.Linear(cfg.hidden[-1], 1), 1.0)
        if not info.discrete:
            self.log_std = nn.Parameter(torch.full((info.n_actions,), float(cfg.init_log_std)))
        self._laid_out = False

    def _features(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.float() * self.scale  # (N, C, H, W) in [0, 1]
        if not x.is_cuda:
            return self.trunk(x)
        if self.channels_last:
            if not self._laid_out:  # once, on the device: weights in the layout of the inputs
                self.trunk.to(memory_format=torch.channels_last)
                self._laid_out = True
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
            return self.trunk(x).float()
