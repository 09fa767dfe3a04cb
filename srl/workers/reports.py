"""Typed reports: what each worker role tells the controller with every heartbeat.

A report travels as a plain mapping inside a stats message; :func:`parse` turns it back into its
dataclass and refuses (ValueError) a field of the wrong type or an amount the worker could not
have produced, so a forged or corrupted stats message cannot move the run's counters.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

MAX_EPISODES_PER_REPORT = 1 << 20
MAX_LOSS_KEYS = 64


@dataclass
class ActorReport:
    env_steps: int = 0
    """Valid env steps since the last report."""
    episode_returns: list[float] = field(default_factory=list)
    episode_lengths: list[int] = field(default_factory=list)
    version: int = -1
    """Newest policy version this actor has seen."""
    env_wait_s: float = 0.0
    """Seconds spent waiting for the envs to step (ale-py's threads, between ``send`` and ``recv``)."""
    reply_wait_s: float = 0.0
    """Seconds spent waiting for actions from the policy workers with no env left to step."""


@dataclass
class PolicyReport:
    requests: int = 0
    forward_passes: int = 0
    version: int = -1
    busy_s: float = 0.0
    """Seconds spent answering requests (receiving, checking, the forward pass, replying)."""
    forward_s: float = 0.0
    """Of those, seconds in the forward pass and the copies to and from its device."""
    envs: list[int] = field(default_factory=list)
    """At exit: the ids of every env this worker served (sticky routing keeps these disjoint)."""


@dataclass
class TrainerReport:
    version: int = 0
    rank: int = 0
    learned_steps: int = 0
    """Env steps trained on since the last report."""
    dropped_stale: int = 0
    """Trajectories dropped so far because their policy was too old."""
    policy_lag: float = float("nan")
    digest: float = float("nan")
    """A checksum of the weights at ``version`` (data-parallel ranks must agree)."""
    stats: dict[str, float] = field(default_factory=dict)
    """cleanrl-named learner statistics of the last update (``losses/*``, ``charts/*``, ``perf/*``)."""
    path: str = ""
    """Set in ``checkpoint`` events: the checkpoint just written."""


@dataclass
class TokenActorReport(ActorReport):
    """A token task actor: each completion is one env step and one episode (its reward)."""

    draft_sent: int = 0
    """Sample messages handed to the draft worker so far (this incarnation)."""
    draft_skipped: int = 0
    """Sample messages the draft worker was too busy to take (one-epoch regime: skipped, not queued)."""


@dataclass
class GenerationReport:
    requests: int = 0
    completions: int = 0
    version: int = -1
    draft_version: int = -1
    stats: dict[str, float] = field(default_factory=dict)
    """``generation/*``: tokens per target pass, acceptance, seconds per batch."""


@dataclass
class DraftReport:
    sequences: int = 0
    """Sequences distilled so far (this incarnation), each exactly once."""
    updates: int = 0
    duplicates: int = 0
    """Sample messages refused because they had been used already."""
    version: int = -1
    """The draft's weights version."""
    stats: dict[str, float] = field(default_factory=dict)
    """``draft/*``: acceptance rate and block efficiency measured before each update, distillation loss."""


REPORTS = {"actor": ActorReport, "policy": PolicyReport, "trainer": TrainerReport, "token_actor": TokenActorReport,
           "generation": GenerationReport, "draft": DraftReport}


def to_meta(report) -> dict:
    return dataclasses.asdict(report)


def parse(role: str, meta: dict):
    """The report of ``role`` in ``meta``, type-checked; ValueError names a bad field."""
    cls = REPORTS.get(role)
    if cls is None:
        raise ValueError(f"no report type for role {role!r}")
    if not meta:
        return cls()
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in meta:
            kwargs[f.name] = _check(f.name, f.type, meta[f.name])
    unknown = set(meta) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"{role} report: unknown fields {sorted(unknown)[:3]}")
    return cls(**kwargs)


def _check(name: str, tp: str, value):
    if tp == "int":
        if isinstance(value, bool) or not isinstance(value, int) or abs(value) >= 1 << 62:
            raise ValueError(f"{name}: expected an integer, got {type(value).__name__}")
        return value
    if tp == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}: expected a number, got {type(value).__name__}")
        return float(value)
    if tp == "str":
        if not isinstance(value, str) or len(value) > 4096:
            raise ValueError(f"{name}: expected a short string")
        return value
    if tp.startswith("list["):
        item = tp[5:-1]
        if not isinstance(value, list) or len(value) > MAX_EPISODES_PER_REPORT:
            raise ValueError(f"{name}: expected a list")
        return [_check(name, item, v) for v in value]
    if tp.startswith("dict["):
        if not isinstance(value, dict) or len(value) > MAX_LOSS_KEYS:
            raise ValueError(f"{name}: expected a small mapping")
        return {_check(name, "str", k): _check(name, "float", v) for k, v in value.items()}
    raise ValueError(f"{name}: unsupported field type {tp}")
