"""Backward kernels of srl's FlashAttention-2 (see ``flash_attention.py`` for the algorithm).

``_bwd_preprocess`` computes D = rowsum(dO * O); ``_attn_bwd_dkdv`` owns a key block and
accumulates dK, dV over the query blocks of every query head in its KV group;
``_attn_bwd_dq`` owns a query block and accumulates dQ over key blocks. Both recompute
P = exp2(S - L) from the saved base-2 logsumexp L, so no atomics are needed.
"""

from __future__ import annotations

import triton
import triton.language as tl

from srl.kernels._flash_common import (autotune, causal_bounds, constexpr_arg, load_dq_rows, load_kv_tile,
                                       start_bounds)


@triton.jit
def _bwd_preprocess(O, DO, DELTA,
                    stride_ob, stride_oh, stride_on,
                    stride_dob, stride_doh, stride_don,
                    H, N_Q,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """DELTA[b, h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d] in fp32."""
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = (offs_m < N_Q)[:, None]
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
                mask=row_ok, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
                 mask=row_ok, other=0.0).to(tl.float32)
    tl.store(DELTA + off_bh.to(tl.int64) * N_Q + offs_m, tl.sum(o * do, 1), mask=offs_m < N_Q)


def _bwd_configs(first, second):
    cfg = triton.Config
    return [
        cfg({first: 64, second: 128}, num_warps=8, num_stages=2),
        cfg({first: 64, second: 128}, num_warps=8, num_stages=3),
        cfg({first: 128, second: 64}, num_warps=8, num_stages=2),
        cfg({first: 128, second: 64}, num_warps=8, num_stages=3),
        cfg({first: 128, second: 32}, num_warps=4, num_stages=3),
        cfg({first: 64, second: 64}, num_warps=4, num_stages=3),
        cfg({first: 128, second: 128}, num_warps=8, num_stages=2),
    ]


def _prune_bwd(configs, named_args, **kwargs):
    if constexpr_arg("HEAD_DIM", named_args, kwargs) < 256:
        return configs
    kept = [c for c in configs if max(c.kwargs.values()) <= 64 or
            (min(c.kwargs.values()) <= 32 and c.num_stages <= 2)]
    return kept or configs[-2:-1]


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, LSE_ROW, DELTA_ROW, START_ROW, stride_qn, stride_don,
                offs_n, offs_m0, lo, hi, n_q, causal_shift, qk_scale,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_START: tl.constexpr, EVEN_M: tl.constexpr,
                UPCAST: tl.constexpr, BLOCK_M: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks [lo, hi)."""
    q_ptrs += lo * stride_qn
    do_ptrs += lo * stride_don
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        if EVEN_M:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
            lse = tl.load(LSE_ROW + offs_m)
            delta = tl.load(DELTA_ROW + offs_m)
        else:
            row_ok = offs_m < n_q
            q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
            lse = tl.load(LSE_ROW + offs_m, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA_ROW + offs_m, mask=row_ok, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        s_t = tl.dot(k, tl.trans(q)) * qk_scale  # (BLOCK_N, BLOCK_M): S^T in base 2
        if MASKED:
            if CAUSAL:
                s_t = tl.where(offs_n[:, None] <= offs_m[None, :] + causal_shift, s_t, float("-inf"))
            if HAS_START:
                start = tl.load(START_ROW + offs_m, mask=offs_m < n_q, other=0)
                s_t = tl.where(offs_n[:, None] >= start[None, :], s_t, float("-inf"))
        p_t = tl.exp2(s_t - lse[None, :])
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk)
        q_ptrs += BLOCK_M * stride_qn
        do_ptrs += BLOCK_M * stride_don
    return dk, dv


@autotune(lambda: _bwd_configs("BLOCK_N", "BLOCK_M"), key=["HEAD_DIM", "CAUSAL", "N_BUCKET"],
          prune=_prune_bwd)
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, KV_START, qk_scale, sm_scale,
                   stride_qb, stride_qh, stride_qn,
                   stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn,
                   stride_dob, stride_doh, stride_don,
                   stride_dkb, stride_dkh, stride_dkn,
                   stride_dvb, stride_dvh, stride_dvn,
                   H, H_KV, GROUP, N_Q, N_K, N_BUCKET,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_START: tl.constexpr, UPCAST: tl.constexpr,
                   EVEN_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    off_bkv = tl.program_id(1)
    off_b = (off_bkv // H_KV).to(tl.int64)
    off_kvh = (off_bkv % H_KV).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = (offs_n < N_K)[:, None]
    k = tl.load(K + off_b * stride_kb + off_kvh * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=col_ok, other=0.0)
    v = tl.load(V + off_b * stride_vb + off_kvh * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                mask=col_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    causal_shift = N_K - N_Q
    if CAUSAL:
        # query i sees key j iff i >= j - causal_shift: skip the query blocks before,
        # mask the band of blocks that straddle the diagonal, then run unmasked.
        lo = tl.minimum(tl.maximum(start_n - causal_shift, 0), N_Q)
        lo = (lo // BLOCK_M) * BLOCK_M
        band_end = tl.minimum(tl.maximum(start_n + BLOCK_N - 1 - causal_shift, 0), N_Q)
        mid = lo + tl.cdiv(band_end - lo, BLOCK_M) * BLOCK_M
        mid = tl.minimum(mid, tl.cdiv(N_Q, BLOCK_M) * BLOCK_M)
    else:
        lo = 0
        mid = 0
    if HAS_START:  # per-row key starts: every query block from lo on takes the mask
        mid = tl.cdiv(N_Q, BLOCK_M) * BLOCK_M
    start_row = KV_START + off_b * N_Q
    for g in range(0, GROUP):
        off_h = off_kvh * GROUP + g
        off_bh = off_b * H + off_h
        q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m0[:, None] * stride_qn + offs_d[None, :]
        do_ptrs = DO + off_b * stride_dob + off_h * stride_doh + offs_m0[:, None] * stride_don + offs_d[None, :]
        lse_row = LSE + off_bh * N_Q
        delta_row = DELTA + off_bh * N_Q
        dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_row, delta_row, start_row, stride_qn,
                             stride_don, offs_n, offs_m0, lo, mid, N_Q, causal_shift, qk_scale,
                             True, CAUSAL, HAS_START, EVEN_M, UPCAST, BLOCK_M)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, lse_row, delta_row, start_row, stride_qn,
                             stride_don, offs_n, offs_m0, mid, N_Q, N_Q, causal_shift, qk_scale,
                             False, CAUSAL, HAS_START, EVEN_M, UPCAST, BLOCK_M)
    dk = dk * sm_scale
    tl.store(DK + off_b * stride_dkb + off_kvh * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=col_ok)
    tl.store(DV + off_b * stride_dvb + off_kvh * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=col_ok)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn,
              offs_m, offs_n, lo, hi, n_k, causal_shift, qk_scale, start,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_START: tl.constexpr, UPCAST: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [lo, hi)."""
    k_ptrs += lo * stride_kn
    v_ptrs += lo * stride_vn
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k, v = load_kv_tile(k_ptrs, v_ptrs, cols < n_k, MASKED, UPCAST)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if MASKED:
            visible = cols[None, :] < n_k
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + causal_shift)
            if HAS_START:
                visible = visible & (cols[None, :] >= start[:, None])
            s = tl.where(visible, s, float("-inf"))
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return dq


@autotune(lambda: _bwd_configs("BLOCK_M", "BLOCK_N"), key=["HEAD_DIM", "CAUSAL", "N_BUCKET"],
          prune=_prune_bwd)
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, KV_START, qk_scale, sm_scale,
                 stride_qb, stride_qh, stride_qn,
                 stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn,
                 stride_dob, stride_doh, stride_don,
                 stride_dqb, stride_dqh, stride_dqn,
                 H, GROUP, N_Q, N_K, N_BUCKET,
                 HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_START: tl.constexpr, UPCAST: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    off_kvh = off_h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N_Q
    q, do, lse, delta = load_dq_rows(Q, DO, LSE, DELTA, off_b, off_h, off_bh, offs_m, offs_d, row_ok,
                                     stride_qb, stride_qh, stride_qn, stride_dob, stride_doh, stride_don,
                                     N_Q, UPCAST)
    k_ptrs = K + off_b * stride_kb + off_kvh * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = V + off_b * stride_vb + off_kvh * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    causal_shift, full_hi, hi = causal_bounds(start_m, N_Q, N_K, CAUSAL, BLOCK_M, BLOCK_N)
    start = offs_m  # unused unless HAS_START
    mid = 0
    if HAS_START:
        start, lo, mid = start_bounds(KV_START + off_b * N_Q, offs_m, N_Q, N_K, full_hi, BLOCK_N)
        dq = _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n,
                       lo, mid, N_K, causal_shift, qk_scale, start, True, False, True, UPCAST, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n,
                   mid, full_hi, N_K, causal_shift, qk_scale, start, False, CAUSAL, False, UPCAST, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n,
                   full_hi, hi, N_K, causal_shift, qk_scale, start, True, CAUSAL, HAS_START, UPCAST, BLOCK_N)
    dq = dq * sm_scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])
