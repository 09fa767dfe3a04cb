"""Policies: actor-critic networks built from a :class:`srl.config.PolicyConfig`."""
from srl.policies.mlp import ActorCritic

__all__ = ["ActorCritic"]
