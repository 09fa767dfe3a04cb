"""Process groups for tensor parallelism: a context per rank, and a launcher for local groups.

A tensor-parallel model lives in ``world_size`` processes, one per rank (one GPU each with
NCCL, CPU processes with gloo). Every rank runs the same program on the same inputs; the model's
collectives keep the replicated activations identical across ranks.
"""

from __future__ import annotations

import os
import pickle
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@dataclass
class TPContext:
    """This process's place in a tensor-parallel group."""

    rank: int
    """Index of this process in the group, 0 .. world_size - 1."""
    world_size: int
    """Number of ranks the model is split over."""
    group: Any = None
    """The torch.distributed process group (None: the default group)."""
    device: torch.device = torch.device("cpu")
    """Where this rank's shard lives (cuda:local_rank with NCCL)."""

    @property
    def backend(self) -> str:
        return dist.get_backend(self.group)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """``tensor`` from rank ``src`` on every rank, in place (a leader hands prompts to followers)."""
        dist.broadcast(tensor, src=dist.get_global_rank(self.group, src) if self.group else src,
                       group=self.group)
        return tensor

    def barrier(self) -> None:
        dist.barrier(group=self.group)


def init_group(rank: int, world_size: int, addr: str = "127.0.0.1", port: int = 29500,
               backend: str = "gloo", local_rank: int | None = None) -> TPContext:
    """Join a group of ``world_size`` ranks through the ``torch.distributed.TCPStore`` served at
    ``addr:port`` (one call per process; the launcher serves the store, see ``serve_store``).

    With NCCL the rank's device is ``cuda:local_rank`` (default: ``rank``, i.e. one host).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", rank if local_rank is None else local_rank)
        torch.cuda.set_device(device)
    # a client of a store someone else (the launcher) serves: no rank waits for rank 0's start
    store = dist.TCPStore(addr, port, world_size, is_master=False, wait_for_workers=False)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            **({"device_id": device} if backend == "nccl" else {}))
    return TPContext(rank, world_size, None, device)


def serve_store(addr: str = "127.0.0.1", port: int = 0) -> dist.TCPStore:
    """The rendezvous store of a group, served by the launching process (``port`` 0: any free)."""
    return dist.TCPStore(addr, port, is_master=True, wait_for_workers=False)


def _rank_main(rank: int, world_size: int, port: int, backend: str, fn: Callable, args: tuple,
               results) -> None:
    try:
        if backend == "gloo":  # ranks share the host's cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        ctx = init_group(rank, world_size, port=port, backend=backend)
        try:
            # by value: torch's queue pickler would share storage that dies with this process
            results.put((rank, True, pickle.dumps(fn(ctx, *args))))
        finally:
            dist.destroy_process_group()
    except BaseException:  # report every failure to the launcher, which raises it
        results.put((rank, False, traceback.format_exc()))


def launch_group(world_size: int, fn: Callable[..., Any], *args, backend: str = "gloo",
                 timeout_s: float | None = 300.0) -> list[Any]:
    """Run ``fn(ctx, *args)`` in ``world_size`` new processes; return each rank's result.

    ``fn`` must be importable (module level) and its result picklable. A rank's exception is
    re-raised here as RuntimeError with the remote traceback; every process is joined.
    ``timeout_s`` bounds the wait for results (None: no bound, for long-lived worker groups).
    With ``backend="nccl"`` rank r runs on ``cuda:r``.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    # ranks are forked from a fresh server process that imported torch once (no parent threads
    # are inherited, and a launch does not pay one torch import per rank)
    spawn = mp.get_context("forkserver")
    spawn.set_forkserver_preload(["torch", "srl.parallel"] + (
        [fn.__module__] if fn.__module__ != "__main__" else []))
    results = spawn.SimpleQueue()
    store = serve_store()
    port = store.port
    procs = [spawn.Process(target=_rank_main, args=(r, world_size, port, backend, fn, args, results),
                           daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    errors = []
    try:
        for _ in range(world_size):
            rank, ok, payload = _get(results, procs, timeout_s)
            if not ok:  # the others may block in a collective: stop them
                errors.append(f"rank {rank}:\n{payload}")
                break
            out[rank] = pickle.loads(payload)
    finally:
        for p in procs:  # results are in: a rank still tearing down is stopped
            p.join(timeout=2 if not errors else 0.1)
            if p.is_alive():
                p.terminate()
                p.join()
    if errors:
        raise RuntimeError("tensor-parallel group failed\n" + "\n".join(errors))
    return [out[r] for r in range(world_size)]


def _get(results, procs, timeout_s: float | None):
    """Next result, or RuntimeError if every process died or the timeout passed."""
    deadline = time.monotonic() + (float("inf") if timeout_s is None else timeout_s)
    while time.monotonic() < deadline:
        if not results.empty():
            return results.get()
        if not any(p.is_alive() for p in procs) and results.empty():
            codes = [p.exitcode for p in procs]
            raise RuntimeError(f"tensor-parallel ranks exited without a result (exit codes {codes})")
        time.sleep(0.01)
    raise RuntimeError(f"tensor-parallel group timed out after {timeout_s} s")
