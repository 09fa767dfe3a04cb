"""Ray scheduler: every worker is a Ray actor with resource requests taken from the config.

Ray places the workers (CPUs per actor worker, fractional GPUs per policy worker, GPUs per trainer,
custom resources, SPREAD across nodes for actors and policy workers); ZMQ still carries all the
traffic between them. The controller runs in the driver process and talks to the workers over
its control and stats sockets, exactly as in local mode.

Restarts are the controller's, not Ray's: each Ray actor is created with ``max_restarts=0``, and
when one dies (killed process, lost node) the controller notices through :meth:`alive`, bumps the
worker's incarnation and calls :meth:`restart`, which creates a fresh Ray actor wherever Ray finds
room. Ray's own restarts would re-run the constructor with the original arguments, so a restarted
trainer would not know to resume from its checkpoint, an actor would repeat its random seed, and
the restart would not show in the run's ``restarts`` metric; ``workers.max_restarts`` bounds the
controller's restarts instead.

Streams are always authenticated on Ray: the controller draws a per-run secret and the worker
specs carry it to the actors through Ray's own transport (never through the config file or logs).
Workers find each other through :class:`srl.system.name_resolve.RayResolver` and bind their
sockets to their node's address.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from typing import Any

from srl.system.name_resolve import RayResolver, ray_namespace
from srl.system.worker import WorkerSpec, resolve_entry

ALIVE_CACHE_S = 0.2
""":meth:`RayScheduler.alive` asks Ray about all workers at once, at most this often."""


class _WorkerActor:
    """The Ray actor around one srl worker. ``run`` blocks for the worker's whole life."""

    def info(self) -> dict:
        import ray

        ctx = ray.get_runtime_context()
        return {"pid": os.getpid(), "node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address()}

    def run(self, spec: WorkerSpec) -> int:
        import ray

        spec = replace(spec, host=ray.util.get_node_ip_address(), resolver="ray")
        resolve_entry(spec.entry)(spec).run()
        return os.getpid()


class RayScheduler:
    """Starts srl workers as Ray actors; the controller's ``scheduler``.

    Args:
        address: the Ray cluster: ``auto`` joins the one this machine belongs to, ``HOST:6379``
            or ``ray://HOST:10001`` a given one, None does what ``auto`` does but starts a
            one-machine Ray when there is none. Resource requests come from each worker's plan.

    Raises:
        ImportError: Ray is not installed (``pip install 'srl[ray]'``).
    """

    authenticated = True
    """Tells the controller to draw a per-run HMAC secret whatever ``network.hmac`` says."""
    resolver = "ray"
    """Name resolve through Ray's KV store."""

    def __init__(self, address: str | None = None):
        import ray

        self._ray = ray
        self._connected_here = False
        if not ray.is_initialized():
            # None or auto: RAY_ADDRESS (set in a `ray job`), else the cluster `ray start` began on
            # this machine; None then starts a one-machine Ray if there is neither.
            ray.init(address=address)
            self._connected_here = True
        self.host = ray.util.get_node_ip_address()
        """The driver's routable address: the controller binds its sockets here."""
        self._actor_cls = ray.remote(_WorkerActor)
        self.actors: dict[str, Any] = {}
        self.runs: dict[str, Any] = {}  # name -> ObjectRef of the blocking run() call
        self.infos: dict[str, Any] = {}  # name -> ObjectRef of info(), ready once the process is up
        self._info_cache: dict[str, dict] = {}
        self._done: set[str] = set()
        self._checked_at = 0.0
        self._namespaces: set[str] = set()
        self.errors: dict[str, str] = {}
        """Why a worker's Ray actor ended, for workers that did not end cleanly."""

    # ------------------------------------------------------------------ scheduler API
    def start(self, spec: WorkerSpec) -> None:
        """Create the worker's Ray actor and start its loop; returns at once."""
        _ship_by_value(spec.by_value)
        actor = self._actor_cls.options(**self.actor_options(spec)).remote()
        self.actors[spec.name] = actor
        self.infos[spec.name] = actor.info.remote()
        self.runs[spec.name] = actor.run.remote(replace(spec, run_dir=os.path.abspath(spec.run_dir)))
        self._info_cache.pop(spec.name, None)
        self._done.discard(spec.name)
        self._namespaces.add(ray_namespace(spec.run_dir))

    def actor_options(self, spec: WorkerSpec) -> dict:
        """The ``.options()`` of one worker's Ray actor: resources, placement, no Ray restarts."""
        res = spec.worker.resources
        opts = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus, "resources": dict(res.custom), "max_restarts": 0}
        if res.spread:
            opts["scheduling_strategy"] = "SPREAD"
        return opts

    def alive(self, name: str) -> bool:
        """False once the worker's loop has returned or its process or node is gone."""
        self._refresh()
        return name not in self._done

    def exitcode(self, name: str) -> int | None:
        """None while the worker runs; 0 once its loop returned, 1 if it raised or its process
        or node died (:attr:`errors` holds Ray's account)."""
        self._refresh()
        if name not in self._done:
            return None
        ref = self.runs[name]
        if not self._ray.wait([ref], timeout=0)[0]:
            return 1  # killed by us, its call not yet failed
        try:
            self._ray.get(ref, timeout=0)
            return 0
        except Exception as exc:  # noqa: BLE001 - RayActorError, RayTaskError, ...
            self.errors[name] = _last_line(exc)
            return 1

    def pending(self, name: str) -> bool:
        """True while Ray has not started the worker's process yet (waiting for a node)."""
        ref = self.infos.get(name)
        if ref is None or name in self._info_cache:
            return False
        ready, _ = self._ray.wait([ref], timeout=0)
        if not ready:
            return True
        try:
            self._info_cache[name] = self._ray.get(ready[0])
        except Exception:  # noqa: BLE001 - the actor died before it started: not pending, dead
            self._info_cache[name] = {}
        return False

    def restart(self, name: str, spec: WorkerSpec) -> None:
        self.kill(name)
        self.start(spec)

    def kill(self, name: str) -> None:
        actor = self.actors.get(name)
        if actor is not None:
            self._ray.kill(actor, no_restart=True)
        self._done.add(name)

    def wait_all(self, timeout_s: float) -> list[str]:
        """Wait for every worker's loop to return; kill those still running after ``timeout_s``.
        Returns the killed. Every worker's Ray actor is released afterwards."""
        refs = {ref: name for name, ref in self.runs.items() if name not in self._done}
        ready, rest = self._ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s) if refs else ([], [])
        stragglers = [refs[r] for r in rest]
        for name in list(self.actors):
            self.kill(name)
        return stragglers

    def shutdown(self) -> None:
        """Release every actor, forget the run's names, and disconnect from Ray if this
        scheduler connected (a one-machine cluster it started stops with it)."""
        for name in list(self.actors):
            self.kill(name)
        for ns in self._namespaces:
            try:
                RayResolver(ns).clear()
            except Exception:  # noqa: BLE001 - Ray already gone
                pass
        if self._connected_here:
            self._ray.shutdown()

    # ------------------------------------------------------------------ introspection
    def info(self, name: str, timeout_s: float = 60.0) -> dict:
        """``{"pid", "node_id", "ip"}`` of the worker's current process."""
        if name not in self._info_cache or not self._info_cache[name]:
            self._info_cache[name] = self._ray.get(self.infos[name], timeout=timeout_s)
        return self._info_cache[name]

    def pid(self, name: str) -> int | None:
        return self.info(name).get("pid")

    def node_id(self, name: str) -> str | None:
        return self.info(name).get("node_id")

    def names(self) -> list[str]:
        return list(self.actors)

    # ------------------------------------------------------------------ internals
    def _refresh(self) -> None:
        """One ``ray.wait`` over every running worker: the finished ones (returned, crashed,
        process killed, node lost) are marked done."""
        now = time.monotonic()
        if now - self._checked_at < ALIVE_CACHE_S:
            return
        self._checked_at = now
        refs = {ref: name for name, ref in self.runs.items() if name not in self._done}
        if not refs:
            return
        ready, _ = self._ray.wait(list(refs), num_returns=len(refs), timeout=0)
        for ref in ready:
            self._done.add(refs[ref])


def _last_line(exc: BaseException) -> str:
    """The line of a Ray error that says what went wrong (Ray puts the cause's traceback first)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    cause = next((line for line in reversed(lines) if "Error" in line or "Exception" in line), None)
    return f"{type(exc).__name__}: {cause or (lines[0] if lines else '')}"[:500]


def _ship_by_value(objects: tuple) -> None:
    """User classes (a custom env or policy passed as an object) travel to the workers inside
    the spec. Ray pickles a class from an importable module by reference, which fails on nodes
    where the module is not importable (a script's folder, a notebook's helpers); ask Ray's
    cloudpickle to carry such modules by value. Installed packages stay by reference."""
    from ray import cloudpickle

    for obj in objects:
        module = sys.modules.get(getattr(obj, "__module__", None) or "")
        if module is None or module.__name__ == "__main__":  # __main__ already goes by value
            continue
        path = getattr(module, "__file__", None) or ""
        top = module.__name__.split(".")[0]
        if top in ("srl", "gymnasium") or "site-packages" in path or "dist-packages" in path:
            continue
        try:
            cloudpickle.register_pickle_by_value(module)
        except ValueError:  # not importable as a module of its own: nothing to do
            pass
