"""PPO (Schulman et al. 2017) with GAE (Schulman et al. 2016).

The loss terms are pure functions tested against hand-computed values; :class:`PPOLearner`
holds the network and optimizer and turns a batch of trajectories into gradient steps, with no
knowledge of processes or sockets.

Sample layout (arrays shaped [T, B, ...]): ``obs`` has T+1 rows (the last one bootstraps),
``action``, ``logp`` (behaviour log-prob), ``reward``, ``terminated``, ``truncated`` and
``valid`` (0 on gymnasium's next-step autoreset steps, which carry no transition).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from srl.algorithms.graphed_step import STATS, GraphedMinibatchStep
from srl.algorithms.steps import GuardedStep, averages
from srl.config import AlgorithmConfig, OptimizerConfig


# --------------------------------------------------------------------------- ALGO LOGIC


def gae(reward: torch.Tensor, value: torch.Tensor, next_value: torch.Tensor, terminated: torch.Tensor,
        done: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over [T, B].

    ``next_value[t]`` is V(obs[t+1]); after a truncation that is the final observation, so the
    episode is bootstrapped; after a termination it is multiplied by zero. ``done`` cuts the
    advantage recursion between episodes. Returns ``(advantages, returns)``.
    """
    T = reward.shape[0]
    adv = torch.zeros_like(reward)
    last = torch.zeros_like(reward[0])
    for t in reversed(range(T)):
        delta = reward[t] + gamma * (1.0 - terminated[t]) * next_value[t] - value[t]
        last = delta + gamma * lam * (1.0 - done[t]) * last
        adv[t] = last
    return adv, adv + value


def weighted_mean(x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``x.mean()``, or the mean weighted by ``weight`` (padding rows of a graphed step weigh 0)."""
    return x.mean() if weight is None else (x * weight).sum() / weight.sum()


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, clip: float,
                weight: torch.Tensor | None = None) -> torch.Tensor:
    """Clipped surrogate objective, negated for minimization."""
    ratio = torch.exp(logp - old_logp)
    pg_loss1 = -adv * ratio
    pg_loss2 = -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return weighted_mean(torch.max(pg_loss1, pg_loss2), weight)


def value_loss(value: torch.Tensor, old_value: torch.Tensor, ret: torch.Tensor, clip: float | None,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """0.5 * squared error, optionally PPO2-style clipped around the old value."""
    v_loss_unclipped = (value - ret) ** 2
    if clip is None:
        return 0.5 * weighted_mean(v_loss_unclipped, weight)
    v_clipped = old_value + torch.clamp(value - old_value, -clip, clip)
    v_loss_clipped = (v_clipped - ret) ** 2
    return 0.5 * weighted_mean(torch.max(v_loss_unclipped, v_loss_clipped), weight)


def normalized_advantages(adv: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``(adv - mean) / (std + 1e-8)`` over the (weighted) rows; unchanged for a single row."""
    if weight is None:
        return (adv - adv.mean()) / (adv.std() + 1e-8) if adv.numel() > 1 else adv
    n = weight.sum()
    mean = (adv * weight).sum() / n
    std = ((adv - mean) ** 2 * weight).sum().div(torch.clamp(n - 1.0, min=1.0)).sqrt()
    return torch.where(n > 1.0, (adv - mean) / (std + 1e-8), adv)


# --------------------------------------------------------------------------- learner


class PPOLearner:
    """Gradient steps for one policy; ``train(batch)`` returns cleanrl-named statistics."""

    def __init__(self, policy: torch.nn.Module, algo: AlgorithmConfig, opt: OptimizerConfig,
                 device: str = "cpu", total_env_steps: int | None = None, seed: int = 0, sync=None):
        """``sync`` (data-parallel trainers): an object with ``sum(tensor)`` (in-place all-reduce)
        and ``average_grads(params)``; every rank then takes identical steps."""
        from srl.optim import build_optimizer

        self.sync = sync
        self.policy = policy.to(device)
        self.algo, self.opt_cfg, self.device = algo, opt, device
        kwargs = dict(opt.kwargs)
        if opt.type in ("adam", "adamw"):
            kwargs.setdefault("fused", True)  # one kernel per step instead of one per tensor and op
        graphed = (algo.cuda_graph and torch.device(device).type == "cuda" and sync is None and bool(kwargs.get("fused"))
                   and not getattr(policy, "recurrent", False))
        if graphed:
            kwargs["capturable"] = True  # step counts and the learning rate live on the device
        self.optimizer = build_optimizer(self.policy.parameters(), opt.type, lr=opt.lr, **kwargs)
        self.sophia = hasattr(self.optimizer, "hessian_due")
        self.step_guard = GuardedStep(device)
        self.graphed = GraphedMinibatchStep(self._graph_body, self._graph_state, device) if graphed else None
        """Minibatch steps replayed from CUDA graphs (srl.algorithms.graphed_step), or None."""
        self._graph_ready()
        self.total_env_steps = total_env_steps
        self.env_steps = 0
        self.updates = 0
        self.skipped_steps = 0
        """Minibatch steps skipped because their gradient was not finite."""
        self.rng = torch.Generator().manual_seed(seed)
        self.return_var = RunningVar()

    def _lr(self) -> float:
        if not self.opt_cfg.anneal_lr or not self.total_env_steps:
            return self.opt_cfg.lr
        return self.opt_cfg.lr * max(0.0, 1.0 - self.env_steps / self.total_env_steps)

    def train(self, batch: dict[str, np.ndarray]) -> dict[str, float]:
        t0 = time.perf_counter()
        b = {k: torch.as_tensor(v, device=self.device) for k, v in batch.items()}
        T, B = b["reward"].shape[:2]
        policy = self.policy
        recurrent = getattr(policy, "recurrent", False)
        if policy.obs_norm is not None:
            valid_obs = b["obs"][:T][b["valid"].bool()]
            policy.obs_norm.update(valid_obs, self.sync)
        with torch.no_grad():
            all_values = self._values(b, T, B)
        terminated, truncated = b["terminated"].float(), b["truncated"].float()
        done = torch.clamp(terminated + truncated, max=1.0)
        reward = b["reward"].float() * b["valid"].float()
        if self.algo.norm_returns:
            reward = reward / self.return_var.scale_for(reward, done, self.algo.gamma, self.sync)
        adv, ret = self._advantages(b, reward, all_values, terminated, done)
        mask = b["valid"].bool()
        n = int(mask.sum())
        self.env_steps += n if self.sync is None else int(self.sync.sum(torch.tensor([n], dtype=torch.float64))[0])
        for group in self.optimizer.param_groups:
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(self._lr())  # a graphed step reads it where it is
            else:
                group["lr"] = self._lr()
        if recurrent:  # minibatches of whole env columns: each keeps its sequence and its start state
            data = {**b, "logp": b["logp"].float(), "adv": adv, "ret": ret, "value": all_values[:T], "valid": mask}
            stats = self._epochs(data, B, _take_columns)
        else:
            flat_mask = mask.reshape(-1)
            data = {
                "obs": b["obs"][:T].reshape(T * B, *b["obs"].shape[2:])[flat_mask],
                "action": b["action"].reshape(T * B, *b["action"].shape[2:])[flat_mask],
                "logp": b["logp"].reshape(-1)[flat_mask].float(),
                "adv": adv.reshape(-1)[flat_mask],
                "ret": ret.reshape(-1)[flat_mask],
                "value": all_values[:T].reshape(-1)[flat_mask],
            }
            stats = self._epochs(data, n, _take_rows)
        stats["losses/explained_variance"] = _explained_variance(all_values[:T][mask], ret[mask])
        stats["charts/learning_rate"] = self._lr()
        stats["perf/train_s"] = time.perf_counter() - t0
        return stats

    def _values(self, b: dict[str, torch.Tensor], T: int, B: int) -> torch.Tensor:
        """The current critic's values of every observation, [T + 1, B] (no gradient)."""
        policy = self.policy
        if getattr(policy, "recurrent", False):
            return policy.evaluate_sequence(b["obs"], b["action"], b["first"], _state_of(b))[2].float()
        return policy.value(b["obs"].reshape((T + 1) * B, *b["obs"].shape[2:])).reshape(T + 1, B)

    def _advantages(self, b: dict[str, torch.Tensor], reward: torch.Tensor, values: torch.Tensor,
                    terminated: torch.Tensor, done: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(advantages, value targets)`` [T, B] from the current critic's ``values`` [T + 1, B]:
        GAE here; :class:`srl.algorithms.appo.APPOLearner` swaps in V-trace."""
        T = reward.shape[0]
        return gae(reward, values[:T], values[1:], terminated, done, self.algo.gamma, self.algo.gae_lambda)

    def _epochs(self, data: dict[str, torch.Tensor], n: int, take) -> dict[str, float]:
        """Epochs of shuffled minibatches of ``n`` items (``take(data, index)`` selects them).
        Diagnostics are averaged over the last epoch only: on tiny CPU policies the bookkeeping
        would otherwise cost as much as the updates."""
        algo = self.algo
        # exactly `minibatches` steps per epoch whatever n is: data-parallel ranks step together
        bounds = [n * i // algo.minibatches for i in range(algo.minibatches + 1)]
        if self.graphed is not None and take is _take_rows:
            sizes = [max(hi - lo, 1) for lo, hi in zip(bounds[:-1], bounds[1:])]
            if self.graphed.prepare(data, sizes):
                return self._graphed_epochs(data, n, bounds)
            self.graphed = None
        sums: dict[str, torch.Tensor] = {}
        count = 0
        for epoch in range(algo.epochs):
            last = epoch == algo.epochs - 1
            if algo.minibatches == 1:  # one full-batch step: no shuffle needed
                batches = [data]
            else:
                perm = torch.randperm(n, generator=self.rng).to(self.device)
                batches = (take(data, perm[lo:max(hi, lo + 1)]) for lo, hi in zip(bounds[:-1], bounds[1:]))
            for mb in batches:
                stats = self._minibatch_step(mb, diagnostics=last)
                if last and stats:
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + v
                    count += 1
        stats = averages(sums, count)
        self.skipped_steps = self.step_guard.skipped()
        if self.skipped_steps:  # the run's total so far
            stats["losses/skipped_steps"] = float(self.skipped_steps)
        return stats

    def _graphed_epochs(self, data: dict[str, torch.Tensor], n: int, bounds: list[int]) -> dict[str, float]:
        """:meth:`_epochs` with every minibatch step replayed from a graph; the statistics of the
        last epoch are summed on the device and read once."""
        algo, total = self.algo, None
        for epoch in range(algo.epochs):
            perm = torch.randperm(n, generator=self.rng).to(self.device)
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                stats = self.graphed.step(data, perm[lo:max(hi, lo + 1)])
                if epoch == algo.epochs - 1:
                    total = stats.clone() if total is None else total + stats
        self.updates += algo.epochs * algo.minibatches
        out = averages(dict(zip(STATS, total.unbind())), algo.minibatches)
        self.skipped_steps = self.step_guard.skipped()
        if self.skipped_steps:
            out["losses/skipped_steps"] = float(self.skipped_steps)
        return out

    def _graph_state(self) -> list[torch.Tensor]:
        """Every tensor a graphed step updates. The optimizer's state, which torch creates at its
        first step, is created here first (zeros, through a step skipped by ``found_inf``)."""
        if not self.optimizer.state:
            for p in self.policy.parameters():
                p.grad = torch.zeros_like(p)
            self.optimizer.found_inf = torch.ones((), device=self.device)
            self.optimizer.step()
            self.optimizer.found_inf = None
            self.optimizer.zero_grad(set_to_none=True)
        tensors = [p.data for p in self.policy.parameters()]
        for state in self.optimizer.state.values():
            tensors += [v for v in state.values() if torch.is_tensor(v)]
        return [*tensors, self.step_guard.device_skips]

    def _graph_ready(self) -> None:
        """A graphed step's optimizer groups: capturable, their learning rate a device tensor (a
        checkpoint may bring floats and ``capturable: false``); graphs of replaced state dropped."""
        if self.graphed is None:
            return
        for group in self.optimizer.param_groups:
            group["capturable"] = True
            if not torch.is_tensor(group["lr"]):
                group["lr"] = torch.tensor(float(group["lr"]), device=self.device)
        self.graphed.graphs.clear()

    def _evaluate(self, mb: dict[str, torch.Tensor]):
        """``(logp, entropy, value, head, recorded)`` of the current policy on a minibatch, with
        the minibatch's recorded logp / adv / ret / value aligned to them (valid steps only)."""
        if "first" not in mb:
            return (*self.policy.evaluate(mb["obs"], mb["action"]), mb)
        logp, entropy, value, head = self.policy.evaluate_sequence(mb["obs"], mb["action"], mb["first"], _state_of(mb))
        m = mb["valid"]
        recorded = {k: mb[k][m] for k in ("logp", "adv", "ret", "value")}
        return logp[m], entropy[m], value[:m.shape[0]][m], head[m], recorded

    def _losses(self, mb: dict[str, torch.Tensor], weight: torch.Tensor | None = None):
        """``(loss, policy loss, value loss, entropy, logp, recorded)`` of a minibatch, every mean
        weighted by ``weight`` when given."""
        algo = self.algo
        logp, entropy, value, _, mb = self._evaluate(mb)
        adv = normalized_advantages(mb["adv"], weight) if algo.norm_adv else mb["adv"]
        pg_loss = policy_loss(logp, mb["logp"], adv, algo.clip, weight)
        v_loss = value_loss(value, mb["value"], mb["ret"], algo.value_clip, weight)
        entropy_loss = weighted_mean(entropy, weight)
        loss = pg_loss - algo.ent_coef * entropy_loss + algo.vf_coef * v_loss
        return loss, pg_loss, v_loss, entropy_loss, logp, mb

    def _graph_body(self, mb: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
        """The whole minibatch step as the graphed step replays it: the :data:`STATS` vector."""
        loss, pg_loss, v_loss, entropy_loss, logp, mb = self._losses(mb, weight)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = self.step_guard(self.optimizer, self.policy.parameters(), self.algo.max_grad_norm)
        with torch.no_grad():
            log_ratio = logp - mb["logp"]
            approx_kl = weighted_mean((log_ratio.exp() - 1) - log_ratio, weight)
            clipfrac = weighted_mean(((log_ratio.exp() - 1.0).abs() > self.algo.clip).float(), weight)
        return torch.stack([pg_loss.detach(), v_loss.detach(), entropy_loss.detach(), approx_kl, clipfrac, grad_norm])

    def _minibatch_step(self, mb: dict[str, torch.Tensor], diagnostics: bool = True) -> dict[str, float]:
        algo = self.algo
        loss, pg_loss, v_loss, entropy_loss, logp, mb = self._losses(mb)
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
        if not diagnostics:
            return {}
        with torch.no_grad():
            log_ratio = logp - mb["logp"]
            approx_kl = ((log_ratio.exp() - 1) - log_ratio).mean()
            clipfrac = ((log_ratio.exp() - 1.0).abs() > algo.clip).float().mean()
        stats = {"losses/sophia_win_rate": self.optimizer.win_rate()} if self.sophia else {}
        return {  # device tensors, read back once per batch by averages()
            **stats,
            "losses/policy_loss": pg_loss.detach(),
            "losses/value_loss": v_loss.detach(),
            "losses/entropy": entropy_loss.detach(),
            "losses/approx_kl": approx_kl,
            "losses/clipfrac": clipfrac,
            "losses/grad_norm": grad_norm,
        }

    def _refresh_hessian(self, mb: dict[str, torch.Tensor]) -> None:
        """Sophia's Gauss-Newton-Bartlett refresh on the current minibatch (no extra samples):
        back-propagate a loss on actions sampled from the policy itself, then fold grad**2 in."""
        from srl.optim import gnb_loss, gnb_loss_gaussian, gnb_num_predictions

        self.optimizer.zero_grad(set_to_none=True)
        head = self._evaluate(mb)[3]
        if self.policy.info.discrete:
            loss = gnb_loss(head)
        else:
            loss = gnb_loss_gaussian(head, self.policy.log_std.expand_as(head))
        loss.backward()
        if self.sync is not None:
            self.sync.average_grads(self.policy.parameters())
        self.optimizer.update_hessian(scale=gnb_num_predictions(head))
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "env_steps": self.env_steps, "updates": self.updates,
                "rng": self.rng.get_state(), "return_var": self.return_var.state()}

    def load_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self._graph_ready()
        self.env_steps, self.updates = int(state["env_steps"]), int(state["updates"])
        self.rng.set_state(state["rng"])
        if "return_var" in state:
            self.return_var.load(state["return_var"])


class RunningVar:
    """Running variance of discounted returns, for reward scaling (as in PPO's reference code).

    Returns are accumulated along each trajectory from zero, reset at episode ends."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def scale_for(self, reward: torch.Tensor, done: torch.Tensor, gamma: float, sync=None) -> float:
        ret = torch.zeros_like(reward[0])
        seen = torch.empty_like(reward)
        for t in range(reward.shape[0]):
            ret = gamma * ret + reward[t]
            seen[t] = ret
            ret = ret * (1.0 - done[t])
        x = seen.double().flatten()
        b_mean, b_var, n = _moments(x, sync)
        delta, total = b_mean - self.mean, self.count + n
        self.mean += delta * n / total
        self.var = (self.var * self.count + b_var * n + delta**2 * self.count * n / total) / total
        self.count = total
        return float(np.sqrt(self.var + 1e-8))

    def state(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load(self, state: dict) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), float(state["count"])


def _state_of(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A memory policy's start-of-trajectory state, stored as ``state/<name>`` arrays shaped
    [1, B, ...] (one row, so that trajectories concatenate along the env axis like the rest)."""
    return {k[len("state/"):]: v[0] for k, v in batch.items() if k.startswith("state/")}


def _take_rows(data: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[idx] for k, v in data.items()}


def _take_columns(data: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Env columns of [rows, B, ...] arrays."""
    return {k: v[:, idx] for k, v in data.items()}


def _moments(x: torch.Tensor, sync=None) -> tuple[float, float, float]:
    """(mean, variance, count) of ``x``, over every data-parallel rank when ``sync`` is given."""
    m = torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device), x.sum(), (x * x).sum()])
    if sync is not None:
        sync.sum(m)
    n, s1, s2 = (float(v) for v in m.cpu())
    mean = s1 / max(n, 1.0)
    return mean, max(s2 / max(n, 1.0) - mean * mean, 0.0), n


def _explained_variance(pred: torch.Tensor, target: torch.Tensor) -> float:
    var = target.var()
    return float("nan") if var == 0 else float(1 - (target - pred).var() / var)
