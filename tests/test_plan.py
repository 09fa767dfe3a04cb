"""The wiring plan and the layering it buys: streams routed as the plan says, learners picked by
name, a runtime that loads no RL code, no import cycles."""
import ast
import os
import subprocess
import sys

import pytest

from srl.config import experiment_from_dict
from srl.plan import INFERENCE, PARAMS, SAMPLES, compile_plan, describe
from srl.system.topology import Routing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RL_PACKAGES = ("srl.workers", "srl.envs", "srl.config", "srl.policies", "srl.algorithms", "srl.plan", "srl.monitor")


def _cfg(**over):
    base = {"stop": {"env_steps": 1000}}
    return experiment_from_dict(base, [f"{k}={v}" for k, v in over.items()])


def test_importing_the_runtime_loads_no_rl_module():
    code = ("import sys, srl.system.controller, srl.system.worker, srl.system.local_scheduler, "
            "srl.system.ray_scheduler, srl.system.topology, srl.system.checkpoint\n"
            "print(','.join(sorted(m for m in sys.modules if m.startswith('srl'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    loaded = out.stdout.strip().split(",")
    assert "srl.system.controller" in loaded  # the probe itself worked
    assert not [m for m in loaded if m.startswith(RL_PACKAGES)], loaded


def _import_graph() -> dict[str, set[str]]:
    """srl module -> srl modules it imports anywhere in its body (functions included)."""
    graph: dict[str, set[str]] = {}
    base = os.path.join(ROOT, "srl")
    for folder, _, files in os.walk(base):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
            module = rel[: -len(".__init__")] if rel.endswith(".__init__") else rel
            deps = graph.setdefault(module, set())
            for node in _runtime_nodes(ast.parse(open(path, encoding="utf-8").read())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("srl") and not node.level:
                    deps.add(node.module)
                    deps.update(f"{node.module}.{a.name}" for a in node.names)
                elif isinstance(node, ast.Import):
                    deps.update(a.name for a in node.names if a.name.startswith("srl"))
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (annotations only, never imported)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", "") == "TYPE_CHECKING":
                continue
            stack.append(child)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if d.startswith(m + "."):
                continue  # a package importing its own submodule is not a cycle
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycles_among_srl_modules():
    graph = _import_graph()
    assert "srl.workers.trainer" in graph and "srl.plan" in graph["srl.workers.trainer"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycle(graph) == ["a", "b", "c", "a"]


@pytest.mark.parametrize("actors,trainers", [(1, 1), (5, 2), (14, 4), (3, 3)])
def test_fan_in_spreads_actors_evenly_over_trainers(actors, trainers):
    plan = compile_plan(_cfg(**{"workers.actors.count": actors, "workers.trainers.count": trainers}))
    samples = plan.stream(SAMPLES)
    assert samples.routing == Routing.FAN_IN
    loads = [len(samples.clients_of(t)) for t in samples.servers]
    assert sum(loads) == actors and max(loads) - min(loads) <= 1
    for a in samples.clients:  # an actor pulls weights and credit from the trainer it feeds
        assert plan.stream(PARAMS).server_of(a) == samples.server_of(a)
    assert {w.group for w in plan.role("trainer")} == ({"trainers"} if trainers > 1 else {None})


def test_sticky_inference_gives_each_env_group_one_policy_worker():
    plan = compile_plan(_cfg(**{"workers.actors.count": 3, "workers.actors.ring": 2, "workers.actors.inline_policy": "false",
                                "workers.policies.count": 2}))
    inference = plan.stream(INFERENCE)
    assert inference.routing == Routing.STICKY
    keys = [c for c, _ in inference.assignment]
    assert len(keys) == len(set(keys)) == 6  # every env group exactly once
    loads = [sum(1 for _, s in inference.assignment if s == p) for p in inference.servers]
    assert loads == [3, 3]
    rr = compile_plan(_cfg(**{"workers.actors.inline_policy": "false", "workers.policies.routing": "round_robin"}))
    assert rr.stream(INFERENCE).routing == Routing.ROUND_ROBIN and not rr.stream(INFERENCE).assignment


def test_a_server_restart_reaches_exactly_its_clients():
    plan = compile_plan(_cfg(**{"workers.actors.count": 4, "workers.trainers.count": 2, "workers.actors.inline_policy": "false",
                                "workers.policies.count": 1}))
    assert plan.clients_of("trainer/1") == {"actor/1", "actor/3"}
    assert plan.clients_of("trainer/0") == {"actor/0", "actor/2", "policy/0"}
    assert plan.group_members("trainer/1") == ["trainer/0", "trainer/1"]
    assert plan.group_members("actor/2") == ["actor/2"]


def test_architecture_doc_shows_the_plan_as_compiled():
    """docs/architecture.md's wiring example is generated from the plan; it cannot drift."""
    sys.path.insert(0, os.path.join(ROOT, "docs"))
    try:
        import make_architecture
    finally:
        sys.path.pop(0)
    doc = open(os.path.join(ROOT, "docs", "architecture.md"), encoding="utf-8").read()
    assert make_architecture.render_plan() in doc, "run: python docs/make_architecture.py"
    assert describe(compile_plan(make_architecture.example())) in doc
