"""GRPO (Shao et al. 2024, DeepSeekMath): group-relative policy optimization for token tasks.

G completions of each prompt form a group; a completion's advantage is its reward minus the
group's mean, divided by the group's standard deviation (unbiased, + 1e-4 as in TRL), and every
token of the completion gets it. The loss is PPO's clipped surrogate per token, averaged over each
completion's tokens and then over completions, plus ``kl_coef`` times the k3 estimate of
KL(policy || reference) per token, the reference being the frozen initial policy.

The loss terms are pure functions tested against hand-computed values; :class:`GRPOLearner`
holds the model and optimizer. Batches are time-major like every srl sample ([rows, B]):
``prompt`` (P, B), ``completion`` (N, B), ``logp`` (N, B) the policy's log-probabilities at
generation, ``mask`` (N, B) tokens up to the first eos, ``reward`` (1, B), ``version`` (1, B),
``valid`` (1, B). Columns come in groups of G consecutive completions of one prompt.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import os
import time

import numpy as np
import torch

from srl.algorithms.steps import GuardedStep, averages
from srl.config import AlgorithmConfig, OptimizerConfig
from srl.generation.sampling import SamplingParams, token_log_probs

ADV_EPS = 1e-4


# --------------------------------------------------------------------------- ALGO LOGIC


def group_advantages(reward: torch.Tensor, group_size: int, eps: float = ADV_EPS) -> torch.Tensor:
    """(r - mean of its group) / (unbiased std of its group + eps); reward (B,), B % G == 0.
    A group of one has advantage 0."""
    r = reward.reshape(-1, group_size)
    centered = r - r.mean(1, keepdim=True)
    if group_size == 1:
        return centered.reshape(-1)
    return (centered / (r.std(1, keepdim=True) + eps)).reshape(-1)


def masked_sequence_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each row's masked tokens, then over rows: x, mask (B, N)."""
    m = mask.to(x.dtype)
    return ((x * m).sum(1) / m.sum(1).clamp_min(1.0)).mean()


def clipped_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor,
                       clip: float) -> torch.Tensor:
    """Per-token clipped surrogate, negated: logp, old_logp (B, N), adv (B,) per completion or
    (B, N) per token -> (B, N)."""
    ratio = torch.exp(logp - old_logp)
    adv = adv[:, None] if adv.dim() == 1 else adv
    pg_loss1 = -adv * ratio
    pg_loss2 = -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return torch.max(pg_loss1, pg_loss2)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference) on policy samples: e^d - d - 1, d = ref - logp."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def grpo_loss(logp, old_logp, adv, mask, clip: float, ref_logp=None, kl_coef: float = 0.0):
    """(loss, policy loss, kl): the scalar GRPO objective of one minibatch (negated)."""
    pg = masked_sequence_mean(clipped_token_loss(logp, old_logp, adv, clip), mask)
    kl = masked_sequence_mean(kl_k3(logp, ref_logp), mask) if ref_logp is not None else logp.new_zeros(())
    return pg + kl_coef * kl, pg, kl


# --------------------------------------------------------------------------- learner


WARMUP_RAMP_STEPS = 100
"""The supervised warm-up's learning rate rises linearly over this many steps (or a tenth of them)."""
WARMUP_BETAS = (0.9, 0.95)
WARMUP_CLIP = 1.0
"""AdamW's betas and the gradient-norm clip of the warm-up: the usual transformer settings. With
torch's defaults (beta2 0.999, no clip) the ~100M policy's loss spiked at lr 1e-3 (H200)."""


WARMUP_CHECK_EVERY = 50
WARMUP_EVAL_PROMPTS = 256
"""With ``algorithm.warmup_target``: held-out greedy exact match on this many prompts every this many steps."""


def greedy_exact_match(policy: torch.nn.Module, task, prompts: np.ndarray, new_tokens: int, device: str) -> float:
    """Mean reward of the greedy completions of ``prompts`` (exact match for the built-in tasks).
    No KV cache: the warm-up checks rarely, and a plain loop needs nothing but ``policy(ids)``."""
    from srl.envs.tokens import finish_completions

    was_training = policy.training
    policy.eval()
    ids = torch.as_tensor(np.asarray(prompts, np.int64), device=device)
    try:
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=torch.device(device).type == "cuda"):
            for _ in range(new_tokens):
                ids = torch.cat([ids, policy(ids)[:, -1].argmax(-1)[:, None]], 1)
    finally:
        policy.train(was_training)
    out = ids[:, prompts.shape[1]:].cpu().numpy()
    tokens, _, _ = finish_completions(out, np.zeros(out.shape, np.float32), task.eos_id, task.pad_id)
    return float(np.mean(task.reward(prompts, tokens)))


def _warmup_loss(policy: torch.nn.Module, task, ids: torch.Tensor, answers_only: bool, bf16: bool) -> torch.Tensor:
    """Next-token cross-entropy of ``ids`` (B, T + 1), over the answers only when the task marks them."""
    import torch.nn.functional as F

    with torch.autocast("cuda", torch.bfloat16, enabled=bf16):
        logits = policy(ids[:, :-1])
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                                reduction="none")
    if not answers_only:
        return per_token.mean()
    mask = task.answer_targets(ids).reshape(-1).float()
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def warm_up(policy: torch.nn.Module, task, steps: int, lr: float, device: str, seed: int,
            batch: int = 64, callback=None, cache: str = "", target: float | None = None) -> float:
    """Supervised next-token steps on the task's solved problems; returns the last loss. The loss
    covers the answers only when the task marks them (``answer_targets``), in bf16 autocast on CUDA.
    Deterministic given ``seed``, so a restarted trainer warms up to the same reference.
    ``callback(step, loss)``, if given, runs after every step (benchmarks probe accuracy with it).
    ``cache``: a folder of warmed-up weights (:func:`warmup_path`); a hit loads them (loss nan).
    ``target``: stop at the first check (every ``WARMUP_CHECK_EVERY`` steps) whose held-out greedy
    exact match reaches it, since accuracy at a fixed step varied from run to run (3% to 30%)."""
    if not hasattr(task, "stream"):
        raise ValueError("algorithm.warmup_steps needs a task with stream(batch, seq_len, rng)")
    if target is not None and not getattr(task, "answer_len", 0):
        raise ValueError("algorithm.warmup_target needs a task with answer_len")
    path = warmup_path(cache, policy, task, steps, lr, seed, batch, target) if cache else ""
    if path and os.path.exists(path):
        policy.load_state_dict(torch.load(path, map_location=device))
        return float("nan")
    rng = np.random.default_rng(seed + 4242)
    held_out = np.asarray(task.sample_prompts(WARMUP_EVAL_PROMPTS, np.random.default_rng(seed + 10**6)),
                          np.int64) if target is not None else None
    opt = torch.optim.AdamW(policy.parameters(), lr=lr, betas=WARMUP_BETAS)
    ramp = max(1, min(WARMUP_RAMP_STEPS, steps // 10))
    seq_len = min(policy.config.max_seq_len, 64)
    bf16 = torch.device(device).type == "cuda"
    answers_only = hasattr(task, "answer_targets")
    loss, accuracy, step = torch.zeros(()), None, 0
    for step in range(1, steps + 1):
        ids = torch.as_tensor(task.stream(batch, seq_len + 1, rng), device=device)
        loss = _warmup_loss(policy, task, ids, answers_only, bf16)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, step / ramp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), WARMUP_CLIP)
        opt.step()
        if callback is not None:
            callback(step, loss)
        if held_out is not None and step % WARMUP_CHECK_EVERY == 0:
            accuracy = greedy_exact_match(policy, task, held_out, int(task.answer_len), device)
            if accuracy >= target:
                break
    if target is not None:
        _log_warmup_stop(step, steps, accuracy, target)
    if path:
        save_warmup(path, policy)
    return float(loss.detach())


def _log_warmup_stop(step: int, steps: int, accuracy: float | None, target: float) -> None:
    """One line saying where a warm-up with a target stopped, and why."""
    log = logging.getLogger(__name__)
    if accuracy is not None and accuracy >= target:
        log.info("warm-up stopped at step %d: held-out exact match %.3f >= target %.3f", step, accuracy, target)
    else:
        last = "none" if accuracy is None else f"{accuracy:.3f}"
        log.info("warm-up ran to its cap of %d steps below target %.3f (last held-out exact match: %s)",
                 steps, target, last)


def warmup_path(cache: str, policy: torch.nn.Module, task, steps: int, lr: float, seed: int, batch: int,
                target: float | None = None) -> str:
    """The file in ``cache`` for these warm-up settings: the model's config, the task's type and
    fields, steps, lr, seed, batch and target (a task whose fields print with addresses never hits)."""
    fields = {k: repr(v) for k, v in sorted(vars(task).items())} if hasattr(task, "__dict__") else {}
    recipe = (WARMUP_RAMP_STEPS, WARMUP_BETAS, WARMUP_CLIP)
    if target is not None:  # without one, the key (and the weights kept under it) stay as before
        recipe += (target, WARMUP_CHECK_EVERY, WARMUP_EVAL_PROMPTS)
    key = repr((repr(getattr(policy, "config", None)), type(task).__qualname__, fields, steps, lr, seed, batch, recipe))
    return os.path.join(cache, f"warmup-{hashlib.sha1(key.encode()).hexdigest()[:20]}.pt")


def save_warmup(path: str, policy: torch.nn.Module) -> None:
    """Write the weights atomically (workers warming up the same draft may race)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save({k: v.detach().cpu() for k, v in policy.state_dict().items()}, tmp)
    os.replace(tmp, path)


class GRPOLearner:
    """Gradient steps for a language-model policy; ``train(batch)`` returns cleanrl-named statistics."""

    def __init__(self, policy: torch.nn.Module, algo: AlgorithmConfig, opt: OptimizerConfig,
                 device: str = "cpu", total_env_steps: int | None = None, seed: int = 0, sync=None,
                 sampling: SamplingParams | None = None, task=None):
        """``sampling``: the generation's temperature / top-k / top-p; log-probabilities are those
        of the distribution completions were sampled from. ``task``: the token task (its
        ``stream`` feeds ``algorithm.warmup_steps``). ``sync`` as for PPO."""
        from srl.optim import build_optimizer

        self.policy = policy.to(device)
        self.algo, self.opt_cfg, self.device, self.sync = algo, opt, device, sync
        self.sampling = sampling or SamplingParams()
        if algo.warmup_steps:
            warm_up(self.policy, task, algo.warmup_steps, algo.warmup_lr, device, seed, batch=algo.warmup_batch,
                    cache=algo.warmup_cache, target=algo.warmup_target)
        self.reference = None
        if algo.kl_coef > 0:  # the frozen initial policy (identical after a restart: same seed)
            self.reference = copy.deepcopy(policy).eval().requires_grad_(False)
        kwargs = dict(opt.kwargs)
        if opt.type in ("adam", "adamw"):
            kwargs.setdefault("fused", True)
        self.optimizer = build_optimizer(self.policy.parameters(), opt.type, lr=opt.lr, **kwargs)
        self.sophia = hasattr(self.optimizer, "hessian_due")
        self.step_guard = GuardedStep(device)
        self.rng = torch.Generator().manual_seed(seed)
        self.batches = 0
        """Batches trained on: the trainer's version, so version == batches marks fresh samples."""
        self.updates = 0
        self.skipped_steps = 0
        self.logp_gap = float("nan")
        """The latest :meth:`_logp_gap` measured (batches with no fresh completion keep it)."""

    def log_probs(self, model, prompt: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
        """(B, N) log-probabilities of the completion tokens under ``model``'s sampling distribution."""
        logits = model.completion_logits(prompt, completion)
        return token_log_probs(logits, completion, self.sampling)

    def train(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        t0 = time.perf_counter()
        b = {k: torch.as_tensor(v, device=self.device) for k, v in batch.items()}
        flat = {"prompt": b["prompt"].T.long(), "completion": b["completion"].T.long(),
                "logp": b["logp"].T, "mask": b["mask"].T.bool()}  # float32 from the stream
        reward = b["reward"][0]
        self._advantages(flat, reward)
        fresh = b["version"][0] == self.batches
        if bool(fresh.any()):
            self.logp_gap = self._logp_gap(flat, fresh)
        stats = {"losses/logp_gap": self.logp_gap}
        if self.reference is not None:
            with torch.no_grad():
                flat["ref"] = self.log_probs(self.reference, flat["prompt"], flat["completion"])
        stats.update(self._epochs(flat))
        self.batches += 1
        stats["charts/reward"] = float(reward.mean())
        groups = reward.reshape(-1, self.algo.group_size)
        stats["charts/flat_groups"] = float((groups.max(1).values == groups.min(1).values).float().mean())
        stats["perf/train_s"] = time.perf_counter() - t0
        return stats

    def _advantages(self, flat: dict[str, torch.Tensor], reward: torch.Tensor) -> None:
        """Put the batch's advantages in ``flat["adv"]``: GRPO's group-normalized reward."""
        flat["adv"] = group_advantages(reward, self.algo.group_size)

    @torch.no_grad()
    def _logp_gap(self, flat: dict, fresh: torch.Tensor) -> float:
        """Largest |stream log-prob - recomputed| over the tokens of completions generated by the
        current weights: ~1e-6 when the stream carries the policy's log-probabilities."""
        logp = self.log_probs(self.policy, flat["prompt"][fresh], flat["completion"][fresh])
        gap = (logp - flat["logp"][fresh]).abs() * flat["mask"][fresh]
        return float(gap.max())

    def _epochs(self, flat: dict[str, torch.Tensor]) -> dict[str, float]:
        algo = self.algo
        n = flat["adv"].shape[0]
        bounds = [n * i // algo.minibatches for i in range(algo.minibatches + 1)]
        sums: dict[str, torch.Tensor] = {}
        count = 0
        for epoch in range(algo.epochs):
            perm = torch.randperm(n, generator=self.rng).to(self.device)
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                mb = {k: v[perm[lo:max(hi, lo + 1)]] for k, v in flat.items()}
                stats = self._minibatch_step(mb)
                if epoch == algo.epochs - 1 and stats:
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + v
                    count += 1
        stats = averages(sums, count)
        self.skipped_steps = self.step_guard.skipped()
        if self.skipped_steps:  # the run's total so far
            stats["losses/skipped_steps"] = float(self.skipped_steps)
        return stats

    def _loss(self, mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, log-probs of the completion tokens, loss terms to report) of one minibatch."""
        algo = self.algo
        logits = self.policy.completion_logits(mb["prompt"], mb["completion"])
        logp = token_log_probs(logits, mb["completion"], self.sampling)
        loss, pg, kl = grpo_loss(logp, mb["logp"], mb["adv"], mb["mask"], algo.clip, mb.get("ref"), algo.kl_coef)
        return loss, logp, {"losses/policy_loss": pg, "losses/kl": kl}

    def _minibatch_step(self, mb: dict[str, torch.Tensor]) -> dict[str, float]:
        algo = self.algo
        loss, logp, terms = self._loss(mb)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.sync is not None:
            self.sync.average_grads(self.policy.parameters())
        grad_norm = self.step_guard(self.optimizer, self.policy.parameters(), algo.max_grad_norm)
        if grad_norm is None:
            return {}
        self.updates += 1
        if self.sophia and self.optimizer.hessian_due():
            self._refresh_hessian(mb)
        with torch.no_grad():
            mask = mb["mask"].float()  # masked sums, not boolean indexing: no host sync
            n = mask.sum().clamp_min(1.0)
            log_ratio = (logp - mb["logp"]) * mask
            approx_kl = ((log_ratio.exp() - 1) - log_ratio).sum() / n
            clipfrac = (((log_ratio.exp() - 1.0).abs() > algo.clip).float() * mask).sum() / n
        stats = {"losses/sophia_win_rate": self.optimizer.win_rate()} if self.sophia else {}
        return {**stats, **{k: v.detach() for k, v in terms.items()},  # device tensors: read once per batch
                "losses/approx_kl": approx_kl, "losses/clipfrac": clipfrac, "losses/grad_norm": grad_norm}

    def _refresh_hessian(self, mb: dict[str, torch.Tensor]) -> None:
        """Sophia's Gauss-Newton-Bartlett refresh on the minibatch's completion positions."""
        from srl.optim import gnb_loss, gnb_num_predictions

        self.optimizer.zero_grad(set_to_none=True)
        logits = self.policy.completion_logits(mb["prompt"], mb["completion"])
        logits = logits / max(self.sampling.temperature, 1e-6)
        gnb_loss(logits, mb["mask"]).backward()
        if self.sync is not None:
            self.sync.average_grads(self.policy.parameters())
        self.optimizer.update_hessian(scale=gnb_num_predictions(logits, mb["mask"]))
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "batches": self.batches, "updates": self.updates,
                "rng": self.rng.get_state()}

    def load_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.batches, self.updates = int(state["batches"]), int(state["updates"])
        self.rng.set_state(state["rng"])
