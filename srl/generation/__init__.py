"""Rollout generation for language-model policies: KV-cache sampling, exact speculative
sampling (standard and SpecTr K-SEQ), and draft alignment by distillation."""

from srl.generation.decode import PlainSampler, Rollout
from srl.generation.draft import DraftAlignConfig, DraftAligner
from srl.generation.sampling import SamplingParams, logits_to_probs, sample_from_probs, token_log_probs
from srl.generation.speculative import SpeculativeSampler, kseq_select

__all__ = [
    "DraftAlignConfig", "DraftAligner", "PlainSampler", "Rollout", "SamplingParams",
    "SpeculativeSampler", "kseq_select", "logits_to_probs", "sample_from_probs", "token_log_probs",
]
