"""One K-SEQ selection step as one Triton program per row (SpecTr draft selection on the GPU).

The torch version in ``srl.generation.speculative`` costs about 30 small kernels per drafted
position (the rho* grid search alone broadcasts (N, G, V) tensors), which at batch 1 made SpecTr's
selection cost about as much as the target's verification pass. Here a position is four
launches, the first three spread over (row, vocabulary chunk) programs so that a single row still
uses many SMs: (1) beta on a coarse rho grid per chunk, (2) beta on a fine grid inside the
bracket the coarse sums give, (3) the residual draw's exponential race per chunk, (4) one program
per row: rho, the in-turn acceptance of the surviving drafts, the winner of the race, and the
survivor bookkeeping that the next position needs. Every program recomputes the row's survivor
set and rho bracket from the partial sums, so no launch needs more than its inputs. Random numbers come from Philox (``tl.rand``) keyed by a seed tensor that
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
_CHUNK = 2048  # vocabulary entries per program of the parallel passes
_BLOCK_V = 512  # entries per step inside a chunk


@triton.jit
def _row_state(SURV, ALIVE, b, K, K_P2: tl.constexpr):
    """(surv, valid, k' as float, first survivor) of row b; survivors share p and q."""
    ks = tl.arange(0, K_P2)
    surv = tl.load(SURV + b * K + ks, mask=ks < K, other=0) != 0
    valid = surv & (tl.load(ALIVE + b) != 0)
    kf = tl.maximum(tl.sum(valid.to(tl.int32), 0), 1).to(tl.float32)
    first = tl.minimum(tl.min(tl.where(surv, ks, K_P2), 0), K - 1).to(tl.int64)
    return surv, valid, kf, first


@triton.jit
def _beta_on_grid(p_row, q_row, v_lo, v_hi, lo, step, G: tl.constexpr, BLOCK_V: tl.constexpr):
    """sum over [v_lo, v_hi) of min(q, p / rho_g), rho_g = lo + step * (g + 1): a (G,) vector."""
    g = tl.arange(0, G)
    inv_rho = 1.0 / (lo + step * (g + 1).to(tl.float32))
    acc = tl.zeros([BLOCK_V, G], dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        ok = offs < v_hi
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
def _summed(PART, b, C, G: tl.constexpr, C_P2: tl.constexpr):
    """Sum over chunks of the (C, G) partials of row b."""
    cs = tl.arange(0, C_P2)
    g = tl.arange(0, G)
    part = tl.load(PART + (b * C + cs[:, None]) * G + g[None, :], mask=(cs < C)[:, None], other=0.0)
    return tl.sum(part, 0)


@triton.jit
def _bracket(BETA1, b, C, kf, G: tl.constexpr, C_P2: tl.constexpr):
    """(lo, step) of the fine grid: between the last invalid and the first valid coarse point."""
    step = (kf - 1.0) / G
    gi = _first_valid(_summed(BETA1, b, C, G, C_P2), 1.0, step, kf, G)
    return 1.0 + step * gi.to(tl.float32), step / G


@triton.jit
def _rho_and_beta(BETA1, BETA2, b, C, kf, G: tl.constexpr, C_P2: tl.constexpr):
    lo, step = _bracket(BETA1, b, C, kf, G, C_P2)
    beta = _summed(BETA2, b, C, G, C_P2)
    gi = _first_valid(beta, lo, step, kf, G)
    g = tl.arange(0, G)
    return lo + step * (gi + 1).to(tl.float32), tl.sum(tl.where(g == gi, beta, 0.0), 0)


@triton.jit
def _rows(P, Q, b, first, t, stride_pb, stride_pk, stride_pt, stride_qb, stride_qk, stride_qt):
    return (P + b * stride_pb + first * stride_pk + t * stride_pt,
            Q + b * stride_qb + first * stride_qk + t * stride_qt)


@triton.jit
def _coarse_kernel(P, Q, SURV, ALIVE, BETA1, t, V, K, C,
                   stride_pb, stride_pk, stride_pt, stride_qb, stride_qk, stride_qt,
                   K_P2: tl.constexpr, G: tl.constexpr, CHUNK: tl.constexpr, BLOCK_V: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    _, _, kf, first = _row_state(SURV, ALIVE, b, K, K_P2)
    p_row, q_row = _rows(P, Q, b, first, t, stride_pb, stride_pk, stride_pt, stride_qb, stride_qk, stride_qt)
    v_lo = c * CHUNK
    beta = _beta_on_grid(p_row, q_row, v_lo, tl.minimum(v_lo + CHUNK, V), 1.0, (kf - 1.0) / G, G, BLOCK_V)
    tl.store(BETA1 + (b * C + c) * G + tl.arange(0, G), beta)


@triton.jit
def _fine_kernel(P, Q, SURV, ALIVE, BETA1, BETA2, t, V, K, C,
                 stride_pb, stride_pk, stride_pt, stride_qb, stride_qk, stride_qt,
                 K_P2: tl.constexpr, G: tl.constexpr, C_P2: tl.constexpr, CHUNK: tl.constexpr,
                 BLOCK_V: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    _, _, kf, first = _row_state(SURV, ALIVE, b, K, K_P2)
    p_row, q_row = _rows(P, Q, b, first, t, stride_pb, stride_pk, stride_pt, stride_qb, stride_qk, stride_qt)
    lo, step = _bracket(BETA1, b, C, kf, G, C_P2)
    v_lo = c * CHUNK
    beta = _beta_on_grid(p_row, q_row, v_lo, tl.minimum(v_lo + CHUNK, V), lo, step, G, BLOCK_V)
    tl.store(BETA2 + (b * C + c) * G + tl.arange(0, G), beta)


@triton.jit
def _race_kernel(P, Q, SURV, ALIVE, BETA1, BETA2, RACE_VAL, RACE_IDX, MASS, SEED, t, V, K, C,
                 stride_pb, stride_pk, stride_pt, stride_qb, stride_qk, stride_qt,
                 K_P2: tl.constexpr, G: tl.constexpr, C_P2: tl.constexpr, CHUNK: tl.constexpr,
                 BLOCK_V: tl.constexpr):
    """Per chunk: argmax of w / E and of p / E (E ~ Exp(1)), and the residual mass sum w,
    with w = max(0, p - min(q, p / rho) f): an exact draw from norm(w), or from p if w has none."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    _, _, kf, first = _row_state(SURV, ALIVE, b, K, K_P2)
    p_row, q_row = _rows(P, Q, b, first, t, stride_pb, stride_pk, stride_pt, stride_qb, stride_qk, stride_qt)
    rho, beta = _rho_and_beta(BETA1, BETA2, b, C, kf, G, C_P2)
    f = tl.where(beta > 1e-12, (1.0 - tl.exp2(kf * tl.log2(tl.maximum(1.0 - beta, 0.0))))
                 / tl.maximum(beta, 1e-12), kf)
    seed = tl.load(SEED) + b  # a Philox key per row; counters disjoint per position
    rng_base = t * (V + K_P2)
    best_w = tl.full([BLOCK_V], -1.0, tl.float32)
    best_wi = tl.zeros([BLOCK_V], dtype=tl.int64)
    best_p = tl.full([BLOCK_V], -1.0, tl.float32)
    best_pi = tl.zeros([BLOCK_V], dtype=tl.int64)
    mass = tl.zeros([BLOCK_V], dtype=tl.float32)
    v_lo = c * CHUNK
    v_hi = tl.minimum(v_lo + CHUNK, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        ok = offs < v_hi
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
    iw = tl.argmax(best_w, 0)
    ip = tl.argmax(best_p, 0)
    out = (b * C + c) * 2
    tl.store(RACE_VAL + out, tl.max(best_w, 0))
    tl.store(RACE_VAL + out + 1, tl.max(best_p, 0))
    tl.store(RACE_IDX + out, tl.sum(tl.where(lane == iw, best_wi, 0), 0))
    tl.store(RACE_IDX + out + 1, tl.sum(tl.where(lane == ip, best_pi, 0), 0))
    tl.store(MASS + b * C + c, tl.sum(mass, 0))


@triton.jit
def _finish_kernel(P, Q, DRAFTS, SURV, ALIVE, N_ACC, OUT, RHO_OUT, ACC_OUT, SEED,
                   BETA1, BETA2, RACE_VAL, RACE_IDX, MASS, t, V, K, C,
                   stride_pb, stride_pk, stride_pt, stride_qb, stride_qk, stride_qt,
                   stride_db, stride_dk, stride_dt, stride_ob,
                   K_P2: tl.constexpr, G: tl.constexpr, C_P2: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, K_P2)
    k_ok = ks < K
    surv, valid, kf, first = _row_state(SURV, ALIVE, b, K, K_P2)
    alive = tl.load(ALIVE + b) != 0
    p_row, q_row = _rows(P, Q, b, first, t, stride_pb, stride_pk, stride_pt, stride_qb, stride_qk, stride_qt)
    rho, _ = _rho_and_beta(BETA1, BETA2, b, C, kf, G, C_P2)
    tl.store(RHO_OUT + b, rho)

    # accept the first valid draft with prob. min(1, p / (rho q))
    d = tl.load(DRAFTS + b * stride_db + ks * stride_dk + t * stride_dt, mask=k_ok, other=0)
    pd = tl.load(p_row + d, mask=k_ok, other=0.0)
    qd = tl.load(q_row + d, mask=k_ok, other=0.0)
    ratio = tl.where(qd > 0, pd / (rho * tl.where(qd > 0, qd, 1.0)), tl.where(pd > 0, 1.0, 0.0))
    u = tl.rand(tl.load(SEED) + b, t * (V + K_P2) + V + ks)
    acc_i = tl.min(tl.where(valid & (u < ratio), ks, K_P2), 0)
    accepted = acc_i < K_P2

    # the residual draw: the race's winner over chunks
    cs = tl.arange(0, C_P2)
    c_ok = cs < C
    part = (b * C + cs) * 2
    val_w = tl.load(RACE_VAL + part, mask=c_ok, other=-2.0)
    val_p = tl.load(RACE_VAL + part + 1, mask=c_ok, other=-2.0)
    idx_w = tl.load(RACE_IDX + part, mask=c_ok, other=0)
    idx_p = tl.load(RACE_IDX + part + 1, mask=c_ok, other=0)
    res_w = tl.sum(tl.where(cs == tl.argmax(val_w, 0), idx_w, 0), 0)
    res_p = tl.sum(tl.where(cs == tl.argmax(val_p, 0), idx_p, 0), 0)
    mass = tl.sum(tl.load(MASS + b * C + cs, mask=c_ok, other=0.0), 0)
    residual = tl.where(mass > 1e-9, res_w, res_p)
    tok = tl.where(accepted, tl.sum(tl.where(ks == acc_i, d, 0), 0), residual)

    took = alive & accepted
    tl.store(N_ACC + b, tl.load(N_ACC + b) + took.to(tl.int64))
    tl.store(SURV + b * K + ks, tl.where(took, surv & (d == tok), surv).to(tl.int8), mask=k_ok)
    tl.store(ALIVE + b, took.to(tl.int8))
    tl.store(OUT + b * stride_ob + t, tok)
    tl.store(ACC_OUT + b, tl.where(accepted, acc_i, -1).to(tl.int64))


def kseq_step(p: Tensor, q: Tensor, drafts: Tensor, t: int, surv: Tensor, alive: Tensor,
              n_acc: Tensor, out: Tensor, seed: Tensor, rho_out: Tensor | None = None,
              accepted_out: Tensor | None = None) -> None:
    """K-SEQ at draft position ``t`` for every row, in place (four launches, no host sync).

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
    dev = p.device
    if rho_out is None:
        rho_out = torch.empty(B, device=dev, dtype=torch.float32)
    if accepted_out is None:
        accepted_out = torch.empty(B, device=dev, dtype=torch.int64)
    chunk = min(_CHUNK, max(16, triton.next_power_of_2(V)))
    block_v = min(_BLOCK_V, chunk)
    C = triton.cdiv(V, chunk)
    beta1 = torch.empty(B, C, _GRID, device=dev, dtype=torch.float32)
    beta2 = torch.empty_like(beta1)
    race_val = torch.empty(B, C, 2, device=dev, dtype=torch.float32)
    race_idx = torch.empty(B, C, 2, device=dev, dtype=torch.int64)
    mass = torch.empty(B, C, device=dev, dtype=torch.float32)
    strides = (p.stride(0), p.stride(1), p.stride(2), q.stride(0), q.stride(1), q.stride(2))
    sizes = dict(K_P2=max(triton.next_power_of_2(k), 2), G=_GRID)
    c_p2 = max(triton.next_power_of_2(C), 2)
    tiles = dict(CHUNK=chunk, BLOCK_V=block_v, num_warps=4)
    _coarse_kernel[(B, C)](p, q, surv, alive, beta1, t, V, k, C, *strides, **sizes, **tiles)
    _fine_kernel[(B, C)](p, q, surv, alive, beta1, beta2, t, V, k, C, *strides, **sizes,
                         C_P2=c_p2, **tiles)
    _race_kernel[(B, C)](p, q, surv, alive, beta1, beta2, race_val, race_idx, mass, seed, t, V, k, C,
                         *strides, **sizes, C_P2=c_p2, **tiles)
    _finish_kernel[(B,)](p, q, drafts, surv, alive, n_acc, out, rho_out, accepted_out, seed,
                         beta1, beta2, race_val, race_idx, mass, t, V, k, C, *strides,
                         drafts.stride(0), drafts.stride(1), drafts.stride(2), out.stride(0),
                         **sizes, C_P2=c_p2, num_warps=1)
