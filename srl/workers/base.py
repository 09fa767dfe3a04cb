"""What every RL worker shares: its config, the env's spaces and its streams' addresses."""
from __future__ import annotations

from srl.envs.vector import SpaceInfo
from srl.system.name_resolve import wait_for
from srl.system.worker import Worker, WorkerSpec


class RLWorker(Worker):
    def __init__(self, spec: WorkerSpec, resolver=None):
        super().__init__(spec, resolver)
        self.cfg = spec.payload.config
        self.info = SpaceInfo.from_dict(spec.payload.space)
        self.plan = spec.plan

    def address(self, stream: str, server: str) -> str:
        """Wait until ``server`` publishes ``stream`` and return its address."""
        return wait_for(self.resolver, self.plan.stream(stream).key(server), should_stop=self.should_stop)

    def publish(self, stream: str, address: str) -> None:
        self.resolver.put(self.plan.stream(stream).key(self.spec.name), address)

    def published(self, stream: str) -> str | None:
        """This worker's address for ``stream`` before a restart, to bind the same port again."""
        return self.resolver.get(self.plan.stream(stream).key(self.spec.name))
