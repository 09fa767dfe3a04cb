"""Run outputs: ``metrics.jsonl``, TensorBoard scalars and the live console line."""
from __future__ import annotations

import json
import math
import os
import sys
import threading
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
        self._tb_pending: list[dict] = []
        self._tb_thread = None
        if tensorboard:
            # importing tensorboard takes about a second: do it beside the run, not before it
            self._tb_thread = threading.Thread(target=self._open_tensorboard, args=(run_dir,), daemon=True)
            self._tb_thread.start()
        self.console = console
        self._tty = sys.stderr.isatty()
        self._last_print = 0.0

    def _open_tensorboard(self, run_dir: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(log_dir=os.path.join(run_dir, "tb"))

    def write(self, row: dict) -> None:
        clean = {k: _finite(v) for k, v in row.items()}
        self._fh.write(json.dumps(clean) + "\n")
        self._fh.flush()
        if self._tb_thread is not None:
            self._tb_pending.append(clean)
            if self._tb is not None:
                self._flush_tensorboard()
        if self.console:
            self._progress(row)

    def _flush_tensorboard(self) -> None:
        for row in self._tb_pending:
            step = int(row.get("env_steps", 0))
            for key, value in row.items():
                if key != "env_steps" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key if "/" in key else f"charts/{key}", value, step)
        self._tb_pending = []

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
        if self._tb_thread is not None:
            self._tb_thread.join()
            self._flush_tensorboard()
            self._tb.close()


def _finite(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
