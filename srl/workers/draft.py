"""Draft worker: keeps the speculative draft aligned with the moving policy.

It consumes the same samples the trainer does (the actors send each one to both), distils the
policy into the draft on every sequence exactly once (the one-epoch regime of
:class:`srl.generation.draft.DraftAligner`: one update per sample message, then the message is
dropped; a message seen before is refused and counted) and publishes the draft's weights on its
own parameter stream, which the generation workers pull. The policy's weights come from the
trainer like everyone else's. Acceptance and tokens per target pass, measured on each batch
before the draft trains on it, are logged as ``draft/*``.
"""
from __future__ import annotations

from functools import partial

import numpy as np
import torch

from srl.envs.tokens import sampling_params
from srl.generation.draft import DraftAlignConfig, DraftAligner
from srl.plan import DRAFT_PARAMS, DRAFT_SAMPLES, PARAMS, build_policy
from srl.policies.lm_policy import sampling_dtype
from srl.policies.weights import load_numpy_weights
from srl.streams.params import ParamClient, ParamServer
from srl.streams.sample import SampleConsumer
from srl.system.wire import Message
from srl.system.worker import PollResult
from srl.workers.base import RLWorker
from srl.workers.generation import build_draft
from srl.workers.reports import DraftReport, to_meta
from srl.workers.token_layout import token_layout


class DraftDistiller:
    """The draft's learning, apart from the process: ``consume(message)`` distils on each new
    sample message once and returns its statistics (None for a message already used). After
    ``max_updates`` updates (None: never) it only measures."""

    def __init__(self, aligner: DraftAligner, device: str = "cpu", max_updates: int | None = None):
        self.aligner, self.device, self.max_updates = aligner, device, max_updates
        self.seen: set[tuple[int, int, int]] = set()
        self.sequences = self.duplicates = 0

    def consume(self, msg: Message) -> dict[str, float] | None:
        key = (msg.meta["actor"], msg.meta["incarnation"], msg.meta["seq"])
        if key in self.seen:
            self.duplicates += 1
            return None
        self.seen.add(key)
        tokens, mask = sequences(msg.arrays)
        stats = self.aligner.step(tokens.to(self.device), mask.to(self.device), update=not self.frozen)
        self.sequences += tokens.shape[0]
        return stats

    @property
    def frozen(self) -> bool:
        return self.max_updates is not None and self.aligner.updates >= self.max_updates


def sequences(arrays: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (B, P+N), mask (B, P+N)): position t counts when it predicts a generated token
    (t + 1 >= P) that is part of the completion (up to the first eos)."""
    prompt, completion = arrays["prompt"].T, arrays["completion"].T
    tokens = torch.from_numpy(np.ascontiguousarray(np.concatenate([prompt, completion], 1)))
    B, P = prompt.shape
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    mask[:, P - 1:-1] = torch.from_numpy(np.ascontiguousarray(arrays["mask"].T))
    return tokens, mask


class DraftWorker(RLWorker):
    """Owns the draft, its optimizer and the draft parameter stream."""

    kind = "draft"

    def _configure(self) -> None:
        cfg = self.cfg
        torch.set_num_threads(1)
        self.device = cfg.draft.device
        self.layout = token_layout(cfg, self.info)
        torch.manual_seed(cfg.seed)
        dtype = sampling_dtype(cfg.policy, self.device)  # the teacher as generation samples from it
        self.policy = build_policy(self.info, cfg.policy).to(self.device, dtype).eval()
        self.draft = build_draft(cfg, self.info.n_actions, self.device)
        align = DraftAlignConfig(lr=cfg.draft.lr, loss=cfg.draft.loss, gamma=cfg.generation.draft_len,
                                 params=sampling_params(cfg), bf16=dtype == torch.bfloat16)
        self.distiller = DraftDistiller(DraftAligner(self.draft, self.policy, align), self.device,
                                        cfg.draft.align_updates)
        trainer = self.plan.stream(PARAMS).server_of(self.spec.name)
        self.params = self.endpoint(ParamClient(self.address(PARAMS, trainer), self.key,
                                                shared=cfg.network.shared_weights))
        got = self.params.wait_newer(-1, timeout_s=600.0, should_stop=self.should_stop)
        self.policy_version = -1 if got is None else self._load(got)
        self.samples = self.endpoint(SampleConsumer(self.spec.host, self.key, prefer=self.published(DRAFT_SAMPLES),
                                                    hwm=2))
        self.server = self.endpoint(ParamServer(self.spec.host, self.key, prefer=self.published(DRAFT_PARAMS),
                                                epoch=self.spec.incarnation, shared=cfg.network.shared_weights))
        self.version = 0
        self.server.publish(self.version, self.draft.state_dict())
        self.publish(DRAFT_SAMPLES, self.samples.address)
        self.publish(DRAFT_PARAMS, self.server.address)
        self.stats: dict[str, float] = {}

    def _load(self, got) -> int:
        load_numpy_weights(self.policy, got[1])
        return got[0]

    def _report(self) -> dict:
        stats, self.stats = self.stats, {}
        d = self.distiller
        return to_meta(DraftReport(d.sequences, d.aligner.updates, d.duplicates, self.version, stats))

    def _poll(self) -> PollResult:
        got = self.params.poll(load=partial(load_numpy_weights, self.policy))
        if got is not None:
            self.policy_version = got[0]
        self.server.serve()
        got = self.samples.recv(timeout_ms=10, check=self.layout.check)
        if got is None:
            return PollResult()
        updates = self.distiller.aligner.updates
        stats = self.distiller.consume(got[1])
        if stats is None:
            return PollResult()
        if self.distiller.aligner.updates > updates:
            self.version += 1
            self.server.publish(self.version, self.draft.state_dict())
            self.server.serve()
        self.stats = {"draft/acceptance_rate": stats["charts/acceptance_rate"],
                      "draft/block_efficiency": stats["charts/block_efficiency"],
                      "draft/distill_loss": stats["losses/distill"], "draft/policy_version": float(self.policy_version)}
        return PollResult(samples=int(got[1].arrays["valid"].size), batches=1)
