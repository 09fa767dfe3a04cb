"""Generation worker: a policy worker holding a language model. It turns batches of prompts into
completions, plainly or speculatively, and answers with the tokens, the POLICY's log-probability
of each (never the draft's: speculative sampling emits tokens distributed as the policy's and
scores them with the policy's distribution) and the weights version that generated them.

Every request pending when the last batch ended is generated in one batch, padded up to a power
of two so that a few samplers (static KV caches, CUDA graphs on GPU) serve every batch size.
Policy weights come from the trainer, draft weights from the draft worker, both pulled when newer.
"""
from __future__ import annotations

import logging
import time
from functools import partial

import numpy as np
import torch

from srl.envs.tokens import build_task, finish_completions, max_new_tokens, prompt_len, sampling_params
from srl.generation import PlainSampler, SpeculativeSampler
from srl.generation.auto import load_table, pick
from srl.plan import DRAFT_PARAMS, PARAMS, PROMPTS, build_policy, has_stream
from srl.policies.lm import TransformerLM
from srl.policies.lm_policy import lm_config, sampling_dtype
from srl.policies.weights import load_numpy_weights
from srl.streams.inference import InferenceServer
from srl.streams.params import ParamClient
from srl.system.wire import Message, WireError
from srl.system.worker import PollResult
from srl.workers.base import RLWorker
from srl.workers.reports import GenerationReport, to_meta


def build_draft(cfg, vocab_size: int, device: str = "cpu") -> TransformerLM:
    """The draft model on ``device``; seeded alike in the draft worker and the generation
    workers, so both start from the same weights. With ``draft.warmup_steps`` (default
    ``algorithm.warmup_steps``) the draft is warmed up on the task like the policy, so it starts
    close to the warmed-up policy (and a draft that is never aligned, ``draft.align: false``,
    starts there too and then falls behind)."""
    torch.manual_seed(cfg.seed * 977 + 13)
    draft = TransformerLM(lm_config(vocab_size, cfg.draft.lm)).to(device)
    a, d = cfg.algorithm, cfg.draft
    steps = a.warmup_steps if d.warmup_steps is None else d.warmup_steps
    if steps:
        from srl.algorithms.grpo import warm_up

        lr = a.warmup_lr if d.warmup_lr is None else d.warmup_lr
        warm_up(draft, build_task(cfg), steps, lr, device, cfg.seed + 1, batch=a.warmup_batch, cache=a.warmup_cache)
    return draft


def make_sampler(cfg, policy, draft, batch: int, prompt_len: int, new_tokens: int):
    """The sampler ``generation.mode`` names, for ``batch`` rows."""
    g, params = cfg.generation, sampling_params(cfg)
    graphs = g.cuda_graph and next(policy.parameters()).is_cuda
    mode, k, draft_len = g.mode, (1 if g.mode == "standard" else g.k), g.draft_len
    if mode == "auto":
        choice = pick(load_table(g.auto_table), batch)
        mode, k, draft_len = choice.mode, choice.k, choice.draft_len
        logging.getLogger("srl").info("generation.mode auto: batch %d -> %s", batch, choice.describe())
    if mode == "plain":
        return PlainSampler(policy, batch, prompt_len + new_tokens + 16, params, cuda_graph=graphs)
    slack = (k + 2) * draft_len + 3
    return SpeculativeSampler(policy, draft, batch, prompt_len + new_tokens + slack + 1, k=k, draft_len=draft_len,
                              params=params, cuda_graph=graphs)


def generate(sampler, prompts: torch.Tensor, new_tokens: int, eos_id: int, pad_id: int):
    """(tokens, logp, stats) for int64 prompts (n, P): completions with ``pad_id`` (log-prob 0)
    after the first eos, and the log-probability the policy gave each token."""
    out = sampler.generate(prompts, new_tokens)
    tokens, logp, _ = finish_completions(out.tokens.cpu().numpy(), out.logp.float().cpu().numpy(), eos_id, pad_id)
    return tokens, logp, out


class GenerationWorker(RLWorker):
    """Holds the policy (and the draft) and a sampler per batch size bucket."""

    kind = "generation"

    def _configure(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed * 31 + self.spec.index)
        torch.set_num_threads(1)
        self.device = cfg.workers.policies.device
        task = build_task(cfg)
        self.eos, self.pad, self.vocab = task.eos_id, task.pad_id, task.vocab_size
        self.P, self.N = prompt_len(task), max_new_tokens(cfg, task)
        dtype = sampling_dtype(cfg.policy, self.device)
        self.policy = build_policy(self.info, cfg.policy).to(self.device, dtype).eval()
        self.draft = None
        if cfg.generation.mode != "plain":
            self.draft = build_draft(cfg, self.vocab, self.device).to(dtype).eval()
        trainer = self.plan.stream(PARAMS).server_of(self.spec.name)
        self.params = self.endpoint(ParamClient(self.address(PARAMS, trainer), self.key,
                                                shared=self.cfg.network.shared_weights))
        got = self.params.wait_newer(-1, timeout_s=600.0, should_stop=self.should_stop)
        self.version = -1 if got is None else self._load(self.policy, got)
        self.draft_params = None
        self.draft_version = -1
        if has_stream(self.plan, DRAFT_PARAMS):
            server = self.plan.stream(DRAFT_PARAMS).server_of(self.spec.name)
            address = self.address(DRAFT_PARAMS, server)
            self.draft_params = self.endpoint(ParamClient(address, self.key, interval_s=0.02,
                                                          shared=self.cfg.network.shared_weights))
        self.samplers: dict[int, object] = {}
        self.server = self.endpoint(InferenceServer(self.spec.host, self.key, prefer=self.published(PROMPTS)))
        self.publish(PROMPTS, self.server.address)
        self.requests = self.completions = 0
        self.busy_s = 0.0
        """Seconds spent generating since the worker started (its busy share is the slope)."""
        self.stats: dict[str, float] = {}

    @staticmethod
    def _load(model, got) -> int:
        version, arrays = got
        load_numpy_weights(model, arrays)  # in place: the samplers' graphs keep reading them
        return version

    def _report(self) -> dict:
        stats, self.stats = self.stats, {}
        report = GenerationReport(self.requests, self.completions, self.version, self.draft_version, stats)
        self.requests = self.completions = 0
        return to_meta(report)

    def _check(self, msg: Message) -> None:
        """Refuse a request this worker cannot answer: it is dropped and counted."""
        obs = msg.arrays.get("obs")
        if obs is None or obs.ndim != 2 or obs.shape[1] != self.P or obs.dtype != np.int64:
            raise WireError(f"prompts {None if obs is None else (obs.dtype, obs.shape)}, expected int64 (n, {self.P})")
        if not 0 < len(obs) <= self.cfg.workers.policies.max_batch or obs.min() < 0 or obs.max() >= self.vocab:
            raise WireError("prompt count or token ids out of range")

    def _sampler(self, n: int):
        bucket = 1 << max(n - 1, 0).bit_length()
        if bucket not in self.samplers:
            self.samplers[bucket] = make_sampler(self.cfg, self.policy, self.draft, bucket, self.P, self.N)
        return bucket, self.samplers[bucket]

    def _poll(self) -> PollResult:
        got = self.params.poll(load=partial(load_numpy_weights, self.policy))
        if got is not None:
            self.version = got[0]
        if self.draft_params is not None:
            got = self.draft_params.poll(load=partial(load_numpy_weights, self.draft))
            if got is not None:
                self.draft_version = got[0]
        pending = self.server.pending(self.cfg.workers.policies.max_batch, timeout_ms=20, check=self._check)
        if not pending:
            return PollResult()
        prompts = np.concatenate([r.obs for r in pending])
        n = len(prompts)
        bucket, sampler = self._sampler(n)
        padded = np.concatenate([prompts, np.repeat(prompts[:1], bucket - n, axis=0)])
        t0 = time.perf_counter()
        tokens, logp, out = generate(sampler, torch.from_numpy(padded).to(self.device), self.N, self.eos, self.pad)
        self._note(out.stats, time.perf_counter() - t0, n)
        start = 0
        for request in pending:
            m = len(request.obs)
            self.server.reply(request, {"tokens": tokens[start:start + m], "logp": logp[start:start + m]},
                              {"version": self.version})
            start += m
        self.requests += len(pending)
        self.completions += n
        return PollResult(samples=n, batches=1)

    def _note(self, stats: dict, seconds: float, n: int) -> None:
        self.stats["generation/batch_s"] = seconds
        self.busy_s += seconds
        self.stats["generation/busy_s"] = self.busy_s
        self.stats["generation/batch"] = float(n)
        self.stats["generation/tokens_per_pass"] = float(stats.get("tokens_per_pass", 1.0))
        if "acceptance_rate" in stats:
            self.stats["generation/acceptance_rate"] = float(stats["acceptance_rate"])
        self.stats["generation/draft_version"] = float(self.draft_version)
