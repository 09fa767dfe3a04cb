"""Run outputs: ``metrics.jsonl``, TensorBoard scalars and the live console line."""
from __future__ import annotations

import json
import math
import os
import sys
import time


def process_start_time() -> float:
    """Wall-clock time this process was launched (Linux: from /proc), else now."""
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat: starttime, in clock ticks after boot
        with open("/proc/uptime", encoding="ascii") as fh:
            uptime = float(fh.read().split()[0])
        age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - max(0.0, age)
    except (OSError, ValueError, IndexError):
        return time.time()


class RunLog:
    """Writes one row per call to ``metrics.jsonl`` and TensorBoard, and shows progress."""

    def __init__(self, run_dir: str, tensorboard: bool = True, console: bool = True):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._fh = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=os.path.join(run_dir, "tb"))
        self.console = console
        self._tty = sys.stderr.isatty()
        self._last_print = 0.0

    def write(self, row: dict) -> None:
        clean = {k: _finite(v) for k, v in row.items()}
        self._fh.write(json.dumps(clean) + "\n")
        self._fh.flush()
        if self._tb is not None:
            step = int(row.get("env_steps", 0))
            for key, value in clean.items():
                if key not in ("env_steps",) and isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(key if "/" in key else f"charts/{key}", value, step)
        if self.console:
            self._progress(row)

    def _progress(self, row: dict) -> None:
        now = time.monotonic()
        if not self._tty and now - self._last_print < 5.0:
            return
        self._last_print = now
        ret = row.get("mean_return")
        line = (f"[srl] {row.get('wall_s', 0):6.1f}s  steps {row.get('env_steps', 0):>9,d}  "
                f"{row.get('charts/SPS', 0):>8,.0f} sps  return {'-' if ret is None else f'{ret:7.1f}'}  "
                f"v{row.get('version', 0)}  lag {row.get('charts/policy_lag', 0) or 0:.1f}")
        if self._tty:
            sys.stderr.write("\r" + line.ljust(100))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self._tty and self.console:
            sys.stderr.write("\n")
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def _finite(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
