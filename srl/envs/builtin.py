"""srl's own gymnasium ids (``srl/...``), registered on first use in every process."""
from __future__ import annotations

from srl.envs.memory import register_memory_envs
from srl.envs.null import register_null_envs


def register_srl_envs() -> None:
    register_null_envs()
    register_memory_envs()
