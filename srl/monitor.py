"""The RL side of a run as the controller sees it: counters, episodes, the stop rule.

The controller hands every validated stats message here (:meth:`RLMonitor.on_report`); this
class turns the typed reports into env-step and episode counters, the mean return the stop rule
reads, the metric row and the run's result. It refuses amounts a worker could not have produced.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np

from srl.config import ExperimentConfig
from srl.workers.reports import ActorReport, PolicyReport, TrainerReport, parse

RETURN_WINDOW = 20
MAX_STEPS_PER_ENV_S = 1_000_000
WORKER_SECONDS = {
    ("actor", "env_wait_s"): "perf/actor_env_wait",
    ("actor", "reply_wait_s"): "perf/actor_reply_wait",
    ("policy", "busy_s"): "perf/policy_busy",
    ("policy", "forward_s"): "perf/policy_forward",
}
"""Seconds the workers report, shown as the fraction of wall time per worker of the role."""
"""Ceiling on the env steps one env can report per second (far above any simulator)."""


def return_window(cfg: ExperimentConfig) -> int:
    """Episodes the mean return averages: ``stop.window``, else the last 20, or for a token task (one completion, one
    episode) the last ``algorithm.batch_size`` completions, at least 20."""
    from srl.envs.tokens import is_token_task

    if cfg.stop.window is not None:
        return cfg.stop.window
    return max(RETURN_WINDOW, cfg.algorithm.batch_size) if is_token_task(cfg) else RETURN_WINDOW


@dataclass
class RunResult:
    run_dir: str
    env_steps: int
    mean_return: float | None
    wall_s: float
    episodes: int
    reason: str
    restarts: int = 0

    def final_line(self) -> str:
        ret = "nan" if self.mean_return is None else f"{self.mean_return:.2f}"
        return f"final: env_steps={self.env_steps} mean_return={ret} wall_s={self.wall_s:.2f}"


class RLMonitor:
    def __init__(self, cfg: ExperimentConfig, run_dir: str):
        self.cfg = cfg
        self.env_steps = 0
        self.episodes = 0
        self.learned_steps = 0
        self.returns: collections.deque = collections.deque(maxlen=return_window(cfg))
        self.mean_at_stop: float | None = None
        """The mean return that met ``stop.mean_return``, the run's reported result."""
        self.window_returns: list[float] = []
        self.window_lengths: list[int] = []
        self.trainer_stats: dict = {}
        self.version = 0
        self.digests: dict[int, dict[int, float]] = {}
        self.digest_mismatches = 0
        self.digests_compared = 0
        self._last_report: dict[str, float] = {}
        self._window_learned = 0
        self._window_seconds = dict.fromkeys(WORKER_SECONDS, 0.0)
        self._sps_steps = 0
        self._mark = time.monotonic()
        self.episodes_fh = open(os.path.join(run_dir, "episodes.jsonl"), "a", encoding="utf-8")

    # ------------------------------------------------------------------ reports
    def on_report(self, worker: str, role: str, event: str, meta: dict) -> dict:
        if not meta:  # an event from a worker not configured yet: it has no state to report
            return {}
        report = parse(role, meta)
        if isinstance(report, ActorReport):
            self._on_actor(worker, report)
        elif isinstance(report, TrainerReport):
            self._on_trainer(report)
        elif isinstance(report, PolicyReport):
            self._add_seconds("policy", report)
        elif isinstance(getattr(report, "stats", None), dict):  # generation and draft workers
            self.trainer_stats.update({k: v for k, v in report.stats.items() if k.startswith(("generation/", "draft/"))})
        fields = dataclasses.asdict(report)
        return {k: v for k, v in fields.items() if k not in ("episode_returns", "episode_lengths", "stats")}

    def _on_actor(self, worker: str, r: ActorReport) -> None:
        now = time.monotonic()
        dt = now - self._last_report.get(worker, now - 1.0)
        envs = self.cfg.workers.actors.envs_per_actor
        limit = envs * (self.cfg.workers.actors.rollout_len + MAX_STEPS_PER_ENV_S * max(dt, 0.0) + 1)
        if not 0 <= r.env_steps <= limit:
            raise ValueError(f"{worker}: {r.env_steps} env steps in {dt:.2f} s is more than {envs} envs can make")
        if len(r.episode_returns) != len(r.episode_lengths) or len(r.episode_returns) > r.env_steps + envs:
            raise ValueError(f"{worker}: episode lists do not match its steps")
        if not all(math.isfinite(x) for x in r.episode_returns) or any(n < 0 for n in r.episode_lengths):
            raise ValueError(f"{worker}: non-finite returns or negative lengths")
        self._last_report[worker] = now
        self._add_seconds("actor", r)
        self.env_steps += r.env_steps
        for ret, n in zip(r.episode_returns, r.episode_lengths):
            row = {"worker": worker, "return": float(ret), "length": int(n), "env_steps": self.env_steps}
            self.episodes_fh.write(json.dumps(row) + "\n")
        self.returns.extend(r.episode_returns)
        self.window_returns.extend(r.episode_returns)
        self.window_lengths.extend(r.episode_lengths)
        self.episodes += len(r.episode_returns)

    def _add_seconds(self, role: str, r: ActorReport | PolicyReport) -> None:
        for key in WORKER_SECONDS:
            if key[0] == role:
                value = getattr(r, key[1])
                if not 0.0 <= value < 1e6:
                    raise ValueError(f"{role} report: {key[1]} = {value}")
                self._window_seconds[key] += value

    def _on_trainer(self, r: TrainerReport) -> None:
        if r.learned_steps < 0 or r.dropped_stale < 0:
            raise ValueError("trainer report: negative counts")
        if r.rank == 0:
            self.version = max(self.version, r.version)
            self.trainer_stats.update({k: v for k, v in r.stats.items() if "/" in k})
            self.trainer_stats["trainer/dropped_stale"] = r.dropped_stale
            if math.isfinite(r.policy_lag):
                self.trainer_stats["charts/policy_lag"] = r.policy_lag
        self.learned_steps += r.learned_steps
        self._window_learned += r.learned_steps
        if math.isfinite(r.digest) and self.cfg.workers.trainers.count > 1:
            self._compare_digest(r)

    def _compare_digest(self, r: TrainerReport) -> None:
        seen = self.digests.setdefault(r.version, {})
        seen[r.rank] = r.digest
        if len(seen) == self.cfg.workers.trainers.count:
            self.digests_compared += 1
            if len(set(seen.values())) > 1:
                self.digest_mismatches += 1
            del self.digests[r.version]
        for v in [v for v in self.digests if v < r.version - 1000]:
            del self.digests[v]

    # ------------------------------------------------------------------ controller hooks
    def mean_return(self) -> float | None:
        return float(np.mean(self.returns)) if len(self.returns) >= self.returns.maxlen else None

    def stop_reason(self, wall_s: float) -> str:
        stop = self.cfg.stop
        if stop.env_steps is not None and self.env_steps >= stop.env_steps:
            return "env_steps"
        mean = self.mean_return()
        if stop.mean_return is not None and mean is not None and mean >= stop.mean_return:
            self.mean_at_stop = mean  # games that end while the workers stop do not change the result
            return "mean_return"
        if stop.wall_s is not None and wall_s >= stop.wall_s:
            return "wall_s"
        return ""

    def counters(self) -> dict:
        return {"env_steps": self.env_steps, "episodes": self.episodes, "version": self.version}

    def restore(self, counters: dict, last_row: dict) -> None:
        """Counters go on from the checkpoint, never below what metrics.jsonl already showed (the
        steps collected after the last checkpoint were collected; their learning is what a crash
        loses)."""
        def at_least(key: str) -> int:
            values = [v for v in (counters.get(key), last_row.get(key)) if isinstance(v, (int, float))]
            return int(max(values, default=0))

        self.env_steps, self.episodes, self.version = at_least("env_steps"), at_least("episodes"), at_least("version")
        self._sps_steps = self.env_steps

    def row(self) -> dict:
        now = time.monotonic()
        dt, self._mark = max(now - self._mark, 1e-9), now
        sps_steps, self._sps_steps = self.env_steps - self._sps_steps, self.env_steps
        row = {
            "env_steps": self.env_steps,
            "mean_return": self.mean_return(),
            "episodes": self.episodes,
            "charts/episodic_return": float(np.mean(self.window_returns)) if self.window_returns else None,
            "charts/episodic_length": float(np.mean(self.window_lengths)) if self.window_lengths else None,
            "charts/SPS": sps_steps / dt,
            "charts/learned_SPS": self._window_learned / dt,
            "learned_steps": self.learned_steps,
            "version": self.version,
            **self.trainer_stats,
            **self._seconds_row(dt),
        }
        if self.cfg.workers.trainers.count > 1:
            row["trainer/digests_compared"] = self.digests_compared
            row["trainer/digest_mismatches"] = self.digest_mismatches
        self.window_returns, self.window_lengths, self._window_learned = [], [], 0
        self.episodes_fh.flush()
        return row

    def _seconds_row(self, dt: float) -> dict:
        """The fractions of WORKER_SECONDS over the last ``dt`` seconds (reset after)."""
        counts = {"actor": self.cfg.workers.actors.count, "policy": self.cfg.workers.policies.count}
        row = {}
        for key, value in self._window_seconds.items():
            if value > 0.0:
                row[WORKER_SECONDS[key]] = value / (dt * max(counts[key[0]], 1))
        self._window_seconds = dict.fromkeys(WORKER_SECONDS, 0.0)
        return row

    def result(self, run_dir: str, reason: str, wall_s: float, restarts: int) -> RunResult:
        self.episodes_fh.close()
        mean = self.mean_at_stop if reason == "mean_return" and self.mean_at_stop is not None else self.mean_return()
        return RunResult(run_dir, self.env_steps, mean, wall_s, self.episodes, reason, restarts)
