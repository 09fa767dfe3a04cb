"""One K-SEQ selection step as one Triton program per row (SpecTr draft selection on the GPU).

The torch version in ``srl.generation.speculative`` costs about 30 small kernels per drafted
position (the rho* grid search alone broadcasts (N, G, V) tensors), which at batch 1 made SpecTr's
selection cost about as much as the target's verification pass. Here one program per row does the
whole position: rho* by two grid rounds, the in-turn acceptance of the surviving drafts, the
residual draw (exponential race, so no normalisation pass), and the survivor bookkeeping that
the next position needs. Random numbers come from Philox (``tl.rand``) keyed by a seed tensor that
the caller draws from its torch generator, so the step stays capturable in a CUDA graph.

Math (see ``srl.generation.speculative``): beta(rho) = sum_x min(q(x), p(x) / rho);
f = (1 - (1 - beta)^k') / beta; rho* = smallest rho in [1, k'] with f <= rho; accept draft i with
prob. min(1, p / (rho q)); else emit from norm(max(0, p - min(q, p / rho) f)), or from p where
that has no mass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_GRID = 16  # rho candidates per round; two rounds: within (k' - 1) / 256 above rho*
_BLOCK_V = 1024  # long vectors per step: one program walks the whole vocabulary


@triton.jit
def _beta_on_grid(p_row, q_row, V, lo, step, G: tl.constexpr, BLOCK_V: tl.constexpr):
    """beta(rho_g) for rho_g = lo + step * (g + 1), g < G: a (G,) fp32 vector."""
    g = tl.arange(0, G)
    inv_rho = 1.0 / (lo + step * (g + 1).to(tl.float32))
    acc = tl.zeros([BLOCK_V, G], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        ok = offs < V
        p = tl.load(p_row + offs, mask=ok, other=0.0)
        q = tl.load(q_row + offs, mask=ok, other=0.0)
        acc += tl.minimum(q[:, None], p[:, None] * inv_rho[None, :])
    return tl.sum(acc, 0)


@triton.jit
def _first_valid(beta, lo, step, kf, G: tl.constexpr):
    """Index of the first grid point where (1 - (1 - beta)^k) <= rho beta (the last always)."""
    g = tl.arange(0, G)
    rho = lo + step * (g + 1).to(tl.float32)
    miss = tl.exp2(kf * tl.log2(tl.maximum(1.0 - beta, 0.0)))  # (1 - beta)^k', 0^k' = 0
    ok = ((1.0 - miss) <= rho * beta * (1.0 + 1e-6)) | (g == G - 1)
    return tl.min(tl.where(ok, g, G), 0)


@triton.jit
def _kseq_step_kernel(P, Q, DRAFTS, SURV, ALIVE, N_ACC, OUT, RHO_OUT, ACC_OUT, SEED,
                      t, V, K,
                      stride_pb, stride_pk, stride_pt, stride_qb, stride_qk, stride_qt,
                      stride_db, stride_dk, stride_dt, stride_ob,
                      K_P2: tl.constexpr, G: tl.constexpr, BLOCK_V: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, K_P2)
    k_ok = ks < K
    surv = tl.load(SURV + b * K + ks, mask=k_ok, other=0) != 0
    alive = tl.load(ALIVE + b) != 0
    valid = surv & alive
    kv = tl.sum(valid.to(tl.int32), 0)
    kf = tl.maximum(kv, 1).to(tl.float32)
    first = tl.min(tl.where(surv, ks, K_P2), 0)  # survivors share the prefix, hence p and q
    first = tl.minimum(first, K - 1).to(tl.int64)
    p_row = P + b * stride_pb + first * stride_pk + t * stride_pt
    q_row = Q + b * stride_qb + first * stride_qk + t * stride_qt

    # rho*: G points on (1, k'], then G points between the last invalid and first valid one
    g = tl.arange(0, G)
    step = (kf - 1.0) / G
    beta = _beta_on_grid(p_row, q_row, V, 1.0, step, G, BLOCK_V)
    gi = _first_valid(beta, 1.0, step, kf, G)
    lo = 1.0 + step * gi.to(tl.float32)
    step = step / G
    beta = _beta_on_grid(p_row, q_row, V, lo, step, G, BLOCK_V)
    gi = _first_valid(beta, lo, step, kf, G)
    rho = lo + step * (gi + 1).to(tl.float32)
    beta = tl.sum(tl.where(g == gi, beta, 0.0), 0)
    tl.store(RHO_OUT + b, rho)

    # accept the first valid draft with prob. min(1, p / (rho q))
    seed = tl.load(SEED) + b  # a Philox key per row; counters disjoint per position
    rng_base = t * (V + K_P2)
    d = tl.load(DRAFTS + b * stride_db + ks * stride_dk + t * stride_dt, mask=k_ok, other=0)
    pd = tl.load(p_row + d, mask=k_ok, other=0.0)
    qd = tl.load(q_row + d, mask=k_ok, other=0.0)
    ratio = tl.where(qd > 0, pd / (rho * tl.where(qd > 0, qd, 1.0)), tl.where(pd > 0, 1.0, 0.0))
    u = tl.rand(seed, rng_base + V + ks)
    acc_i = tl.min(tl.where(valid & (u < ratio), ks, K_P2), 0)
    accepted = acc_i < K_P2

    # residual norm(max(0, p - min(q, p / rho) f)) by an exponential race: argmax w / E
    f = tl.where(beta > 1e-12, (1.0 - tl.exp2(kf * tl.log2(tl.maximum(1.0 - beta, 0.0))))
                 / tl.maximum(beta, 1e-12), kf)
    best_w = tl.full([BLOCK_V], -1.0, tl.float32)
    best_wi = tl.zeros([BLOCK_V], dtype=tl.int64)
    best_p = tl.full([BLOCK_V], -1.0, tl.float32)
    best_pi = tl.zeros([BLOCK_V], dtype=tl.int64)
    mass = tl.zeros([BLOCK_V], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        ok = offs < V
        p = tl.load(p_row + offs, mask=ok, other=0.0)
        q = tl.load(q_row + offs, mask=ok, other=0.0)
        w = tl.maximum(p - tl.minimum(q, p / rho) * f, 0.0)
        e = -tl.log(tl.rand(seed, rng_base + offs))
        race_w = tl.where(ok, w / e, -1.0)
        race_p = tl.where(ok, p / e, -1.0)
        mass += w
        up = race_w > best_w
        best_w, best_wi = tl.where(up, race_w, best_w), tl.where(up, offs.to(tl.int64), best_wi)
        up = race_p > best_p
        best_p, best_pi = tl.where(up, race_p, best_p), tl.where(up, offs.to(tl.int64), best_pi)
    lane = tl.arange(0, BLOCK_V)
    res_w = tl.sum(tl.where(lane == tl.argmax(best_w, 0), best_wi, 0), 0)
    res_p = tl.sum(tl.where(lane == tl.argmax(best_p, 0), best_pi, 0), 0)
    residual = tl.where(tl.sum(mass, 0) > 1e-9, res_w, res_p)
    picked = tl.sum(tl.where(ks == acc_i, d, 0), 0)
    tok = tl.where(accepted, picked, residual)

    took = alive & accepted
    tl.store(N_ACC + b, tl.load(N_ACC + b) + took.to(tl.int64))
    new_surv = tl.where(took, surv & (d == tok), surv)
    tl.store(SURV + b * K + ks, new_surv.to(tl.int8), mask=k_ok)
    tl.store(ALIVE + b, took.to(tl.int8))
    tl.store(OUT + b * stride_ob + t, tok)
    tl.store(ACC_OUT + b, tl.where(accepted, acc_i, -1).to(tl.int64))


def kseq_step(p: Tensor, q: Tensor, drafts: Tensor, t: int, surv: Tensor, alive: Tensor,
              n_acc: Tensor, out: Tensor, seed: Tensor, rho_out: Tensor | None = None,
              accepted_out: Tensor | None = None) -> None:
    """K-SEQ at draft position ``t`` for every row, in place.

    Args:
        p: (B, k, >t, V) fp32 target distributions (any strides, contiguous last dim).
        q: (B, k, >t, V) fp32 draft distributions.
        drafts: (B, k, >t) int64 drafted tokens.
        surv: (B, k) int8, drafts that still match the accepted prefix (updated).
        alive: (B,) int8, rows whose block is still accepting (updated: 0 once a row emits a
            residual token).
        n_acc: (B,) int64 accepted-token count (incremented).
        out: (B, >t) int64; column t receives the emitted token.
        seed: (1,) int64 Philox seed; row b uses seed + b. Draw a fresh one per iteration
            (positions of one iteration use disjoint counters).
        rho_out: optional (B,) fp32 receiving the rho used.
        accepted_out: optional (B,) int64 receiving the accepted draft's index, or -1.
    """
    B, k = drafts.shape[:2]
    V = p.shape[-1]
    for name, x in (("p", p), ("q", q)):
        if x.dtype != torch.float32 or x.stride(-1) != 1 or x.dim() != 4:
            raise ValueError(f"kseq_step: {name} must be a (B, k, T, V) float32 tensor with a "
                             f"contiguous last dim, got {x.dtype} {tuple(x.shape)}")
    if rho_out is None:
        rho_out = torch.empty(B, device=p.device, dtype=torch.float32)
    if accepted_out is None:
        accepted_out = torch.empty(B, device=p.device, dtype=torch.int64)
    _kseq_step_kernel[(B,)](
        p, q, drafts, surv, alive, n_acc, out, rho_out, accepted_out, seed, t, V, k,
        p.stride(0), p.stride(1), p.stride(2), q.stride(0), q.stride(1), q.stride(2),
        drafts.stride(0), drafts.stride(1), drafts.stride(2), out.stride(0),
        K_P2=max(triton.next_power_of_2(k), 2), G=_GRID,
        BLOCK_V=min(_BLOCK_V, max(16, triton.next_power_of_2(V))), num_warps=8)
