"""What the runtime executes: workers, the streams between them and opaque component names.

A :class:`Plan` is plain data. The RL layer compiles it from an experiment (``srl.plan``); the
runtime (controller, schedulers, worker base) only reads it: which processes to start with what
resources, which of them form a group that lives and dies together, and which stream each one
serves or uses, so that a server that moved can have its clients restarted.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Routing(str, enum.Enum):
    """How a stream's clients reach its servers."""

    ROUND_ROBIN = "round_robin"
    """Any server takes any message (stateless servers, load spread)."""
    STICKY = "sticky"
    """Every message of one key (an env) reaches the same server for the whole run."""
    FAN_IN = "fan_in"
    """Each client sends to one server; clients are spread evenly over the servers."""
    BROADCAST = "broadcast"
    """Every server holds the same content; each client asks one of them."""


@dataclass(frozen=True)
class Resources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    custom: tuple[tuple[str, float], ...] = ()
    spread: bool = False
    """Ray: place with the SPREAD strategy."""
    nice: int = 0
    """CPU priority of the worker's process, as ``nice`` sets it (0-19; higher yields the cores to
    the others on a busy machine). Applied when the worker starts, before its threads exist."""


@dataclass(frozen=True)
class WorkerPlan:
    role: str
    index: int
    """Index among the workers of this role (also the rank within the role)."""
    world: int
    """How many workers the role has."""
    resources: Resources = field(default_factory=Resources)
    group: str | None = None
    """Workers of one group (data-parallel trainer ranks) are restarted together."""

    @property
    def name(self) -> str:
        return f"{self.role}/{self.index}"

    @property
    def rank(self) -> int:
        return self.index


@dataclass(frozen=True)
class StreamPlan:
    """One named stream: who serves it, who uses it and how clients pick a server."""

    name: str
    routing: Routing
    servers: tuple[str, ...]
    clients: tuple[str, ...]
    assignment: tuple[tuple[str, str], ...] = ()
    """(client, server) pairs for fan-in and broadcast streams; empty when any server will do."""

    def key(self, server: str) -> str:
        """The address-book key under which ``server`` publishes this stream's address."""
        return f"{server}/{self.name}"

    def server_of(self, client: str) -> str:
        for c, s in self.assignment:
            if c == client:
                return s
        raise KeyError(f"stream {self.name!r} assigns no server to {client!r}")

    def clients_of(self, server: str) -> tuple[str, ...]:
        """Workers connected to ``server`` (assignment keys may name a part of a worker as
        ``worker#part``, e.g. one env group of an actor)."""
        if not self.assignment:
            return self.clients
        return tuple(dict.fromkeys(c.split("#")[0] for c, s in self.assignment if s == server))


@dataclass(frozen=True)
class Plan:
    workers: tuple[WorkerPlan, ...]
    streams: tuple[StreamPlan, ...]
    components: tuple[tuple[str, str], ...] = ()
    """(slot, registered name) pairs, e.g. ``("learner", "ppo")``: what each role builds."""

    def worker(self, name: str) -> WorkerPlan:
        for w in self.workers:
            if w.name == name:
                return w
        raise KeyError(f"no worker {name!r} in the plan")

    def role(self, role: str) -> tuple[WorkerPlan, ...]:
        return tuple(w for w in self.workers if w.role == role)

    def stream(self, name: str) -> StreamPlan:
        for s in self.streams:
            if s.name == name:
                return s
        raise KeyError(f"no stream {name!r} in the plan")

    def component(self, slot: str) -> str:
        return dict(self.components)[slot]

    def served_by(self, worker: str) -> list[tuple[StreamPlan, str]]:
        """(stream, address key) of every stream ``worker`` serves."""
        return [(s, s.key(worker)) for s in self.streams if worker in s.servers]

    def clients_of(self, worker: str) -> set[str]:
        """Workers that connect to a stream ``worker`` serves."""
        out: set[str] = set()
        for s in self.streams:
            if worker in s.servers:
                out.update(s.clients_of(worker))
        return out

    def group_members(self, worker: str) -> list[str]:
        group = self.worker(worker).group
        if group is None:
            return [worker]
        return [w.name for w in self.workers if w.group == group]
