"""Regenerate the plan section of docs/architecture.md from :func:`srl.plan.compile_plan`.

    python docs/make_architecture.py      # rewrites the block between the markers

The test suite checks the doc holds exactly what this prints, so the picture cannot drift.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from srl.config import experiment_from_dict  # noqa: E402
from srl.plan import compile_plan, describe  # noqa: E402

BEGIN, END = "<!-- plan:begin -->", "<!-- plan:end -->"
EXAMPLE = ["workers.actors.count=4", "workers.actors.ring=2", "workers.actors.inline_policy=false",
           "workers.policies.count=2", "workers.trainers.count=2"]


TOKEN_EXAMPLE = ["env.id=srl/Addition-v0", "policy.type=lm", "algorithm.type=grpo", "generation.mode=spectr",
                 "workers.actors.count=2", "workers.policies.count=2"]


def example(overrides=EXAMPLE):
    return experiment_from_dict({"stop": {"env_steps": 1000}}, overrides)


def render_plan() -> str:
    lines = [BEGIN]
    for overrides in (EXAMPLE, TOKEN_EXAMPLE):
        plan = compile_plan(example(overrides))
        workers = ", ".join(w.name for w in plan.workers)
        if overrides is TOKEN_EXAMPLE:
            lines.append("A token task (language-model policy) with speculative generation:")
            lines.append("")
        lines += [f"`srl run exp.yaml {' '.join(overrides)}` compiles to:", "", "```",
                  f"workers: {workers}", describe(plan), "```", ""]
    return "\n".join(lines[:-1] + [END])


def main() -> None:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "architecture.md")
    text = open(path, encoding="utf-8").read()
    start, stop = text.index(BEGIN), text.index(END) + len(END)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text[:start] + render_plan() + text[stop:])


if __name__ == "__main__":
    main()
