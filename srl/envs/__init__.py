"""Environments: the gymnasium adapter and srl's own registered envs (``srl/...`` ids)."""
from srl.envs.builtin import register_srl_envs
from srl.envs.vector import SpaceInfo, make_vector_env, space_info

register_srl_envs()

__all__ = ["SpaceInfo", "make_vector_env", "space_info"]
