"""Token tasks in a run: building the task named by ``env.id`` and what every worker derives
from it (the prompt and completion shapes, the sampling distribution).

A token task follows the protocol of :class:`srl.envs.text.TokenTask`; ``env.id`` names a
built-in (``srl/Addition-v0``, ``srl/Sort-v0``) or a class given to
``srl.registry.register_task`` / ``srl.Experiment(config, task=MyTask)``, built as
``cls(**env.kwargs)``.
"""
from __future__ import annotations

import numpy as np

from srl import registry
from srl.envs.vector import SpaceInfo
from srl.errors import ConfigError
from srl.generation.sampling import SamplingParams

MAX_PROMPT_LEN = 1 << 16


def is_token_task(cfg) -> bool:
    """True when ``cfg.env.id`` names a token task rather than a gymnasium environment."""
    return cfg.env.id in registry.names("task")


def build_task(cfg):
    """The task of ``cfg`` with ``env.kwargs``; ConfigError naming the field when it cannot be built."""
    cls = registry.resolve("task", cfg.env.id)
    try:
        task = cls(**cfg.env.kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError("env.kwargs", f"{cfg.env.id} rejected its arguments: {exc}")
    for name in ("vocab_size", "eos_id", "pad_id"):
        value = getattr(task, name, None)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ConfigError("env.id", f"{cfg.env.id}: the task has no integer {name}")
    if not (0 <= task.eos_id < task.vocab_size and 0 <= task.pad_id < task.vocab_size):
        raise ConfigError("env.id", f"{cfg.env.id}: eos_id and pad_id must be token ids below vocab_size")
    return task


def prompt_len(task) -> int:
    """The task's prompt length (``prompt_len`` if it says, else measured on one prompt)."""
    n = getattr(task, "prompt_len", None)
    if n is None:
        n = np.asarray(task.sample_prompts(1, np.random.default_rng(0))).shape[1]
    if not 2 <= int(n) <= MAX_PROMPT_LEN:
        raise ConfigError("env.id", f"prompts must have 2 to {MAX_PROMPT_LEN} tokens, the task gives {n}")
    return int(n)


def max_new_tokens(cfg, task) -> int:
    """``generation.max_new_tokens``, or the task's ``answer_len`` when that is 0."""
    n = cfg.generation.max_new_tokens or int(getattr(task, "answer_len", 0))
    if n < 1:
        raise ConfigError("generation.max_new_tokens", f"must be set: {cfg.env.id} has no answer_len")
    return n


def task_space(cfg, task) -> SpaceInfo:
    """The run's spaces: observations are prompts, actions are tokens."""
    return SpaceInfo((prompt_len(task),), True, int(task.vocab_size))


def sampling_params(cfg) -> SamplingParams:
    g = cfg.generation
    return SamplingParams(g.temperature, g.top_k, g.top_p).validate()


def completion_mask(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """Generated tokens up to and including the first ``eos_id`` of each row: (n, N) bool."""
    eos = tokens == eos_id
    before = np.cumsum(eos, axis=1) - eos  # eos tokens strictly before each position
    return before == 0


def finish_completions(tokens: np.ndarray, logp: np.ndarray, eos_id: int, pad_id: int):
    """``pad_id`` (log-prob 0) after the first ``eos_id``: completions as the protocol hands them."""
    mask = completion_mask(tokens, eos_id)
    return np.where(mask, tokens, pad_id), np.where(mask, logp, 0.0).astype(np.float32), mask
