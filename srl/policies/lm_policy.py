"""``policy: {type: lm}``: a :class:`TransformerLM` built the way every srl policy is built,
``cls(space_info, policy_config)``. The token task's vocabulary is the action space
(``space_info.n_actions``) and ``policy.lm`` holds the model's other :class:`LMConfig` fields."""
from __future__ import annotations

import copy

from torch import Tensor

from srl.policies.lm import LMConfig, TransformerLM


def lm_config(vocab_size: int, fields: dict) -> LMConfig:
    return LMConfig(vocab_size=int(vocab_size), **copy.deepcopy(fields))


class LMPolicy(TransformerLM):
    """The language-model policy of a token task run (trainer, generation workers, draft worker)."""

    obs_norm = None

    def __init__(self, info, policy_cfg):
        super().__init__(lm_config(info.n_actions, policy_cfg.lm))
        self.info = info

    def state_dict(self, *args, **kwargs):
        """Tied embeddings saved as two tensors (checkpoints refuse shared memory); loading
        writes the same values to the one parameter twice."""
        sd = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        if self.config.tie_embeddings and f"{prefix}head.weight" in sd:
            sd[f"{prefix}head.weight"] = sd[f"{prefix}head.weight"].clone()
        return sd

    def completion_logits(self, prompt: Tensor, completion: Tensor) -> Tensor:
        """Logits (n, N, V) of each completion token given everything before it: one causal
        pass over prompt (n, P) + completion (n, N)."""
        import torch

        tokens = torch.cat([prompt, completion], 1)[:, :-1]
        return self(tokens)[:, prompt.shape[1] - 1:]
