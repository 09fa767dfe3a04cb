"""Token actor: draws prompts, has generation workers complete them, scores the completions and
streams them to the trainer (and to the draft worker).

Each request holds ``workers.actors.envs_per_actor`` prompts, each repeated G times
(``algorithm.group_size``: GRPO's group); ``workers.actors.ring`` requests are in flight at once.
Every completion counts as one env step and one episode whose return is its reward.
"""
from __future__ import annotations

import time

import numpy as np

from srl.envs.tokens import build_task, finish_completions, max_new_tokens, prompt_len
from srl.plan import DRAFT_SAMPLES, PARAMS, PROMPTS, SAMPLES, has_stream
from srl.streams.inference import InferenceClient
from srl.streams.params import ParamClient
from srl.streams.sample import SampleProducer
from srl.system.worker import PollResult
from srl.workers.base import RLWorker
from srl.workers.reports import TokenActorReport, to_meta

REQUEST_TIMEOUT_S = 3.0
"""A request unanswered this long is sent again (its generation worker died)."""


class TokenActorWorker(RLWorker):
    """Owns a token task, its prompt stream and the scoring of completions."""

    kind = "token_actor"

    def _configure(self) -> None:
        cfg, a = self.cfg, self.cfg.workers.actors
        self.rng = np.random.default_rng(cfg.seed * 10_007 + self.spec.index * 101 + self.spec.incarnation * 7)
        self.task = build_task(cfg)
        self.P, self.N = prompt_len(self.task), max_new_tokens(cfg, self.task)
        self.G = cfg.algorithm.group_size
        stream = self.plan.stream(PROMPTS)
        self.client = InferenceClient([self.address(PROMPTS, g) for g in stream.servers], self.key)
        self._endpoints.extend(self.client.endpoints)
        trainer = self.plan.stream(SAMPLES).server_of(self.spec.name)
        self.samples = self.endpoint(SampleProducer([self.address(SAMPLES, trainer)], self.key))
        self.draft = None
        if has_stream(self.plan, DRAFT_SAMPLES):
            server = self.plan.stream(DRAFT_SAMPLES).server_of(self.spec.name)
            self.draft = self.endpoint(SampleProducer([self.address(DRAFT_SAMPLES, server)], self.key, hwm=2))
        params_server = self.plan.stream(PARAMS).server_of(self.spec.name)
        self.params = self.endpoint(ParamClient(self.address(PARAMS, params_server), self.key,
                                                interval_s=0.005, weights=False))
        per_request = a.envs_per_actor * self.G
        trajs_per_batch = max(1, -(-cfg.algorithm.batch_size // per_request))
        self.allowance = -(-trajs_per_batch // a.count) + a.max_ahead
        self.credit_epoch, self.pushed = -1, 0
        self.version, self.seq, self.next_req = -1, 0, 0
        self.pending: dict[int, tuple[np.ndarray, float]] = {}
        self.completions = 0
        self.episodes: tuple[list, list] = ([], [])
        self.draft_sent = self.draft_skipped = 0

    def _credit(self) -> int:
        """Requests this actor may still start before the trainer takes more of its samples."""
        if self.credit_epoch != self.params.epoch:  # first contact, or a restarted trainer
            self.credit_epoch, self.pushed = self.params.epoch, 0
        received = (self.params.status.get("received") or {}).get(f"{self.spec.index}.{self.spec.incarnation}", 0)
        return received + self.allowance - self.pushed - len(self.pending)

    def _report(self) -> dict:
        returns, lengths = self.episodes
        self.episodes = ([], [])
        steps, self.completions = self.completions, 0
        return to_meta(TokenActorReport(steps, returns, lengths, self.version, draft_sent=self.draft_sent,
                                        draft_skipped=self.draft_skipped))

    # ------------------------------------------------------------------ the loop
    def _poll(self) -> PollResult:
        got = self.params.poll()
        if got is not None:
            self.version = got[0]  # the trainer's version: flow control, no weights
        now = time.monotonic()
        for req, (prompts, posted) in list(self.pending.items()):
            if now - posted > REQUEST_TIMEOUT_S:  # its generation worker died: ask again
                del self.pending[req]
                self._post(prompts, now)
        while self.version >= 0 and len(self.pending) < self.cfg.workers.actors.ring and self._credit() > 0:
            prompts = np.asarray(self.task.sample_prompts(self.cfg.workers.actors.envs_per_actor, self.rng))
            self._post(np.repeat(prompts.astype(np.int64, copy=False), self.G, axis=0), now)
        done = 0
        msg = self.client.poll(timeout_ms=20)
        while msg is not None:
            done += self._on_reply(msg)
            msg = self.client.poll()
        return PollResult(samples=done, batches=1 if done else 0)

    def _post(self, prompts: np.ndarray, now: float) -> None:
        req = self.next_req
        self.next_req += 1
        self.pending[req] = (prompts, now)
        self.client.post(prompts, req)

    def _on_reply(self, msg) -> int:
        req, version = msg.meta.get("req"), msg.meta.get("version")
        entry = self.pending.get(req) if isinstance(req, int) else None
        if entry is None:
            return 0  # late answer to a request asked again
        tokens, logp = msg.arrays.get("tokens"), msg.arrays.get("logp")
        n = len(entry[0])
        if (isinstance(version, bool) or not isinstance(version, int) or tokens is None or logp is None
                or tokens.shape != (n, self.N) or logp.shape != (n, self.N) or tokens.dtype != np.int64
                or logp.dtype.kind != "f" or not np.isfinite(logp).all()
                or tokens.min() < 0 or tokens.max() >= self.task.vocab_size):
            self.client.endpoints[0].drop("completion that does not fit its request")
            return 0
        del self.pending[req]
        self._score_and_push(entry[0], tokens, logp, version)
        return n

    def _score_and_push(self, prompts: np.ndarray, tokens: np.ndarray, logp: np.ndarray, version: int) -> None:
        completions, logp, mask = finish_completions(tokens, logp, self.task.eos_id, self.task.pad_id)
        reward = np.asarray(self.task.reward(prompts, completions), dtype=np.float64).reshape(-1)
        if reward.shape != (len(prompts),) or not np.isfinite(reward).all():
            raise ValueError(f"{self.cfg.env.id}: reward() must return {len(prompts)} finite numbers")
        n = len(prompts)
        arrays = {"prompt": np.ascontiguousarray(prompts.T), "completion": np.ascontiguousarray(completions.T),
                  "logp": np.ascontiguousarray(logp.T), "mask": np.ascontiguousarray(mask.T),
                  "reward": reward.astype(np.float32)[None], "version": np.full((1, n), version, np.int64),
                  "valid": np.ones((1, n), bool)}
        meta = {"version": int(version), "actor": self.spec.index, "seq": self.seq,
                "incarnation": self.spec.incarnation}
        self.seq += 1
        self.completions += n
        self.episodes[0].extend(reward.tolist())
        self.episodes[1].extend(mask.sum(1).tolist())
        while not self.samples.push(arrays, meta, timeout_ms=100):
            if self.should_stop():  # back-pressure from the trainer; stay responsive to stop
                return
        self.pushed += 1
        if self.draft is not None:  # one-epoch regime: a busy draft skips samples, never queues them
            if self.draft.push(arrays, meta, timeout_ms=0):
                self.draft_sent += 1
            else:
                self.draft_skipped += 1
