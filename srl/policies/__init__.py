"""Policies: actor-critic networks built from a :class:`srl.config.PolicyConfig`."""
from srl.policies.mlp import ActorCritic, build_policy

__all__ = ["ActorCritic", "build_policy"]
