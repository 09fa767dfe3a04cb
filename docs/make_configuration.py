"""Writes docs/configuration.md from the schema in srl/config.py (field docstrings included).

    python docs/make_configuration.py > docs/configuration.md
"""
import ast
import dataclasses
import inspect
import typing

import srl.config as schema


def field_docs() -> dict:
    docs = {}
    for node in ast.parse(inspect.getsource(schema)).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt, nxt in zip(node.body, node.body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[(node.name, stmt.target.id)] = " ".join(nxt.value.value.split())
    return docs


def rows(cls, prefix: str, docs: dict) -> list:
    out = []
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            out += rows(type(value), f"{prefix}{f.name}.", docs)
            continue
        tp = str(hints[f.name]).replace("typing.", "").replace("<class '", "").replace("'>", "")
        out.append(f"| `{prefix}{f.name}` | {tp} | `{value!r}` | {docs.get((cls.__name__, f.name), '')} |")
    return out


def render() -> str:
    head = [
        "# Configuration reference", "",
        "Every field of an experiment file, its default and meaning (generated from `srl/config.py` by",
        "`docs/make_configuration.py`). Nested sections are YAML mappings, or `section.field=value`",
        "overrides on the command line. Unknown keys, wrong types and out-of-range values are rejected",
        "with a one-line error naming the field.", "",
        "| field | type | default | meaning |", "| --- | --- | --- | --- |",
    ]
    return "\n".join(head + rows(schema.ExperimentConfig, "", field_docs())) + "\n"


if __name__ == "__main__":
    print(render(), end="")
