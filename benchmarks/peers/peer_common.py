"""Shared helpers for the peer runners (standard library only).

Every runner imports this first, before any heavy import, so that the launch
time of the process is known; it then feeds finished-episode returns into a
``StopRule`` and prints the same ``final:`` line that ``srl run`` prints.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time

_IMPORT_TIME = time.time()


def _process_start_time() -> float | None:
    """Wall-clock time at which this process was started (Linux, 10 ms resolution).

    stat(5) gives the start as clock ticks since boot; CLOCK_BOOTTIME gives the
    time since boot now, so their difference is the age of the process.
    """
    try:
        with open("/proc/self/stat") as f:
            stat = f.read()
        # The command name may contain spaces; fields after ')' are well formed.
        fields = stat[stat.rindex(")") + 2:].split()
        start_ticks = int(fields[19])  # field 22 of stat(5): starttime
        now_wall = time.time()
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
        return now_wall - age
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def launch_time() -> float:
    """Launch time of the process: the kernel's start time, else our import time."""
    start = _process_start_time()
    if start is None or start > _IMPORT_TIME or _IMPORT_TIME - start > 60:
        return _IMPORT_TIME
    return start


T_LAUNCH = launch_time()

TARGET_RETURN = 475.0
WINDOW = 20


class StopRule:
    """Mean return over the last 20 finished episodes >= 475, the rule srl uses."""

    def __init__(self, target: float = TARGET_RETURN, window: int = WINDOW) -> None:
        self.target = target
        self.returns: collections.deque[float] = collections.deque(maxlen=window)
        self.episodes = 0
        self.t_reached: float | None = None

    def add(self, episode_return: float) -> bool:
        self.returns.append(float(episode_return))
        self.episodes += 1
        if self.reached and self.t_reached is None:
            self.t_reached = time.time()
        return self.reached

    @property
    def mean(self) -> float:
        return sum(self.returns) / len(self.returns) if self.returns else float("nan")

    @property
    def reached(self) -> bool:
        return len(self.returns) == self.returns.maxlen and self.mean >= self.target


def report(rule: StopRule, env_steps: int, t_train_start: float, extra: dict | None = None) -> None:
    """Print the ``final:`` line (wall_s from launch) and one JSON ``stats:`` line."""
    now = time.time()
    t_end = rule.t_reached if rule.t_reached is not None else now
    wall_s = t_end - T_LAUNCH
    train_s = max(t_end - t_train_start, 1e-9)
    stats = {
        "reached": rule.reached,
        "env_steps": int(env_steps),
        "mean_return": rule.mean,
        "episodes": rule.episodes,
        "wall_s": wall_s,
        "setup_s": t_train_start - T_LAUNCH,
        "train_s": train_s,
        "env_steps_per_s_train": env_steps / train_s,
        "env_steps_per_s_wall": env_steps / max(wall_s, 1e-9),
    }
    if extra:
        stats.update(extra)
    print(f"final: env_steps={int(env_steps)} mean_return={rule.mean:.1f} wall_s={wall_s:.2f}", flush=True)
    print("stats: " + json.dumps(stats, sort_keys=True), flush=True)
    sys.stdout.flush()
