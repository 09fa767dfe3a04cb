"""Sophia: a clipped diagonal second-order optimizer (Liu et al., arXiv 2305.14342, Algorithm 3).

Per coordinate, with the paper's gamma called ``rho`` here::

    m  <- b1 * m + (1 - b1) * g                        every step
    p  <- p - lr * wd * p                              decoupled weight decay
    p  <- p - lr * clip(m / max(rho * h, eps), -1, 1)
    h  <- b2 * h + (1 - b2) * scale * h_hat            every ``update_period`` steps (update_hessian)

No bias correction (as in the paper and its reference code). Before the first Hessian update
``h == 0``, so every coordinate is clipped and the step is ``lr * sign(m)``. A negative ``h``
(possible only with the Hutchinson estimator) also gives ``max(rho * h, eps) = eps``, i.e. the
clipped step ``lr * sign(m)``: this is the paper's treatment of negative curvature estimates.

Stability: beta.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch.optim import Optimizer

__all__ = ["Sophia"]

# Parameters stored in these dtypes keep their optimizer state (m, h) in float32 and are updated
# in float32 before being rounded back.
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _state_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float32 if p.dtype in _LOW_PRECISION else p.dtype


class Sophia(Optimizer):
    """Sophia with a pluggable diagonal Hessian estimate (Sophia-G and Sophia-H).

    Args:
        params: iterable of parameters or parameter-group dicts.
        lr: learning rate (the paper's eta). Each coordinate moves at most ``lr`` per step
            (plus weight decay).
        betas: ``(b1, b2)``: EMA factors of the gradient (every step) and of the Hessian
            estimate (every ``update_hessian`` call).
        rho: clipping scale (the paper's gamma). Larger rho: fewer clipped coordinates, smaller
            steps. Tune it so that ``win_rate()`` sits in 0.1-0.5 after the first few hundred steps.
        weight_decay: decoupled weight decay (the paper and reference configs use about 2x
            AdamW's).
        eps: floor of the denominator ``max(rho * h, eps)``.
        update_period: how many ``step()`` calls between Hessian refreshes (the paper's k).
            The optimizer does not refresh by itself (a refresh needs a fresh forward and
            backward); ``hessian_due()`` tells the training loop when to do it.
        foreach: use the multi-tensor ``torch._foreach_*`` path (default: True). ``False`` runs
            a per-tensor loop with the same arithmetic (kept as a readable reference).
        win_rate_every: count clipped coordinates every this many steps (default:
            ``update_period``; 0: never; 1: every step). Counting costs two multi-tensor kernels
            and no host synchronisation until ``win_rate()`` is read.

    Raises:
        ValueError: on an out-of-range argument; the message names it.

    Training-loop contract (what the srl trainer does; ``B`` is the number of predictions in
    the batch the refresh loss averages over: tokens for a language model, actions for a
    policy)::

        loss.backward(); opt.step(); opt.zero_grad()
        if opt.hessian_due():                 # after every `update_period`-th step
            logits = model(batch_inputs)      # same batch: no extra samples consumed
            gnb_loss(logits).backward()       # labels sampled from the model itself
            opt.update_hessian(scale=B)       # h <- b2 h + (1-b2) * B * grad**2
            opt.zero_grad()

    For Sophia-H pass the estimate instead of relying on ``.grad``::

        opt.update_hessian(hutchinson_estimate(loss, params))

    Logged statistic: ``win_rate()`` returns the fraction of coordinates that were *not*
    clipped (the paper's "win rate") in the last step that counted them (every
    ``win_rate_every`` steps); reading it synchronises with the device.
    ``last_stats["win_rate"]`` holds the same value as a 0-d tensor, unsynchronised.

    State: ``exp_avg`` (m) and ``hessian`` (h) per parameter, in float32 for bfloat16 / float16
    parameters and in the parameter's dtype otherwise; ``state_dict()`` / ``load_state_dict()``
    round-trip them exactly (float32 state is not cast down to the parameter's dtype on load).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        eps: float = 1e-12,
        update_period: int = 10,
        *,
        foreach: bool | None = None,
        win_rate_every: int | None = None,
    ):
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair (b1, b2), got {betas}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"betas[0] must be in [0, 1), got {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"betas[1] must be in [0, 1), got {betas[1]}")
        if not rho > 0.0:
            raise ValueError(f"rho must be > 0, got {rho}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if not eps > 0.0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if isinstance(update_period, bool) or not isinstance(update_period, int) or update_period < 1:
            raise ValueError(f"update_period must be an int >= 1, got {update_period!r}")
        if win_rate_every is None:
            win_rate_every = update_period
        if isinstance(win_rate_every, bool) or not isinstance(win_rate_every, int) or win_rate_every < 0:
            raise ValueError(f"win_rate_every must be an int >= 0, got {win_rate_every!r}")
        defaults = dict(
            lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay, eps=eps,
            foreach=True if foreach is None else bool(foreach),
        )
        super().__init__(params, defaults)
        self.update_period = update_period
        self.win_rate_every = win_rate_every
        self.num_steps = 0            # step() calls so far (saved in state_dict)
        self.num_hessian_updates = 0  # update_hessian() calls so far (saved in state_dict)
        self.last_stats: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ state helpers
    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            dtype = _state_dtype(p)
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["hessian"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return state

    def hessian_due(self) -> bool:
        """True right after every ``update_period``-th ``step()`` (steps 10, 20, ... by default)."""
        return self.num_steps > 0 and self.num_steps % self.update_period == 0

    def win_rate(self) -> float:
        """Fraction of coordinates not clipped in the last ``step()`` (nan before the first)."""
        value = self.last_stats.get("win_rate")
        return float("nan") if value is None else float(value)

    # ------------------------------------------------------------------ Hessian EMA
    @torch.no_grad()
    def update_hessian(
        self,
        hessian_estimate: Sequence[torch.Tensor | None] | Mapping[torch.Tensor, torch.Tensor] | None = None,
        scale: float = 1.0,
    ) -> None:
        """Fold one diagonal Hessian estimate into the EMA: ``h <- b2*h + (1-b2)*scale*estimate``.

        Args:
            hessian_estimate: ``None`` (Gauss-Newton-Bartlett): the estimate is ``grad**2`` of
                whatever ``.grad`` holds, so back-propagate ``gnb_loss`` first and pass
                ``scale = B``, the number of predictions that loss averages over. Otherwise a
                list aligned with the optimizer's parameters (all groups, in order; ``None``
                entries skipped), e.g. from ``hutchinson_estimate``, or a dict ``{param: estimate}``.
            scale: multiplies the estimate (B for GNB; 1 for Hutchinson).

        Raises:
            ValueError: if a list estimate has the wrong length or a tensor the wrong shape.
        """
        if not scale >= 0.0:
            raise ValueError(f"scale must be >= 0, got {scale}")
        params = [p for g in self.param_groups for p in g["params"]]
        if hessian_estimate is None:
            pairs = [(p, p.grad, True) for p in params if p.grad is not None]
        elif isinstance(hessian_estimate, Mapping):
            pairs = [(p, hessian_estimate[p], False) for p in params if p in hessian_estimate]
        else:
            est = list(hessian_estimate)
            if len(est) != len(params):
                raise ValueError(
                    f"hessian_estimate has {len(est)} entries, the optimizer has {len(params)} parameters"
                )
            pairs = [(p, e, False) for p, e in zip(params, est) if e is not None]
        for p, e, _ in pairs:
            if e.shape != p.shape:
                raise ValueError(f"hessian_estimate entry of shape {tuple(e.shape)} for a parameter of shape {tuple(p.shape)}")
            if e.is_sparse:
                raise ValueError("hessian_estimate: sparse tensors are not supported")

        b2_of = {}
        for g in self.param_groups:
            for p in g["params"]:
                b2_of[p] = g["betas"][1]
        buckets: dict[tuple, tuple[list, list]] = defaultdict(lambda: ([], []))
        for p, e, square in pairs:
            h = self._init_state(p)["hessian"]
            e = e.to(h.dtype)
            buckets[(b2_of[p], square, h.device, h.dtype)][0].append(h)
            buckets[(b2_of[p], square, h.device, h.dtype)][1].append(e)
        for (b2, square, _, _), (hs, es) in buckets.items():
            torch._foreach_mul_(hs, b2)
            if square:  # GNB: (1 - b2) * scale * g * g
                torch._foreach_addcmul_(hs, es, es, value=(1.0 - b2) * scale)
            else:
                torch._foreach_add_(hs, es, alpha=(1.0 - b2) * scale)
        self.num_hessian_updates += 1

    # ------------------------------------------------------------------ step
    # clip(m / max(rho*h, eps), -1, 1) is computed as m / max(rho*h, eps, |m|): identical values
    # (|m| > max(rho*h, eps) gives m/|m| = sign(m) exactly), one fused division-update, and a
    # coordinate is unclipped exactly where the denominator exceeds |m|.
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """One Sophia step on the parameters whose ``.grad`` is set."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        count_now = self.win_rate_every > 0 and (self.num_steps + 1) % self.win_rate_every == 0
        counts: list[torch.Tensor] = []
        total = 0
        for group in self.param_groups:
            buckets: dict[tuple, list] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Sophia does not support sparse gradients")
                self._init_state(p)
                buckets[(p.device, p.dtype)].append(p)
                total += p.numel()
            for params in buckets.values():
                count = self._update(params, group, count_now)
                if count is not None:
                    counts.append(count)
        self.num_steps += 1
        if counts:
            n = torch.stack([c.to(counts[0].device, torch.float32) for c in counts]).sum()
            self.last_stats = {"win_rate": n / max(total, 1)}
        return loss

    def _update(self, params: list[torch.Tensor], group: dict, count: bool) -> torch.Tensor | None:
        low = params[0].dtype in _LOW_PRECISION
        m = [self.state[p]["exp_avg"] for p in params]
        h = [self.state[p]["hessian"] for p in params]
        grads = [p.grad.float() for p in params] if low else [p.grad for p in params]
        work = [p.float() for p in params] if low else params  # float32 copies of bf16 params
        hp = (group["betas"][0], group["rho"], group["weight_decay"], group["eps"])
        if group["foreach"]:
            n = _update_foreach(work, grads, m, h, group["lr"], *hp, count)
        else:
            _update_loop(work, grads, m, h, group["lr"], *hp)
            n = _count_unclipped(m, h, group["rho"], group["eps"]) if count else None
        if low:
            torch._foreach_copy_(params, work)
        return n

    # ------------------------------------------------------------------ (de)serialisation
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["sophia"] = {"num_steps": self.num_steps, "num_hessian_updates": self.num_hessian_updates}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts floating state to the parameter's dtype on load; keep float32 state of
        # low-precision parameters in float32 by restoring it from the incoming tensors.
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        own = [p for g in self.param_groups for p in g["params"]]
        incoming = {
            pid: {k: v for k, v in state_dict["state"][pid].items() if torch.is_tensor(v)}
            for pid in saved_ids if pid in state_dict["state"]
        }
        extra = state_dict.get("sophia", {})
        sd = {k: v for k, v in state_dict.items() if k != "sophia"}
        super().load_state_dict(sd)
        for pid, p in zip(saved_ids, own):
            if pid in incoming and p.dtype in _LOW_PRECISION:
                for k, v in incoming[pid].items():
                    self.state[p][k] = v.to(device=p.device, dtype=torch.float32, copy=True)
        self.num_steps = int(extra.get("num_steps", 0))
        self.num_hessian_updates = int(extra.get("num_hessian_updates", 0))


# ---------------------------------------------------------------------- the update, as functions
def _update_foreach(work, grads, m, h, lr, b1, rho, wd, eps, count):
    torch._foreach_lerp_(m, grads, 1.0 - b1)
    if wd != 0.0:
        torch._foreach_mul_(work, 1.0 - lr * wd)
    denom = torch._foreach_mul(h, rho)
    abs_m = torch._foreach_abs(m)
    torch._foreach_maximum_(denom, abs_m)
    torch._foreach_clamp_min_(denom, eps)  # max(rho*h, |m|, eps)
    torch._foreach_addcdiv_(work, m, denom, value=-lr)
    if not count:
        return None
    torch._foreach_sub_(denom, abs_m)  # > 0 exactly where the coordinate was not clipped
    return torch.stack(torch._foreach_norm(denom, 0)).sum()


def _update_loop(work, grads, m, h, lr, b1, rho, wd, eps):
    for w, g, mm, hh in zip(work, grads, m, h):
        mm.lerp_(g, 1.0 - b1)
        if wd != 0.0:
            w.mul_(1.0 - lr * wd)
        denom = torch.maximum(hh * rho, mm.abs()).clamp_min(eps)
        w.sub_(mm / denom * lr)


def _count_unclipped(m, h, rho, eps):
    return sum(((hh * rho).clamp_min(eps) > mm.abs()).sum() for mm, hh in zip(m, h))
