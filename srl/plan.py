"""The wiring plan: one function turns an experiment into the workers, streams and components
the runtime executes. This is the only place where the system is wired.

```
actor/i --obs (sticky per env | round robin)--> policy/p        (remote policy only)
actor/i --samples (fan-in: actor i -> trainer i mod N)--> trainer/r
trainer/r --params (broadcast: every rank holds the same weights)--> actor/i (its trainer),
                                                                    policy/p (trainer/0)
```
A token task (``env.id`` names one; language-model policies) compiles to another picture:
```
token_actor/i --prompts (round robin)--> generation/g   (completions + the policy's log-probs)
token_actor/i --samples (fan-in)--> trainer/r           (prompts, completions, rewards)
token_actor/i --draft_samples (fan-in)--> draft/0       (the same samples; speculative modes)
trainer/r --params (broadcast)--> token_actor/i, generation/g, draft/0
draft/0 --draft_params (broadcast)--> generation/g
```
Data-parallel trainer ranks form one group: they restart together, all-reduce gradients, and
rank 0 writes checkpoints. ``docs/architecture.md`` draws this picture from :func:`describe`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from srl import registry
from srl.config import ExperimentConfig
from srl.errors import ConfigError
from srl.system.topology import Plan, Resources, Routing, StreamPlan, WorkerPlan

# Stream names: each is named here once; workers ask the plan for addresses by these constants.
INFERENCE = "inference"
SAMPLES = "samples"
PARAMS = "params"
PROMPTS = "prompts"
DRAFT_SAMPLES = "draft_samples"
DRAFT_PARAMS = "draft_params"
TRAINER_GROUP = "trainers"
WORKER_ENTRY = "srl.workers:build_worker"


@dataclass
class RunPayload:
    """What every worker process receives besides its place in the plan."""

    config: ExperimentConfig
    space: dict
    """:class:`srl.envs.vector.SpaceInfo` as a dict."""
    components: dict = field(default_factory=dict)
    """User classes registered in the launching process (``registry.custom_components``)."""


def compile_plan(cfg: ExperimentConfig) -> Plan:
    """The workers, streams and components of ``cfg``; raises ConfigError for a layout that
    cannot run (a GPU device without a GPU reservation on Ray)."""
    _check_ray_gpus(cfg)
    from srl.envs.tokens import is_token_task

    if is_token_task(cfg):
        return _token_plan(cfg)
    w = cfg.workers
    spread = cfg.cluster.spread
    trainers = [WorkerPlan("trainer", r, w.trainers.count, _resources(w.trainers, False),
                           TRAINER_GROUP if w.trainers.count > 1 else None) for r in range(w.trainers.count)]
    remote = not w.actors.inline_policy
    policies = [WorkerPlan("policy", p, w.policies.count, _resources(w.policies, spread))
                for p in range(w.policies.count)] if remote else []
    actors = [WorkerPlan("actor", a, w.actors.count, _resources(w.actors, spread)) for a in range(w.actors.count)]
    t_names = tuple(t.name for t in trainers)
    a_names = tuple(a.name for a in actors)
    fan_in = tuple((a, t_names[i % len(t_names)]) for i, a in enumerate(a_names))
    streams = [
        StreamPlan(SAMPLES, Routing.FAN_IN, t_names, a_names, fan_in),
        StreamPlan(PARAMS, Routing.BROADCAST, t_names, a_names + tuple(p.name for p in policies),
                   fan_in + tuple((p.name, t_names[0]) for p in policies)),
    ]
    if remote:
        streams.append(_inference_stream(cfg, a_names, tuple(p.name for p in policies)))
    components = (("policy", cfg.policy.type), ("learner", cfg.algorithm.type), ("optimizer", cfg.optimizer.type))
    return Plan(tuple(trainers + policies + actors), tuple(streams), components)


def _token_plan(cfg: ExperimentConfig) -> Plan:
    """Token tasks: actors draw prompts and score completions, generation workers generate,
    trainers learn, a draft worker keeps the draft aligned when generation is speculative."""
    w, spread = cfg.workers, cfg.cluster.spread
    trainers = [WorkerPlan("trainer", r, w.trainers.count, _resources(w.trainers, False),
                           TRAINER_GROUP if w.trainers.count > 1 else None) for r in range(w.trainers.count)]
    gens = [WorkerPlan("generation", g, w.policies.count, _resources(w.policies, spread))
            for g in range(w.policies.count)]
    drafted = cfg.generation.mode != "plain" and cfg.draft.align
    drafts = [WorkerPlan("draft", 0, 1, _resources(cfg.draft, False))] if drafted else []
    actors = [WorkerPlan("token_actor", a, w.actors.count, _resources(w.actors, spread)) for a in range(w.actors.count)]
    t_names, g_names = tuple(t.name for t in trainers), tuple(g.name for g in gens)
    a_names, d_names = tuple(a.name for a in actors), tuple(d.name for d in drafts)
    fan_in = tuple((a, t_names[i % len(t_names)]) for i, a in enumerate(a_names))
    followers = g_names + d_names
    streams = [
        StreamPlan(SAMPLES, Routing.FAN_IN, t_names, a_names, fan_in),
        StreamPlan(PARAMS, Routing.BROADCAST, t_names, a_names + followers,
                   fan_in + tuple((f, t_names[0]) for f in followers)),
        StreamPlan(PROMPTS, Routing.ROUND_ROBIN, g_names, a_names),
    ]
    if drafts:
        to_draft = tuple((a, d_names[0]) for a in a_names)
        streams.append(StreamPlan(DRAFT_SAMPLES, Routing.FAN_IN, d_names, a_names, to_draft))
        streams.append(StreamPlan(DRAFT_PARAMS, Routing.BROADCAST, d_names, g_names, tuple((g, d_names[0]) for g in g_names)))
    components = (("policy", cfg.policy.type), ("learner", cfg.algorithm.type), ("optimizer", cfg.optimizer.type),
                  ("task", cfg.env.id), ("sampler", cfg.generation.mode))
    return Plan(tuple(trainers + drafts + gens + actors), tuple(streams), components)


def has_stream(plan: Plan, name: str) -> bool:
    return any(s.name == name for s in plan.streams)


def _inference_stream(cfg: ExperimentConfig, actors: tuple[str, ...], policies: tuple[str, ...]) -> StreamPlan:
    """Sticky: env group g of actor a (and so each of its envs) always asks one policy worker,
    the groups spread evenly. Round robin: any policy worker answers any request."""
    ring = cfg.workers.actors.ring
    if cfg.workers.policies.routing == "round_robin":
        return StreamPlan(INFERENCE, Routing.ROUND_ROBIN, policies, actors)
    pairs = tuple((env_group_key(a, g), policies[(i * ring + g) % len(policies)])
                  for i, a in enumerate(actors) for g in range(ring))
    return StreamPlan(INFERENCE, Routing.STICKY, policies, actors, pairs)


def env_group_key(actor: str, group: int) -> str:
    """The client key of one env group of an actor in a sticky stream's assignment."""
    return f"{actor}#{group}"


def _resources(role: Any, spread: bool) -> Resources:
    return Resources(num_cpus=role.num_cpus, num_gpus=getattr(role, "num_gpus", 0.0),
                     custom=tuple(sorted(role.resources.items())), spread=spread, nice=getattr(role, "nice", 0))


def _check_ray_gpus(cfg: ExperimentConfig) -> None:
    if cfg.cluster.backend != "ray":
        return
    w = cfg.workers
    for section, role in (("workers.policies", w.policies), ("workers.trainers", w.trainers), ("draft", cfg.draft)):
        if role.device != "cpu" and role.num_gpus <= 0:
            raise ConfigError(f"{section}.num_gpus", f"must be > 0 on Ray when {section}.device is "
                              f"{role.device!r}: Ray hides GPUs from actors that do not reserve one")


# --------------------------------------------------------------------------- components


def build_policy(info, policy_cfg) -> Any:
    """The policy named by ``policy.type``: built-in ``mlp`` or a registered class, built as
    ``cls(space_info, policy_config)``."""
    return registry.resolve("policy", policy_cfg.type)(info, policy_cfg)


TOKEN_LEARNERS = {"ppo": "token_ppo"}
"""``algorithm.type`` on a token task -> the learner that runs it (PPO over tokens has a critic)."""


def build_learner(policy, cfg: ExperimentConfig, device: str, sync=None) -> Any:
    """The learner named by ``algorithm.type``; ``sync`` all-reduces across data-parallel ranks."""
    from srl.envs.tokens import build_task, is_token_task, sampling_params

    name = cfg.algorithm.type
    extra = {}
    if is_token_task(cfg):
        name = TOKEN_LEARNERS.get(name, name)
        extra = {"sampling": sampling_params(cfg), "task": build_task(cfg)}
    cls = registry.resolve("learner", name)
    return cls(policy, cfg.algorithm, cfg.optimizer, device, total_env_steps=cfg.stop.env_steps, seed=cfg.seed,
               sync=sync, **extra)


# --------------------------------------------------------------------------- picture


def describe(plan: Plan) -> str:
    """The plan as text: one line per stream (routing, who serves whom). Used by the docs."""
    lines = []
    for s in plan.streams:
        lines.append(f"{s.name} ({s.routing.value}): {_span(s.clients)} -> {_span(s.servers)}")
        for server in s.servers:
            if s.assignment:
                lines.append(f"  {server} <- {', '.join(sorted(set(c for c, v in s.assignment if v == server)))}")
    groups = sorted({w.group for w in plan.workers if w.group})
    for g in groups:
        lines.append(f"group {g}: {', '.join(w.name for w in plan.workers if w.group == g)}")
    return "\n".join(lines)


def _span(names: tuple[str, ...]) -> str:
    if len(names) <= 2:
        return ", ".join(names)
    return f"{names[0]} .. {names[-1]}"
