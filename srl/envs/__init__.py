"""Environments: the gymnasium adapter and srl's own registered envs (``srl/...`` ids)."""
from srl.envs.null import register_null_envs
from srl.envs.vector import SpaceInfo, make_vector_env, space_info

register_null_envs()

__all__ = ["SpaceInfo", "make_vector_env", "space_info"]
