"""RL worker roles (actor, policy, trainer), built from a spec by the runtime through
:func:`build_worker`; role names live in :mod:`srl.registry`."""
from __future__ import annotations

from srl import registry
from srl.system.worker import Worker, WorkerSpec


def build_worker(spec: WorkerSpec) -> Worker:
    """The runtime's entry point (``srl.plan.WORKER_ENTRY``): the worker class of the spec's role."""
    registry.install_components(spec.payload.components)
    return registry.resolve("role", spec.kind)(spec)
