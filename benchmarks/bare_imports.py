"""Benchmarks that run on the GPU image, which has no gymnasium: import ``srl.envs`` /
``srl.policies`` submodules without their package ``__init__`` (which imports gymnasium)."""
from __future__ import annotations

import importlib.util
import pathlib
import sys
import types


def bare_packages(*names: str) -> None:
    """Register ``names`` as empty packages over their folders unless gymnasium is importable."""
    try:
        if importlib.util.find_spec("gymnasium") is not None:
            return
    except ImportError:
        pass
    root = pathlib.Path(__file__).resolve().parents[1]
    for name in names:
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__path__ = [str(root.joinpath(*name.split(".")))]
            sys.modules[name] = mod
