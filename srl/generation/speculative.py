"""Speculative sampling: standard (one draft) and SpecTr K-SEQ (k i.i.d. drafts), exact.

Rules, with p the target's and q the draft's sampling distributions (post temperature / top-k /
top-p, shared ``SamplingParams``):

Standard (Leviathan et al., Chen et al.): the draft proposes x_1..x_gamma; accept x_i with
probability min(1, p(x_i) / q(x_i)); at the first rejection emit a token from
norm(max(0, p - q)) and stop; if all are accepted, emit a bonus token from p.

K-SEQ (SpecTr, Sun et al. 2023): X_1..X_k i.i.d. from q and a rho in [1, k] with
beta(rho) = sum_x min(q(x), p(x) / rho). Accept X_i with probability min(1, p(X_i) / (rho q(X_i)))
in turn and emit the first accepted one; if none is, emit from
p_res = norm(max(0, p - min(q, p / rho) * f)),  f = (1 - (1 - beta)^k) / beta.
Then P(emit x) = min(q, p / rho) * f + (1 - beta)^k * p_res(x) = p(x), provided p >= min(q, p/rho) f
everywhere, i.e. f <= rho. rho* is the smallest such rho; there P(accept) = 1 - (1 - beta)^k and
p_res = norm(max(0, p - rho* q)). k = 1 gives rho* = 1 and standard speculative sampling.
We find rho* on a refined grid (the first grid point where f <= rho holds) and use the general
residual above, which is exact for any valid rho, so a grid step only costs a hair of acceptance.

Blocks: k draft sequences of length L from the same prefix; at each position the drafts that still
match the accepted prefix run K-SEQ with k' = their count (their next tokens are conditionally
i.i.d. from q(. | prefix)); a residual ends the block; after L accepted tokens a bonus token
comes from p. All k blocks are verified in one target pass over the shared prefix cache
(``tree_layout``). The rollout records log p of the emitted tokens, never log q.

At small batch on CUDA, standard sampling (k = 1) runs every part of an iteration in fused
kernels (``fused_iteration``: the draft's re-feed and the target's pass as
``fused_decode.FusedChunk``, the draft's tokens and the selection in ``srl.kernels.spec_select``),
drawing the same random numbers as the torch path in the same order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from srl.generation.decode import (GenState, Rollout, cache_for, capture, causal_slot_mask, cuda_generator,
                                   prefill, round_up, tree_slot_mask)
from srl.generation.sampling import SamplingParams, probs_from_params, sample_from_probs
from srl.kernels.kseq import kseq_step


# --------------------------------------------------------------------------- token level

def kseq_beta(p: Tensor, q: Tensor, rho: Tensor) -> Tensor:
    """beta(rho) = sum_x min(q(x), p(x) / rho); p, q (..., V), rho (...) -> (...)."""
    return torch.minimum(q, p / rho[..., None]).sum(-1)


def _f(beta: Tensor, k: Tensor) -> Tensor:
    """(1 - (1 - beta)^k) / beta, with its limit k at beta = 0."""
    safe = beta.clamp_min(1e-12)
    return torch.where(beta > 1e-12, (1 - (1 - beta) ** k) / safe, k)


def kseq_rho(p: Tensor, q: Tensor, k, grid: int = 16, rounds: int = 3) -> Tensor:
    """rho* per row: the smallest rho in [1, k] with (1 - (1 - beta)^k) / beta <= rho.

    ``k`` is an int or a per-row tensor (number of live drafts). Each round evaluates ``grid``
    points between the last invalid and the first valid point, so the result is valid and
    within (k - 1) / grid^rounds above rho*. Rows with k <= 1 get exactly 1.
    """
    N = p.shape[0]
    kf = torch.as_tensor(k, dtype=p.dtype, device=p.device).expand(N)
    lo = torch.ones_like(kf)
    hi = torch.maximum(kf, lo)  # always valid: 1 - (1 - b)^k <= k b
    steps = torch.arange(1, grid + 1, device=p.device, dtype=p.dtype) / grid  # (G,)
    for _ in range(rounds):
        rhos = lo[:, None] + (hi - lo)[:, None] * steps  # (N, G)
        beta = torch.minimum(q[:, None, :], p[:, None, :] / rhos[..., None]).sum(-1)  # (N, G)
        ok = 1 - (1 - beta) ** kf[:, None] <= rhos * beta * (1 + 1e-6)
        ok[:, -1] = True
        g = ok.int().argmax(-1)  # first valid grid point
        new_hi = rhos.gather(1, g[:, None]).squeeze(1)
        lo = torch.where(g > 0, rhos.gather(1, (g - 1).clamp_min(0)[:, None]).squeeze(1), lo)
        hi = new_hi
    return torch.where(kf <= 1, torch.ones_like(hi), hi)


def kseq_residual(p: Tensor, q: Tensor, rho: Tensor, k) -> Tensor:
    """norm(max(0, p - min(q, p / rho) f)): the distribution emitted when every draft fails."""
    kf = torch.as_tensor(k, dtype=p.dtype, device=p.device).expand(p.shape[:-1])
    f = _f(kseq_beta(p, q, rho), kf)
    res = (p - torch.minimum(q, p / rho[..., None]) * f[..., None]).clamp_min(0)
    mass = res.sum(-1, keepdim=True)
    return torch.where(mass > 1e-9, res / mass.clamp_min(1e-30), p)  # p = q: fall back to p


def kseq_accept(p: Tensor, q: Tensor, drafts: Tensor, rho: Tensor, valid: Tensor,
                generator: torch.Generator | None = None) -> Tensor:
    """Index of the first valid draft accepted with prob. min(1, p/(rho q)), or -1. (N,)"""
    pd, qd = p.gather(1, drafts), q.gather(1, drafts)  # (N, k)
    ratio = torch.where(qd > 0, pd / (rho[:, None] * qd.clamp_min(1e-30)), (pd > 0).to(p.dtype))
    u = torch.rand(drafts.shape, device=p.device, dtype=p.dtype, generator=generator)
    acc = (u < ratio) & valid
    return torch.where(acc.any(-1), acc.int().argmax(-1), -1)


def kseq_select(p: Tensor, q: Tensor, drafts: Tensor, generator: torch.Generator | None = None,
                valid: Tensor | None = None, rho: Tensor | float | None = None,
                use_kernel: bool | None = None) -> tuple[Tensor, Tensor]:
    """K-SEQ draft selection, vectorised over N independent problems.

    Args:
        p, q: (N, V) target and draft distributions.
        drafts: (N, k) i.i.d. draws from q (k = 1: standard speculative sampling).
        valid: (N, k) bool, drafts still in play (default all); invalid ones are skipped and
            k' = valid.sum() sets rho.
        rho: None computes rho*; a given rho must satisfy (1 - (1 - beta)^k) / beta <= rho.
        use_kernel: one Triton program per row (``srl.kernels.kseq``, float32 only); default
            for float32 CUDA tensors when rho is None. Same law, different random stream.
    Returns:
        (tokens (N,), accepted (N,)): the emitted token, and the index of the accepted draft or
        -1 where the token came from the residual.
    """
    if valid is None:
        valid = torch.ones_like(drafts, dtype=torch.bool)
    if rho is None and _kernel_wanted(p, use_kernel):
        N, k = drafts.shape
        V = p.shape[-1]
        out = torch.empty(N, 1, dtype=torch.long, device=p.device)
        accepted = torch.empty(N, dtype=torch.long, device=p.device)
        kseq_step(p[:, None, None].expand(N, k, 1, V), q[:, None, None].expand(N, k, 1, V),
                  drafts[..., None], 0, valid.to(torch.int8), torch.ones(N, dtype=torch.int8, device=p.device),
                  torch.zeros(N, dtype=torch.long, device=p.device), out, _seed(p.device, generator),
                  accepted_out=accepted)
        return out[:, 0], accepted
    kv = valid.sum(-1)
    if rho is None:
        rho = kseq_rho(p, q, kv)
    rho = torch.as_tensor(rho, dtype=p.dtype, device=p.device).expand(p.shape[0])
    accepted = kseq_accept(p, q, drafts, rho, valid, generator)
    fallback = sample_from_probs(kseq_residual(p, q, rho, kv), generator)
    picked = drafts.gather(1, accepted.clamp_min(0)[:, None]).squeeze(1)
    return torch.where(accepted >= 0, picked, fallback), accepted


def _kernel_wanted(p: Tensor, use_kernel: bool | None) -> bool:
    """The selection kernel by default for float32 CUDA tensors (float64 stays on torch)."""
    return p.is_cuda and p.dtype == torch.float32 if use_kernel is None else use_kernel


def _seed(device, generator: torch.Generator | None) -> Tensor:
    """A fresh Philox seed for the selection kernel, drawn from ``generator`` (graph-safe)."""
    return torch.randint(0, 2 ** 62, (1,), device=device, generator=generator)


# --------------------------------------------------------------------------- block level

def speculative_verify_block(p: Tensor, q: Tensor, drafts: Tensor,
                             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Standard speculative sampling of one block, all positions at once (gpt-fast style).

    p (B, L+1, V), q (B, L, V), drafts (B, L) -> (emitted (B, L+1), n_emit (B,)): the first
    n_emit[b] entries of emitted[b] are the output (accepted drafts, then residual or bonus).
    """
    B, L = drafts.shape
    pd = p[:, :L].gather(-1, drafts[..., None]).squeeze(-1)
    qd = q.gather(-1, drafts[..., None]).squeeze(-1)
    ratio = torch.where(qd > 0, pd / qd.clamp_min(1e-30), (pd > 0).to(p.dtype))
    u = torch.rand(B, L, device=p.device, dtype=p.dtype, generator=generator)
    n_acc = (u < ratio).int().cumprod(-1).sum(-1)  # accepted prefix length (B,)
    res = (p[:, :L] - q).clamp_min(0)
    mass = res.sum(-1, keepdim=True)
    res = torch.where(mass > 1e-9, res / mass.clamp_min(1e-30), p[:, :L])
    dist = torch.cat([res, p[:, L:]], 1)  # (B, L+1, V): residual at n < L, bonus at L
    pick = dist.gather(1, n_acc[:, None, None].long().expand(B, 1, p.shape[-1])).squeeze(1)
    extra = sample_from_probs(pick, generator)
    emitted = torch.cat([drafts, drafts[:, :1]], 1).scatter(1, n_acc[:, None].long(), extra[:, None])
    return emitted, n_acc.long() + 1


def kseq_verify_block(p: Tensor, q: Tensor, drafts: Tensor,
                      generator: torch.Generator | None = None,
                      use_kernel: bool | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """K-SEQ over blocks: p (B, k, L+1, V), q (B, k, L, V), drafts (B, k, L).

    Returns (emitted (B, L+1), n_emit (B,), src (B,)): src is a draft whose block holds the
    accepted tokens (its cache entries are the ones to keep). ``use_kernel`` (default: on CUDA)
    runs each position as one Triton program per row (``srl.kernels.kseq``).
    """
    B, k, L = drafts.shape
    rows = torch.arange(B, device=p.device)
    if _kernel_wanted(p, use_kernel):
        surv = torch.ones(B, k, dtype=torch.int8, device=p.device)
        alive = torch.ones(B, dtype=torch.int8, device=p.device)
        n_acc = torch.zeros(B, dtype=torch.long, device=p.device)
        emitted = torch.empty(B, L + 1, dtype=torch.long, device=p.device)
        seed = _seed(p.device, generator)
        for t in range(L):
            kseq_step(p, q, drafts, t, surv, alive, n_acc, emitted, seed)
        src = surv.argmax(-1)
        emitted[:, L] = sample_from_probs(p[rows, src, L], generator)  # bonus, used where alive
        return emitted, n_acc + 1, src
    alive = torch.ones(B, dtype=torch.bool, device=p.device)
    surv = torch.ones(B, k, dtype=torch.bool, device=p.device)
    n_acc = torch.zeros(B, dtype=torch.long, device=p.device)
    out = []
    for t in range(L):
        first = surv.int().argmax(-1)  # survivors share the prefix, hence p and q
        p_t, q_t = p[rows, first, t], q[rows, first, t]  # (B, V)
        valid = surv & alive[:, None]
        tok, acc = kseq_select(p_t, q_t, drafts[:, :, t], generator, valid,
                               kseq_rho(p_t, q_t, valid.sum(-1), 32, 2))
        took = alive & (acc >= 0)
        n_acc += took.long()
        surv = torch.where(took[:, None], surv & (drafts[:, :, t] == tok[:, None]), surv)
        out.append(tok)
        alive = took
    src = surv.int().argmax(-1)
    out.append(sample_from_probs(p[rows, src, L], generator))  # bonus, used where alive
    return torch.stack(out, 1), n_acc + 1, src


def emitted_log_probs(p: Tensor, src: Tensor, emitted: Tensor) -> Tensor:
    """log p of each emitted token along draft src's path: p (B, k, L+1, V) -> (B, L+1)."""
    rows = torch.arange(p.shape[0], device=p.device)
    return p[rows, src].gather(-1, emitted[..., None]).squeeze(-1).clamp_min(1e-30).log()


# --------------------------------------------------------------------------- one iteration

def draft_blocks(draft, dcache, state: GenState, layout, k: int, L: int, params: SamplingParams,
                 generator=None, step=None, refeed=None) -> tuple[Tensor, Tensor]:
    """k i.i.d. draft blocks of L tokens: (drafts (B, k, L), q (B, k, L, V)).

    The first call re-feeds the token before x0, whose draft cache entry is stale when the last
    block was fully accepted (the draft never ran on its last token). ``step`` (k = 1): a
    ``FusedDecodeStep`` of the draft whose ``logits`` run the later calls (one token per row at
    slot and position lens + t, what the layout gives for k = 1) in a few launches. ``refeed``:
    a two-token ``FusedChunk`` of the draft for the first call.
    """
    slots, positions, mask = layout
    P = dcache.lens
    B = P.shape[0]
    if refeed is not None:
        s2 = P[:, None] - 1 + torch.arange(2, device=P.device)
        first = refeed(state.tokens.gather(1, s2), P - 1, head_rows=1)[:, -1]
    else:
        s2, m2 = causal_slot_mask(P - 1, 2, dcache.max_len)
        first = draft(state.tokens.gather(1, s2), dcache, positions=s2, slots=s2, mask=m2)[:, -1]
    q_t = probs_from_params(first, params)[:, None].expand(B, k, -1)  # (B, k, V)
    qs, ds = [q_t], [sample_from_probs(q_t, generator)]
    for t in range(1, L):
        if step is not None:
            logits = step.logits(ds[-1], positions[:, t].contiguous())[:, None]
        else:
            cols = 1 + torch.arange(k, device=P.device) * L + (t - 1)  # draft j's token t-1
            logits = draft(ds[-1], dcache, positions=positions[:, cols], slots=slots[:, cols],
                           mask=mask[:, cols])
        q_t = probs_from_params(logits, params)
        qs.append(q_t)
        ds.append(sample_from_probs(q_t, generator))
    return torch.stack(ds, 2), torch.stack(qs, 2)


def speculative_step(target, draft, tcache, dcache, state: GenState, k: int, L: int,
                     params: SamplingParams, generator=None, stats: Tensor | None = None,
                     draft_step=None, fused: "FusedStandard | None" = None) -> None:
    """One draft-then-verify iteration for every unfinished row (static shapes, no host sync).

    ``stats`` (3,) accumulates [target passes of active rows, accepted draft tokens, emitted].
    ``draft_step``: see ``draft_blocks``' ``step``. ``fused`` (k = 1): the draft's re-feed and the
    target's pass over x0 and the L drafted tokens as ``FusedChunk`` calls (for k = 1 the tree
    layout is a causal chunk at slots lens + 0..L).
    """
    if fused is not None and fused.work is not None:
        return fused_iteration(tcache, dcache, state, L, params, generator, stats, draft_step, fused)
    P = tcache.lens
    B = P.shape[0]
    if fused is not None and fused.verify is not None and draft_step is not None:
        # all fused: only the positions lens + 0..L are needed (no slot mask)
        slots = mask = dense = None
        positions = P[:, None] + torch.arange(1 + L, device=P.device)
    else:
        slots, positions, mask = tree_slot_mask(P, k, L, tcache.max_len)
        dense = mask.dense
    drafts, q = draft_blocks(draft, dcache, state, (slots, positions, dense), k, L, params, generator,
                             draft_step, fused and fused.refeed)
    tin = torch.cat([state.x0(P), drafts.reshape(B, k * L)], 1)  # (B, 1 + kL)
    if fused is not None and fused.verify is not None:
        logits = fused.verify(tin, P)
    else:
        logits = target(tin, tcache, positions=positions, slots=slots, mask=mask)
    p_flat = probs_from_params(logits, params)  # (B, 1 + kL, V)
    V = p_flat.shape[-1]
    if k == 1:
        p = p_flat[:, None]  # (B, 1, 1 + L, V)
    else:
        p = torch.cat([p_flat[:, None, :1].expand(B, k, 1, V), p_flat[:, 1:].reshape(B, k, L, V)], 2)
    if k == 1:
        emitted, n_emit = speculative_verify_block(p[:, 0], q[:, 0], drafts[:, 0], generator)
        src = torch.zeros_like(n_emit)
    else:
        emitted, n_emit, src = kseq_verify_block(p, q, drafts, generator)
    logp = emitted_log_probs(p, src, emitted)  # the policy's, never the draft's
    active = (P + 1 < state.end).long()
    n_emit = n_emit * active
    if k > 1:  # k = 1: the block already sits right after x0
        ar = torch.arange(L, device=P.device)
        src_slots = P[:, None] + 1 + src[:, None] * L + ar  # accepted block -> right after x0
        dst_slots = P[:, None] + 1 + ar
        tcache.move_slots(src_slots, dst_slots)
        dcache.move_slots(src_slots, dst_slots)
    state.write(P, emitted, logp, n_emit)
    if stats is not None:
        stats += torch.stack([active.sum(), ((n_emit - 1).clamp_min(0)).sum(), n_emit.sum()])
    tcache.lens.add_(n_emit)
    dcache.lens.copy_(tcache.lens)


FUSED_DRAFT = True
"""Standard speculative sampling (k = 1) on CUDA: the draft's autoregressive steps through the
fused small-batch decode step (``srl.generation.fused_decode``, batches up to its
``FUSED_GEMV``) where the draft allows it. H200, batch 1, L = 7, the 10.5M draft of
``benchmarks/generation.py``: 1.56 ms per iteration against 1.94 (draft block 0.66 ms against
0.99)."""


def fused_draft_step(draft, dcache, state: GenState, params: SamplingParams, k: int, dev,
                     force: bool = False):
    """The draft's ``FusedDecodeStep`` (small-batch path) for ``draft_blocks``, or None."""
    from srl.generation.fused_decode import FusedDecodeStep, fused_unsupported

    if k != 1 or not (force or (FUSED_DRAFT and torch.device(dev).type == "cuda")):
        return None
    if fused_unsupported(draft, params) is not None:
        return None
    step = FusedDecodeStep(draft, dcache, state, params, gemv=True if force else None)
    return step if step.gemv_path else None


FUSED_VERIFY = 1
"""Standard speculative sampling (k = 1) on CUDA at batches up to this (0: never): the target's
verification pass and the draft's two-token re-feed through ``fused_decode.FusedChunk`` (cuBLAS
matmuls over the 1 + L rows, one rotary + cache + attention kernel per layer, fused residual +
norm) instead of the torch forward. H200, batch 1, L = 7, with ``FUSED_SELECT``: 0.79 ms per
iteration against 1.45 (docs/benchmarks.md)."""


FUSED_SELECT = True
"""With ``FUSED_VERIFY``, the fused draft steps and plain temperature sampling (no top-k / top-p,
T > 0): the draft's tokens drawn by the race kernels from its logits and the selection as
``srl.kernels.spec_select.verify_select`` (four launches, no probability tensors), instead of
about fifty torch kernels (``fused_iteration``)."""


@dataclass
class FusedStandard:
    """The fused pieces of a standard (k = 1) iteration; None where the model does not allow it."""

    verify: object = None  # FusedChunk of the target over 1 + L tokens
    refeed: object = None  # FusedChunk of the draft over 2 tokens
    work: dict | None = None  # FUSED_SELECT: buffers of fused_iteration


def fused_standard(target, draft, tcache, dcache, batch: int, k: int, L: int, dev,
                   force: bool = False, params: SamplingParams | None = None,
                   draft_step=None) -> FusedStandard | None:
    """``FusedStandard`` for ``speculative_step`` (k = 1, CUDA, batch <= FUSED_VERIFY), or None;
    with ``params`` and the draft's ``draft_step``, the fused selection where ``FUSED_SELECT``
    allows it."""
    from srl.generation.fused_decode import FusedChunk, fused_unsupported

    if k != 1 or not (force or (batch <= FUSED_VERIFY and torch.device(dev).type == "cuda")):
        return None
    out = FusedStandard(
        FusedChunk(target, tcache, batch, 1 + L) if fused_unsupported(target, None) is None else None,
        FusedChunk(draft, dcache, batch, 2) if fused_unsupported(draft, None) is None else None)
    plain = params is not None and params.temperature > 0 and params.top_k is None and (params.top_p or 1.0) >= 1.0
    if FUSED_SELECT and plain and out.verify and out.refeed and draft_step is not None:
        out.work = _select_workspace(batch, L, draft, dev, draft_step)
    return out if (out.verify or out.refeed) else None


def _select_workspace(B: int, L: int, draft, dev, draft_step) -> dict:
    from srl.kernels.decode_step import sample_workspace
    from srl.kernels.spec_select import verify_workspace

    V = draft.config.vocab_size
    w = verify_workspace(B, L, V, dev)
    w.update(dlogits=torch.zeros(L, B, V, device=dev, dtype=draft.embed.weight.dtype),
             dstat=torch.zeros(L, B, 2, device=dev), drafts=torch.zeros(B, L, device=dev, dtype=torch.long),
             noise=torch.zeros(B, V, device=dev), spart0=sample_workspace(B, V, dev),
             spart=torch.zeros(B, draft_step.race_chunks(), 4, device=dev),
             stats=torch.zeros(3, device=dev, dtype=torch.long), ar=torch.arange(2, device=dev))
    return w


def fused_iteration(tcache, dcache, state: GenState, L: int, params: SamplingParams, generator,
                    stats: Tensor | None, draft_step, fs: FusedStandard) -> None:
    """``speculative_step`` for k = 1 with every part fused: the draft's re-feed (``FusedChunk``),
    L draft tokens (race kernels over the draft's logits, ``FusedDecodeStep.race``), the target's
    pass over x0 and the block (``FusedChunk``), and the selection with the state write
    (``spec_select.verify_select``). Draws the torch path's random numbers in its order (L Exp(1)
    (B, V) draws, u (B, L), one more Exp(1) (B, V)), so both emit the same tokens up to rounding."""
    from srl.kernels.spec_select import verify_select

    w, P, T = fs.work, tcache.lens, params.temperature
    drafts = fused_draft_block(P, state, L, T, generator, draft_step, fs)
    tlogits = fs.verify(torch.cat([state.x0(P), drafts], 1), P)
    u = torch.rand(P.shape[0], L, device=P.device, generator=generator)
    w["noise"].exponential_(1.0, generator=generator)
    verify_select(tlogits, w["dlogits"], w["dstat"], drafts, u, w["noise"], T, state.tokens, state.logp,
                  tcache.lens, dcache.lens, state.end, w["stats"] if stats is None else stats, w)


def fused_draft_block(P: Tensor, state: GenState, L: int, T: float, generator, draft_step,
                      fs: FusedStandard) -> Tensor:
    """The draft block of ``fused_iteration``: drafts (B, L) (the workspace's), with the draft's
    logits and their (max, sum) kept for the selection."""
    from srl.kernels.decode_step import sample_chunks
    from srl.kernels.spec_select import draft_merge

    w = fs.work
    drafts, dl, noise = w["drafts"], w["dlogits"], w["noise"]
    s2 = P[:, None] - 1 + w["ar"]
    fs.refeed(state.tokens.gather(1, s2), P - 1, head_rows=1, out=dl[0])
    for t in range(L):
        noise.exponential_(1.0, generator=generator)
        if t == 0:
            sample_chunks(dl[0], noise, w["spart0"], T)
            draft_merge(w["spart0"], drafts, w["dstat"], 0)
        else:
            draft_step.race(drafts[:, t - 1:t], P + t, dl[t], noise, w["spart"])
            draft_merge(w["spart"], drafts, w["dstat"], t)
    return drafts


class SpeculativeSampler:
    """Speculative rollouts from ``target`` with ``draft``: k = 1 standard, k > 1 SpecTr K-SEQ.

    One iteration (draft L steps, one tree-shaped target pass, selection, cache moves) is one
    CUDA graph on GPU. Rows accept different numbers of tokens; finished rows idle.
    """

    def __init__(self, target, draft, batch: int, max_len: int, k: int = 1, draft_len: int = 4,
                 params: SamplingParams = SamplingParams(), cuda_graph: bool = True,
                 dtype=None, generator: torch.Generator | None = None,
                 check_every: int = 1):
        from srl.policies.lm import require_cats

        require_cats(target)  # CATS MLPs (mlp.cats) for policy and draft: thresholds needed
        require_cats(draft)
        if k < 1 or draft_len < 1:
            raise ValueError(f"k ({k}) and draft_len ({draft_len}) must be >= 1")
        if target.config.vocab_size != draft.config.vocab_size:
            raise ValueError("target and draft must share the vocabulary (vocab_size differs)")
        dev = next(target.parameters()).device
        dt = dtype or next(target.parameters()).dtype
        self.target, self.draft, self.k, self.L = target, draft, k, draft_len
        self.params, self.check_every = params.validate(), check_every
        self.generator = cuda_generator(dev, generator)
        max_len = round_up(max_len) if dev.type == "cuda" else max_len
        self.tcache = cache_for(target, batch, max_len, dev, dt)
        self.dcache = cache_for(draft, batch, max_len, dev, dtype or next(draft.parameters()).dtype)
        self.state = GenState.allocate(batch, max_len, dev)
        self.stats = torch.zeros(3, dtype=torch.long, device=dev)
        self.draft_step = fused_draft_step(draft, self.dcache, self.state, self.params, k, dev)
        self.fused = fused_standard(target, draft, self.tcache, self.dcache, batch, k, draft_len, dev,
                                    params=self.params, draft_step=self.draft_step)
        dummy = torch.zeros(batch, 2, dtype=torch.long, device=dev)
        self.state.reset(dummy, 1)
        with torch.inference_mode():  # capture from a valid state (lens >= 1)
            prefill(self.target, self.tcache, dummy)
            prefill(self.draft, self.dcache, dummy)
            self._step = capture(self, self._iteration, cuda_graph)

    def close(self) -> None:
        self._step.close()

    def _iteration(self) -> None:
        speculative_step(self.target, self.draft, self.tcache, self.dcache, self.state, self.k,
                         self.L, self.params, self.generator, self.stats, self.draft_step, self.fused)

    def slack(self) -> int:
        """Cache slots needed past prompt + max_new_tokens."""
        return (self.k + 2) * self.L + 3

    @torch.inference_mode()
    def generate(self, prompt: Tensor, max_new_tokens: int) -> Rollout:
        B, T0 = prompt.shape
        if T0 + max_new_tokens + self.slack() > self.tcache.max_len:
            raise ValueError(f"prompt ({T0}) + max_new_tokens ({max_new_tokens}) + {self.slack()}"
                             f" does not fit the cache ({self.tcache.max_len} slots)")
        t0 = time.perf_counter()
        self.state.reset(prompt, max_new_tokens)
        self.stats.zero_()
        prefill(self.target, self.tcache, prompt)
        prefill(self.draft, self.dcache, prompt)
        iters = 0
        earliest = max_new_tokens // (self.L + 1)  # no row can finish sooner
        while iters < max_new_tokens:  # every iteration emits >= 1 token per active row
            self._step()
            iters += 1
            if (iters >= earliest and iters % self.check_every == 0
                    and bool((self.tcache.lens + 1 >= self.state.end).all())):
                break
        out = Rollout(self.state.tokens[:, T0:T0 + max_new_tokens].clone(),
                      self.state.logp[:, T0:T0 + max_new_tokens].clone())
        passes, accepted, emitted = self.stats.tolist()
        out.seconds = time.perf_counter() - t0
        out.stats = {
            "iterations": iters,
            "target_passes": passes,
            "tokens_per_pass": emitted / max(passes, 1),  # block efficiency
            "accepted_per_pass": accepted / max(passes, 1),
            "acceptance_rate": accepted / max(passes * self.L, 1),  # per drafted position
        }
        return out
