"""KV-cache decoding: cache layouts, prefill, one-token decode, plain sampling, CUDA graphs.

gpt-fast style: each function does one job. A cached model call takes, per new token, a cache
slot, a rotary position and an attention mask over slots (see ``TransformerLM.forward``); this
module builds those layouts.

Generation state lives in fixed-size tensors so that a decode step has static shapes, never
synchronises with the host, and can be captured in a CUDA graph:

- ``tokens`` (B, S): the token at each slot. The last emitted token of row b, ``x0``, sits at slot
  ``cache.lens[b]`` and is not in the cache yet (it is the next step's input).
- ``logp`` (B, S): the policy's log-probability of each generated token under the distribution it
  was sampled from (post temperature / top-k / top-p); 0 on prompt slots.
- ``end`` (B,): prompt length + max_new_tokens, the first slot not needed.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from srl.generation.sampling import SamplingParams, probs_from_params, sample_from_probs
from srl.policies.lm import SlotMask


# --------------------------------------------------------------------------- layouts

def causal_layout(lens: Tensor, T: int, S: int) -> tuple[Tensor, Tensor]:
    """T new tokens per row right after ``lens``: (slots (B, T), mask (B, T, S)); positions = slots."""
    slots = lens[:, None] + torch.arange(T, device=lens.device)  # (B, T)
    mask = torch.arange(S, device=lens.device)[None, None, :] <= slots[:, :, None]
    return slots, mask


def tree_layout(lens: Tensor, k: int, L: int, S: int) -> tuple[Tensor, Tensor, Tensor]:
    """x0 then k draft blocks of L tokens after a shared prefix of ``lens`` slots.

    Token 0 is x0 at slot P = lens (position P); draft j's token t sits at slot P + 1 + j*L + t
    with position P + 1 + t and sees the prefix, x0 and its own block up to itself.
    Returns (slots, positions, mask): (B, 1 + k*L), (B, 1 + k*L), (B, 1 + k*L, S).
    """
    dev = lens.device
    j = torch.arange(k, device=dev).repeat_interleave(L)
    t = torch.arange(L, device=dev).repeat(k)
    zero = torch.zeros(1, dtype=torch.long, device=dev)
    slot_off = torch.cat([zero, 1 + j * L + t])
    pos_off = torch.cat([zero, 1 + t])
    block_off = torch.cat([zero + S, 1 + j * L])  # x0 has no block: start past the cache
    P = lens[:, None]
    slots, positions, block = P + slot_off, P + pos_off, P + block_off  # (B, 1 + kL)
    s = torch.arange(S, device=dev)[None, None, :]
    mask = (s <= torch.minimum(slots, P)[..., None]) | (
        (s >= block[..., None]) & (s <= slots[..., None]))
    return slots, positions, mask


def causal_slot_mask(lens: Tensor, T: int, S: int) -> tuple[Tensor, SlotMask]:
    """``causal_layout`` with its mask also in srl's FlashAttention form (each row's valid slots
    end at ``lens + T``, causal aligned there): (slots, mask)."""
    slots, mask = causal_layout(lens, T, S)
    return slots, SlotMask(mask, lens + T)


def tree_slot_mask(lens: Tensor, k: int, L: int, S: int) -> tuple[Tensor, Tensor, SlotMask]:
    """``tree_layout`` with its mask also in srl's FlashAttention form: the valid slots end after
    the last draft token, a draft token's keys start at its block, and the prefix and x0 (slots
    before ``lens + 1``) are seen by all. Returns (slots, positions, mask)."""
    slots, positions, mask = tree_layout(lens, k, L, S)
    block = torch.cat([torch.zeros(1, dtype=torch.long, device=lens.device),
                       1 + torch.arange(k, device=lens.device).repeat_interleave(L) * L])
    starts = (lens[:, None] + block[None, :]).index_fill(1, torch.zeros(1, dtype=torch.long, device=lens.device), 0)
    return slots, positions, SlotMask(mask, lens + 1 + k * L, starts, lens + 1)


# --------------------------------------------------------------------------- state

@dataclass
class GenState:
    tokens: Tensor  # (B, S) int64
    logp: Tensor  # (B, S) float32
    end: Tensor  # (B,) int64

    @classmethod
    def allocate(cls, batch: int, max_len: int, device) -> "GenState":
        return cls(torch.zeros(batch, max_len, dtype=torch.long, device=device),
                   torch.zeros(batch, max_len, dtype=torch.float32, device=device),
                   torch.zeros(batch, dtype=torch.long, device=device))

    def reset(self, prompt: Tensor, max_new_tokens: int) -> None:
        T0 = prompt.shape[1]
        self.tokens.zero_()
        self.logp.zero_()
        self.tokens[:, :T0] = prompt
        self.end.fill_(T0 + max_new_tokens)

    def x0(self, lens: Tensor) -> Tensor:
        return self.tokens.gather(1, lens[:, None])  # (B, 1)

    def write(self, lens: Tensor, tokens: Tensor, logp: Tensor, n: Tensor) -> None:
        """Put tokens / logp (B, m) at slots lens+1 .. lens+m, keeping only the first n[b] per row."""
        m = tokens.shape[1]
        ar = torch.arange(m, device=lens.device)
        idx = lens[:, None] + 1 + ar
        keep = ar[None, :] < n[:, None]
        self.tokens.scatter_(1, idx, torch.where(keep, tokens, self.tokens.gather(1, idx)))
        self.logp.scatter_(1, idx, torch.where(keep, logp.to(self.logp.dtype), self.logp.gather(1, idx)))


@dataclass
class Rollout:
    """Generated tokens and the policy's log-probabilities of them."""

    tokens: Tensor  # (B, max_new_tokens)
    logp: Tensor  # (B, max_new_tokens): log p_policy(token | prefix), sampling distribution
    seconds: float = 0.0
    stats: dict = field(default_factory=dict)


def prefill(model, cache, prompt: Tensor) -> None:
    """Run all prompt tokens but the last through ``model``; the last becomes x0."""
    B, T0 = prompt.shape
    if T0 < 2:
        raise ValueError(f"prompts need at least 2 tokens, got {T0}")
    cache.lens.zero_()
    slots, mask = causal_slot_mask(cache.lens, T0 - 1, cache.max_len)
    model(prompt[:, :-1], cache, positions=slots, slots=slots, mask=mask)
    cache.lens.fill_(T0 - 1)


def decode_one_token(model, cache, state: GenState, params: SamplingParams,
                     generator: torch.Generator | None = None) -> None:
    """Sample one token per unfinished row with the KV cache; rows past ``end`` stay put."""
    lens = cache.lens
    slots, mask = causal_slot_mask(lens, 1, cache.max_len)
    logits = model(state.x0(lens), cache, positions=slots, slots=slots, mask=mask)[:, -1]
    probs = probs_from_params(logits, params)  # (B, V) float32
    y = sample_from_probs(probs, generator)  # (B,)
    logp = probs.gather(1, y[:, None]).log()
    active = (lens + 1 < state.end).long()
    state.write(lens, y[:, None], logp, active)
    lens.add_(active)


# --------------------------------------------------------------------------- CUDA graphs

class GraphedStep:
    """``fn()`` (reads and writes only persistent tensors) captured once, replayed per call.

    Without CUDA (or with ``enabled=False``) it just calls ``fn``. Capturing runs ``fn`` a few
    times first, so callers reset their state after constructing one.
    """

    def __init__(self, fn: Callable[[], None], enabled: bool = True, warmup: int = 2,
                 generators: tuple = ()):
        self.fn = fn
        self.graph = None
        if not (enabled and torch.cuda.is_available()):
            return
        # no garbage collection while capturing: a collected graph must not be torn down mid-capture
        gc.collect()
        gc.disable()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            for g in generators:  # non-default generators must be registered before capture
                if g is not None:
                    self.graph.register_generator_state(g)
            with torch.cuda.graph(self.graph):
                fn()
        finally:
            gc.enable()

    def __call__(self) -> None:
        if self.graph is None:
            self.fn()
        else:
            self.graph.replay()

    def close(self) -> None:
        """Free the graph now (after the device is idle) instead of whenever it is collected."""
        if self.graph is not None:
            torch.cuda.synchronize()
            self.graph.reset()
            self.graph = None
        self.fn = None


def cuda_generator(device, generator: torch.Generator | None) -> torch.Generator | None:
    """A sampler's own CUDA generator, so its graph's random stream is independent of others'."""
    if generator is not None or torch.device(device).type != "cuda":
        return generator
    if not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
        return None  # older torch: graphs only track the default generator
    g = torch.Generator(device=device)
    g.manual_seed(int(torch.randint(0, 2**62, ())))
    return g


def capture(sampler, fn: Callable[[], None], enabled: bool) -> GraphedStep:
    """GraphedStep over the sampler's own generator; the default generator if that fails."""
    try:
        return GraphedStep(fn, enabled=enabled, generators=(sampler.generator,))
    except RuntimeError:
        if sampler.generator is None:
            raise
        torch.cuda.synchronize()
        sampler.generator = None
        return GraphedStep(fn, enabled=enabled)


def cache_for(model, batch: int, max_len: int, device, dtype):
    """A static KV cache for ``model``; a tensor-parallel shard (``srl.parallel``) holds its heads."""
    from srl.policies.lm import KVCache

    cfg = model.config
    return KVCache(cfg.n_layers, batch, getattr(model, "local_heads", cfg.n_heads), max_len,
                   cfg.head_dim, device=device, dtype=dtype)


def round_up(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


class PlainSampler:
    """Autoregressive sampling from one model with a static KV cache (and a CUDA graph on GPU).

    ``steps_per_graph`` decode steps are captured in one graph to amortise the replay launch.
    ``fused``: run each step through ``srl.generation.fused_decode.FusedDecodeStep`` (the same
    function in about a third of the launches); None: on CUDA when the model allows it.
    """

    def __init__(self, model, batch: int, max_len: int, params: SamplingParams = SamplingParams(),
                 cuda_graph: bool = True, steps_per_graph: int = 8, dtype=None,
                 generator: torch.Generator | None = None, fused: bool | None = None):
        from srl.generation.fused_decode import FusedDecodeStep, fused_unsupported
        from srl.policies.lm import require_cats

        require_cats(model)  # CATS MLPs (mlp.cats) run with their calibrated thresholds
        p = next(model.parameters())
        self.model, self.params = model, params.validate()
        self.generator = cuda_generator(p.device, generator)
        max_len = round_up(max_len) if p.device.type == "cuda" else max_len
        self.cache = cache_for(model, batch, max_len, p.device, dtype or p.dtype)
        self.state = GenState.allocate(batch, max_len, p.device)
        self.steps_per_graph = steps_per_graph if (cuda_graph and torch.cuda.is_available()) else 1
        if fused is None:
            fused = p.device.type == "cuda" and fused_unsupported(model, self.params) is None
        self._fused = FusedDecodeStep(model, self.cache, self.state, self.params) if fused else None
        dummy = torch.zeros(batch, 2, dtype=torch.long, device=p.device)
        self.state.reset(dummy, 1)
        with torch.inference_mode():
            prefill(model, self.cache, dummy)
            self._step = capture(self, self._steps, cuda_graph)

    def close(self) -> None:
        self._step.close()

    def _steps(self) -> None:
        for _ in range(self.steps_per_graph):
            if self._fused is not None:
                self._fused(self.generator)
            else:
                decode_one_token(self.model, self.cache, self.state, self.params, self.generator)

    @torch.inference_mode()
    def generate(self, prompt: Tensor, max_new_tokens: int) -> Rollout:
        B, T0 = prompt.shape
        if T0 + max_new_tokens + self.steps_per_graph + 1 > self.cache.max_len:
            raise ValueError(f"prompt ({T0}) + max_new_tokens ({max_new_tokens}) does not fit "
                             f"the cache ({self.cache.max_len} slots)")
        t0 = time.perf_counter()
        self.state.reset(prompt, max_new_tokens)
        prefill(self.model, self.cache, prompt)
        for _ in range(-(-max_new_tokens // self.steps_per_graph)):
            self._step()
        out = Rollout(self.state.tokens[:, T0:T0 + max_new_tokens].clone(),
                      self.state.logp[:, T0:T0 + max_new_tokens].clone())
        if prompt.is_cuda:
            torch.cuda.synchronize()
        out.seconds = time.perf_counter() - t0
        out.stats = {"target_passes": max_new_tokens, "tokens_per_pass": 1.0}
        return out
