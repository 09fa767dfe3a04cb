"""``policy: {type: lm}``: a :class:`TransformerLM` built the way every srl policy is built,
``cls(space_info, policy_config)``. The token task's vocabulary is the action space
(``space_info.n_actions``) and ``policy.lm`` holds the model's other :class:`LMConfig` fields.

``policy.autocast: bf16`` runs the learner's passes (:meth:`LMPolicy.completion_logits`,
:meth:`LMPolicy.forward_with_value`) under bfloat16 autocast on CUDA, with float32 master weights,
and generation workers sample from a bfloat16 copy (:func:`sampling_dtype`). CPU stays float32.
"""
from __future__ import annotations

import copy

import torch
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
        self.bf16 = policy_cfg.autocast == "bf16"

    def _autocast(self, x: Tensor):
        return torch.autocast("cuda", torch.bfloat16, enabled=self.bf16 and x.is_cuda)

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
        pass over prompt (n, P) + completion (n, N); bfloat16 under ``policy.autocast: bf16``."""
        tokens = torch.cat([prompt, completion], 1)[:, :-1]
        with self._autocast(tokens):
            return self(tokens)[:, prompt.shape[1] - 1:]

    def forward_with_value(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        with self._autocast(tokens):
            return super().forward_with_value(tokens)


def sampling_dtype(policy_cfg, device: str) -> torch.dtype:
    """The dtype generation workers hold the policy and the draft in: bfloat16 on CUDA under
    ``policy.autocast: bf16`` (weights arriving in float32 are cast as they are copied in)."""
    cuda = torch.device(device).type == "cuda"
    return torch.bfloat16 if cuda and policy_cfg.autocast == "bf16" else torch.float32
