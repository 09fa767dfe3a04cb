"""Memory policies: a Transformer-XL-style policy and a GRU baseline, with per-env state.

A memory policy keeps state per env between steps. Where inference runs (the actor with an
inline policy, or the policy worker that sticky routing sends the env to) the state lives in a
:class:`srl.policies.state.StateTable` keyed by run-wide env id; a step reads the rows of the
requesting envs, resets those whose observation starts an episode, and writes them back.

The interface every memory policy implements (beside ``obs_norm`` and ``info``):

- ``initial_state(n, device) -> dict[str, Tensor]``: the state of ``n`` fresh envs;
- ``act(obs, first, state, deterministic) -> (action, logp, new_state)``: one step of ``n``
  envs; rows with ``first`` set start from the initial state;
- ``evaluate_sequence(obs, action, first, state) -> (logp, entropy, value, head_out)``: the
  learner's pass over a trajectory of ``T + 1`` observations (``[T + 1, B, ...]``) from the state
  the behaviour policy held before its first step; ``first[t]`` marks episode starts, across which
  nothing is remembered. ``logp`` / ``entropy`` are ``[T, B]``, ``value`` is ``[T + 1, B]``.

Stepwise ``act`` and ``evaluate_sequence`` compute the same function (tested in float64).

Transformer memory (TrXL as in CleanRL's ``ppo_trxl``): each layer caches its *inputs* of the
last ``M`` steps of the episode; a step's layer ``l`` attends from the current input to itself and
those ``M`` cached inputs. Positions are rotary and relative (distance in steps), so the cache is
stored newest first and a step's keys are a valid prefix: ``kv_lens = cached + 1``, which is the
layout of :func:`srl.kernels.flash_attention.flash_decode` (used on CUDA).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from srl.envs.vector import SpaceInfo
from srl.policies.mlp import RunningNorm, _init, _mlp, action_logp_entropy, sample_action

if TYPE_CHECKING:
    from srl.config import PolicyConfig

State = dict[str, torch.Tensor]


class MemoryActorCritic(nn.Module):
    """Observation encoder, a memory core (subclass), actor and critic heads."""

    recurrent = True

    def __init__(self, info: SpaceInfo, cfg: "PolicyConfig"):
        super().__init__()
        self.info = info
        obs_dim = int(np.prod(info.obs_shape))
        self.d = cfg.d_model
        self.obs_norm = RunningNorm((obs_dim,)) if cfg.obs_norm else None
        self.encoder = nn.Sequential(_init(nn.Linear(obs_dim, self.d), math.sqrt(2)), nn.ReLU())
        self.actor = _mlp([self.d, *cfg.hidden], cfg.activation, info.n_actions, 0.01)
        self.critic = _mlp([self.d, *cfg.hidden], cfg.activation, 1, 1.0)
        if not info.discrete:
            self.log_std = nn.Parameter(torch.full((info.n_actions,), float(cfg.init_log_std)))

    def _encode(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.reshape(*obs.shape[:-len(self.info.obs_shape)], -1).to(self._param_dtype())
        if self.obs_norm is not None:
            x = self.obs_norm(x)
        return self.encoder(x)

    def _param_dtype(self) -> torch.dtype:
        return self.encoder[0].weight.dtype

    # -- the core: subclasses
    def initial_state(self, n: int, device="cpu") -> State:
        """The state of ``n`` fresh envs: all zeros (``act`` resets rows by zeroing them)."""
        raise NotImplementedError

    def core_step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        raise NotImplementedError

    def core_sequence(self, x: torch.Tensor, first: torch.Tensor, state: State) -> torch.Tensor:
        raise NotImplementedError

    # -- acting and learning
    @torch.inference_mode()
    def act(self, obs: torch.Tensor, first: torch.Tensor, state: State, deterministic: bool = False):
        first = first.to(obs.device, torch.bool)
        state = {k: v.masked_fill(first.view(-1, *[1] * (v.dim() - 1)), 0) for k, v in state.items()}
        x = self._encode(obs)
        h, state = self.core_step(x, state)
        action, logp = sample_action(self.actor(h), self.info.discrete, getattr(self, "log_std", None), deterministic)
        return action, logp, state

    def evaluate_sequence(self, obs: torch.Tensor, action: torch.Tensor, first: torch.Tensor, state: State):
        x = self._encode(obs)
        h = self.core_sequence(x, first.bool(), state)  # [T + 1, B, d]
        out = self.actor(h[:-1])
        value = self.critic(h).squeeze(-1)
        logp, entropy = action_logp_entropy(out, action, self.info.discrete, getattr(self, "log_std", None))
        return logp, entropy, value, out


class GRUActorCritic(MemoryActorCritic):
    """The recurrent baseline: one GRU cell over the encoded observations."""

    def __init__(self, info: SpaceInfo, cfg: "PolicyConfig"):
        super().__init__(info, cfg)
        self.cell = nn.GRUCell(self.d, self.d)

    def initial_state(self, n: int, device="cpu") -> State:
        return {"h": torch.zeros(n, self.d, device=device, dtype=self._param_dtype())}

    def core_step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        h = self.cell(x, state["h"])
        return h, {"h": h}

    def core_sequence(self, x: torch.Tensor, first: torch.Tensor, state: State) -> torch.Tensor:
        h = state["h"].to(x.dtype)
        out = []
        for t in range(x.shape[0]):
            h = self.cell(x[t], torch.where(first[t, :, None], torch.zeros_like(h), h))
            out.append(h)
        return torch.stack(out)


def rotate(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` (..., D) at positions ``pos`` (broadcast to x's leading dims)."""
    ang = pos.to(x.dtype)[..., None] * inv_freq.to(x.dtype)
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)


class MemoryBlock(nn.Module):
    """Pre-norm block: attention from the current inputs over (self + cached inputs), then MLP."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads, self.hd = heads, d // heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.register_buffer("inv_freq", 1.0 / 10_000 ** (torch.arange(0, self.hd, 2) / self.hd), persistent=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, d) -> (B, H, N, hd)
        return x.unflatten(-1, (self.heads, self.hd)).transpose(1, 2)

    def project(self, x_q: torch.Tensor, ctx: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor):
        """Rotated (q, k, v) in (B, H, N, hd); positions are step indices (B, N) or (N,)."""
        wq, wk, wv = self.qkv.weight.chunk(3)
        bq, bk, bv = self.qkv.bias.chunk(3)
        q = self._heads(nn.functional.linear(self.norm1(x_q), wq, bq))
        c = self.norm1(ctx)
        k = self._heads(nn.functional.linear(c, wk, bk))
        v = self._heads(nn.functional.linear(c, wv, bv))
        return rotate(q, q_pos, self.inv_freq), rotate(k, k_pos, self.inv_freq), v

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        h = x + self.out(attn.transpose(1, 2).flatten(-2))
        return h + self.mlp(self.norm2(h))


class TransformerActorCritic(MemoryActorCritic):
    """TrXL-style memory over the last ``M`` steps of each env's episode."""

    def __init__(self, info: SpaceInfo, cfg: "PolicyConfig"):
        super().__init__(info, cfg)
        self.M, self.L = cfg.memory, cfg.layers
        self.kernels = cfg.attention == "srl"
        """On CUDA, attention runs srl's kernels (else torch's): the ``policy.attention`` switch."""
        self.blocks = nn.ModuleList(MemoryBlock(self.d, cfg.heads) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(self.d)

    def initial_state(self, n: int, device="cpu") -> State:
        return {"mem": torch.zeros(n, self.L, self.M, self.d, device=device, dtype=self._param_dtype()),
                "len": torch.zeros(n, device=device, dtype=torch.int64)}

    def core_step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        mem, cached = state["mem"], state["len"]
        n = x.shape[0]
        dist = torch.arange(self.M + 1, device=x.device)  # key c is c steps back (newest first)
        inputs = []
        for l, block in enumerate(self.blocks):
            inputs.append(x)
            ctx = torch.cat([x[:, None], mem[:, l]], 1)  # (n, M + 1, d)
            q, k, v = block.project(x[:, None], ctx, torch.zeros(1, device=x.device), -dist)
            x = block.finish(x[:, None], _decode_attention(q, k, v, cached + 1, self.kernels))[:, 0]
        new_mem = torch.cat([torch.stack(inputs, 1)[:, :, None], mem[:, :, :-1]], 2)
        return self.norm(x), {"mem": new_mem, "len": torch.clamp(cached + 1, max=self.M).expand(n)}

    def core_sequence(self, x: torch.Tensor, first: torch.Tensor, state: State) -> torch.Tensor:
        T1, B = x.shape[:2]
        M = self.M
        starts = _sequence_starts(first, state["len"].to(x.device), M)  # (B, T1)
        pos = torch.arange(M + T1, device=x.device)
        old = state["mem"].to(x.dtype).flip(2)  # (B, L, M, d) oldest first
        h = x.transpose(0, 1)  # (B, T1, d)
        for l, block in enumerate(self.blocks):
            ctx = torch.cat([old[:, l], h], 1)
            q, k, v = block.project(h, ctx, pos[M:], pos)
            h = block.finish(h, _sequence_attention(q, k, v, starts, self.kernels))
        return self.norm(h).transpose(0, 1)


def _sequence_starts(first: torch.Tensor, cached: torch.Tensor, M: int) -> torch.Tensor:
    """(B, T1) first visible key of each query; keys are the cached inputs (oldest first) then the
    sequence, and query t (key M + t) sees keys [start, M + t]: within M steps back, not before
    its episode's start."""
    T1, B = first.shape
    t = torch.arange(T1, device=first.device)
    # latest episode start at or before t (-1: none in this sequence)
    latest = torch.where(first.T, t, torch.full_like(t, -1)).cummax(1).values  # (B, T1)
    lo = torch.where(latest >= 0, M + latest, (M - cached)[:, None])
    return torch.maximum(lo, t)  # t = (M + t) - M


def _sequence_mask(starts: torch.Tensor, M: int) -> torch.Tensor:
    """(B, T1, M + T1) visibility of :func:`_sequence_starts`."""
    T1 = starts.shape[1]
    j = torch.arange(M + T1, device=starts.device)
    q_idx = M + torch.arange(T1, device=starts.device)
    return (j[None, None] >= starts[:, :, None]) & (j[None, None] <= q_idx[None, :, None])


def _kernels_apply(q: torch.Tensor, kernels: bool) -> bool:
    from srl.kernels._flash_common import SUPPORTED_HEAD_DIMS

    return kernels and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16, torch.float32) \
        and q.shape[-1] in SUPPORTED_HEAD_DIMS


def _sequence_attention(q, k, v, starts: torch.Tensor, kernels: bool) -> torch.Tensor:
    """The learner's attention over a sequence chunk: srl's FlashAttention (bottom-right causal
    plus per-row key starts) on CUDA, else torch's SDPA with the same mask."""
    M = k.shape[2] - q.shape[2]
    if _kernels_apply(q, kernels):
        from srl.kernels import flash_attention

        return flash_attention(q, k, v, causal=True, kv_start=starts)
    return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=_sequence_mask(starts, M)[:, None])


def _decode_attention(q, k, v, kv_lens: torch.Tensor, kernels: bool = True) -> torch.Tensor:
    """One query per env over its valid prefix of keys: srl's flash-decode kernel on CUDA."""
    if _kernels_apply(q, kernels):
        from srl.kernels import flash_decode

        return flash_decode(q, k, v, causal=False, kv_lens=kv_lens)
    from srl.kernels._reference import attention_reference
    return attention_reference(q, k, v, kv_lens=kv_lens)
