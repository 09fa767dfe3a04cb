"""Data-parallel trainer ranks: one torch.distributed group per trainer-group incarnation.

Rank 0 hosts the rendezvous store and publishes its address in the run's address book; the
others find it there. NCCL carries gradients when the trainers are on GPUs, gloo otherwise; a
small gloo group carries the per-poll agreement (train now? stop now?), so no rank ever waits in
a collective that another rank will not join.
"""
from __future__ import annotations

import datetime
from typing import Iterable

import torch
import torch.distributed as dist

from srl.system.name_resolve import NameResolver, wait_for

TIMEOUT_S = 120.0


class DataParallel:
    def __init__(self, rank: int, world: int, backend: str, resolver: NameResolver, key: str, host: str,
                 should_stop=None):
        self.rank, self.world = rank, world
        timeout = datetime.timedelta(seconds=TIMEOUT_S)
        if rank == 0:
            store = dist.TCPStore(host, 0, world, is_master=True, timeout=timeout, wait_for_workers=False)
            resolver.put(key, f"{host}:{store.port}")
        else:
            address = wait_for(resolver, key, should_stop=should_stop)
            store_host, port = address.rsplit(":", 1)
            store = dist.TCPStore(store_host, int(port), world, is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        self.backend = backend
        self.control = dist.new_group(backend="gloo") if backend != "gloo" else None

    def agree(self, ready: bool, stop: bool) -> tuple[bool, bool]:
        """(every rank is ready, some rank wants to stop), the same answer on every rank."""
        flags = torch.tensor([int(ready), int(stop)], dtype=torch.int64)
        dist.all_reduce(flags, group=self.control)
        return int(flags[0]) == self.world, int(flags[1]) > 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce ``tensor`` in place (sum over ranks) and return it."""
        if self.backend == "nccl" or tensor.device.type == "cpu":
            dist.all_reduce(tensor)
            return tensor
        host = tensor.cpu()
        dist.all_reduce(host)
        tensor.copy_(host)
        return tensor

    def average_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Average gradients over ranks with one all-reduce of one flat buffer."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.sum(flat).div_(self.world)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Make every rank's parameters and buffers rank 0's."""
        for t in list(module.parameters()) + list(module.buffers()):
            with torch.no_grad():
                if self.backend == "nccl" or t.device.type == "cpu":
                    dist.broadcast(t.data, 0)
                else:
                    host = t.data.cpu()
                    dist.broadcast(host, 0)
                    t.data.copy_(host)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def weights_digest(module: torch.nn.Module) -> float:
    """A checksum of every parameter and buffer (ranks holding the same weights agree exactly)."""
    with torch.no_grad():
        total = torch.zeros((), dtype=torch.float64, device=next(module.parameters()).device)
        for i, t in enumerate(module.state_dict().values()):
            total += (t.double().reshape(-1) * (1.0 + 1e-3 * (i % 97))).sum()
    return float(total)
