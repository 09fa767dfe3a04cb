"""Local scheduler: one process per worker on this host."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time

from srl.system.worker import WorkerSpec, run_worker


class LocalScheduler:
    def __init__(self, start_method: str = "fork"):
        self.start_method = start_method
        self.procs: dict[str, mp.Process] = {}
        self.specs: dict[str, WorkerSpec] = {}

    def _context(self):
        """``fork`` unless this process has already initialised CUDA: a forked child cannot use
        its parent's CUDA context, so workers are spawned then (e.g. a second run from a Python
        session that touched the GPU)."""
        torch = sys.modules.get("torch")
        if self.start_method == "fork" and torch is not None and torch.cuda.is_initialized():
            return mp.get_context("spawn")
        return mp.get_context(self.start_method)

    def start(self, spec: WorkerSpec) -> None:
        proc = self._context().Process(target=run_worker, args=(spec,), name=f"srl-{spec.kind}-{spec.index}",
                                       daemon=False)
        proc.start()
        self.procs[spec.name] = proc
        self.specs[spec.name] = spec

    def alive(self, name: str) -> bool:
        """False also for a worker not started yet (a stop during start-up asks about every one)."""
        proc = self.procs.get(name)
        return proc is not None and proc.is_alive()

    def exitcode(self, name: str) -> int | None:
        proc = self.procs.get(name)
        return None if proc is None else proc.exitcode

    def pid(self, name: str) -> int | None:
        proc = self.procs.get(name)
        return None if proc is None else proc.pid

    def names(self) -> list[str]:
        return list(self.procs)

    def restart(self, name: str, spec: WorkerSpec) -> None:
        self.kill(name)
        self.start(spec)

    def kill(self, name: str) -> None:
        proc = self.procs.get(name)
        if proc is not None and proc.is_alive():
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc is not None:
            proc.join(timeout=5)

    def wait_all(self, timeout_s: float) -> list[str]:
        """Join every worker; kill those still running after ``timeout_s``. Returns the killed."""
        deadline = time.monotonic() + timeout_s
        for proc in self.procs.values():
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        stragglers = [n for n, p in self.procs.items() if p.is_alive()]
        for name in stragglers:
            self.procs[name].terminate()
            self.procs[name].join(timeout=2)
            self.kill(name)
        return stragglers
