"""Triton kernels of srl's block-sparse attention (see ``sparse_attention.py``).

Same algorithm as the dense FlashAttention-2 kernels (``flash_attention.py``, ``_flash_bwd.py``)
and the same helpers (``load_kv_tile`` / ``load_kv_desc``, ``online_softmax_step``), but a
program walks only the tiles its tile lists name: first the full tiles (no mask), then the
partial ones, where :func:`visible` evaluates the pattern per element. The heaviest programs
start first: query tiles last-first (forward, dQ), key tiles first-first (dK/dV).
"""

from __future__ import annotations

import triton
import triton.language as tl

from srl.kernels._flash_common import (load_dq_rows, load_kv_desc, load_kv_tile, online_softmax_step,
                                       online_softmax_step_unmasked)


@triton.jit
def visible(rows, cols, heads, row_ok, col_ok, KIND: tl.constexpr, P0, P1, P2,
            LAYOUT, stride_lh, stride_lq):
    """(R, C) mask: key at absolute position cols (C,) visible to query rows (R,) of heads (R,).

    KIND 1 sink/window (P0 sink, P1 window); 2 S2 strided (P0 block, P1 local blocks, P2
    stride); 3 block layout (P0 block, LAYOUT uint8 (H or 1, NQB, NKB), stride_lh 0 if shared)."""
    ok = row_ok[:, None] & col_ok[None, :] & (cols[None, :] <= rows[:, None])
    if KIND == 1:
        ok = ok & ((cols[None, :] < P0) | (rows[:, None] - cols[None, :] < P1))
    elif KIND == 2:
        qb = rows // P0
        kb = cols // P0
        ok = ok & (((qb[:, None] - kb[None, :]) < P1) | ((kb[None, :] + heads[:, None]) % P2 == 0))
    else:
        qb = rows // P0
        kb = cols // P0
        ptrs = LAYOUT + heads[:, None].to(tl.int64) * stride_lh + qb[:, None] * stride_lq + kb[None, :]
        ok = ok & (tl.load(ptrs, mask=ok, other=0) != 0)
    return ok


@triton.jit
def load_key_tile(K, V, start_n, off_bkv, H_KV, N_K, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    """A dK/dV program's key tile [start_n, start_n + BLOCK_N) of (batch * kv head) ``off_bkv``:
    (off_b, off_kvh, cols, col_ok, offs_d, k, v), keys past N_K loaded as zeros."""
    off_b = (off_bkv // H_KV).to(tl.int64)
    off_kvh = (off_bkv % H_KV).to(tl.int64)
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = cols < N_K
    k, v = load_kv_tile(K + off_b * stride_kb + off_kvh * stride_kh + cols[:, None] * stride_kn + offs_d[None, :],
                        V + off_b * stride_vb + off_kvh * stride_vh + cols[:, None] * stride_vn + offs_d[None, :],
                        col_ok, True, UPCAST)
    return off_b, off_kvh, cols, col_ok, offs_d, k, v


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, start_n, k_base, v_base, kv_row, stride_kn, stride_vn,
              offs_n, rows, heads, row_ok, n_k, qk_scale, LAYOUT, stride_lh, stride_lq, P0, P1, P2,
              MASKED: tl.constexpr, KIND: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Fold the key tile at ``start_n`` into one query tile's online softmax."""
    cols = start_n + offs_n
    if TMA:
        k, v = load_kv_desc(k_base, v_base, kv_row, start_n, UPCAST, BLOCK_N, HEAD_DIM)
    else:
        k, v = load_kv_tile(k_base + start_n * stride_kn, v_base + start_n * stride_vn, cols < n_k,
                            MASKED, UPCAST)
    qk = tl.dot(q, tl.trans(k))  # (BLOCK_M, BLOCK_N); base-2 logits are qk * qk_scale
    if MASKED:
        ok = visible(rows, cols, heads, row_ok, cols < n_k, KIND, P0, P1, P2, LAYOUT, stride_lh, stride_lq)
        p, m_i, l_i, acc = online_softmax_step(tl.where(ok, qk * qk_scale, float("-inf")), m_i, l_i, acc)
    else:
        p, m_i, l_i, acc = online_softmax_step_unmasked(qk, qk_scale, m_i, l_i, acc)
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_i


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, kv_row, stride_kn, stride_vn, CNT_PTR, IDX_PTR, LEN_PTR,
               offs_m, offs_n, rows, heads, row_ok, n_k, qk_scale, LAYOUT, stride_lh, stride_lq, P0, P1, P2,
               MASKED: tl.constexpr, KIND: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr,
               RUNS: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Fold the key tiles listed at IDX_PTR (CNT_PTR of them) into one query tile's softmax; with
    RUNS the list holds CNT_PTR runs of consecutive tiles (first tile IDX_PTR, length LEN_PTR)."""
    cnt = tl.load(CNT_PTR)
    if RUNS:
        for r in range(0, cnt):
            lo = tl.load(IDX_PTR + r) * BLOCK_N
            hi = lo + tl.load(LEN_PTR + r) * BLOCK_N
            for start_n in range(lo, hi, BLOCK_N):
                acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, start_n, k_base, v_base, kv_row, stride_kn, stride_vn,
                                          offs_n, rows, heads, row_ok, n_k, qk_scale, LAYOUT, stride_lh,
                                          stride_lq, P0, P1, P2, MASKED, KIND, UPCAST, TMA, BLOCK_N, HEAD_DIM)
    else:
        for t in range(0, cnt):
            start_n = tl.load(IDX_PTR + t) * BLOCK_N
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, start_n, k_base, v_base, kv_row, stride_kn, stride_vn,
                                      offs_n, rows, heads, row_ok, n_k, qk_scale, LAYOUT, stride_lh,
                                      stride_lq, P0, P1, P2, MASKED, KIND, UPCAST, TMA, BLOCK_N, HEAD_DIM)
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["H"])  # one binary for every head count
def _sparse_fwd(Q, K, V, O, LSE, qk_scale,
                FULL_CNT, FULL_IDX, PART_CNT, PART_IDX, LAYOUT, RUN_LEN,
                stride_qb, stride_qh, stride_qn,
                stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn,
                stride_ob, stride_oh, stride_on,
                stride_fch, stride_fih, stride_fim, stride_pch, stride_pih, stride_pim,
                stride_lh, stride_lq,
                H, GROUP, N_Q, N_K, M_TILES, P0, P1, P2,
                KIND: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr,
                RUNS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Lists are (H or 1, M_TILES[, width]); a shared list has head stride 0. With RUNS the full
    list is of runs (FULL_CNT runs, first tiles FULL_IDX, lengths RUN_LEN, shaped like FULL_IDX).
    With TMA, K and V are descriptors over (B*H_kv, N_K, D) with (1, BLOCK_N, D) blocks."""
    pid_m = M_TILES - 1 - tl.program_id(0)
    start_m = pid_m * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    off_kvh = off_h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N_Q
    rows = offs_m + (N_K - N_Q)  # absolute positions
    heads = tl.zeros([BLOCK_M], dtype=tl.int32) + off_h.to(tl.int32)

    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    kv_row = (off_bh // H) * (H // GROUP) + (off_bh % H) // GROUP  # int32 row of (B*H_kv, N_K, D)
    if TMA:
        k_base = K
        v_base = V
    else:
        k_base = K + off_b * stride_kb + off_kvh * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]
        v_base = V + off_b * stride_vb + off_kvh * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, kv_row, stride_kn, stride_vn,
                               FULL_CNT + off_h * stride_fch + pid_m,
                               FULL_IDX + off_h * stride_fih + pid_m * stride_fim,
                               RUN_LEN + off_h * stride_fih + pid_m * stride_fim,
                               offs_m, offs_n, rows, heads, row_ok, N_K, qk_scale, LAYOUT, stride_lh, stride_lq,
                               P0, P1, P2, False, KIND, UPCAST, TMA, RUNS, BLOCK_N, HEAD_DIM)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, kv_row, stride_kn, stride_vn,
                               PART_CNT + off_h * stride_pch + pid_m,
                               PART_IDX + off_h * stride_pih + pid_m * stride_pim, PART_IDX,
                               offs_m, offs_n, rows, heads, row_ok, N_K, qk_scale, LAYOUT, stride_lh, stride_lq,
                               P0, P1, P2, True, KIND, UPCAST, TMA, False, BLOCK_N, HEAD_DIM)

    empty = l_i == 0.0  # rows that saw no key: output 0, L = +inf (so P = 0 in backward)
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("inf"), m_i + tl.log2(l_safe))
    acc = acc / l_safe[:, None]
    tl.store(LSE + off_bh.to(tl.int64) * N_Q + offs_m, lse, mask=row_ok)
    tl.store(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
             acc.to(O.dtype.element_ty), mask=row_ok[:, None])


# --------------------------------------------------------------------------
# Backward: dK/dV per key tile (over the query tiles of each head in its KV group), dQ per query tile
# --------------------------------------------------------------------------
@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_base, do_base, LSE_ROW, DELTA_ROW, stride_qn, stride_don, CNT_PTR, IDX_PTR,
                offs_m0, cols, heads, col_ok, n_q, shift, qk_scale, LAYOUT, stride_lh, stride_lq, P0, P1, P2,
                MASKED: tl.constexpr, KIND: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr):
    """Accumulate dK, dV of one key tile over the query tiles listed at IDX_PTR."""
    cnt = tl.load(CNT_PTR)
    for t in range(0, cnt):
        start_m = tl.load(IDX_PTR + t) * BLOCK_M
        offs_m = start_m + offs_m0
        q_ptrs = q_base + start_m * stride_qn
        do_ptrs = do_base + start_m * stride_don
        if MASKED:
            row_ok = offs_m < n_q
            q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
            lse = tl.load(LSE_ROW + offs_m, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA_ROW + offs_m, mask=row_ok, other=0.0)
        else:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
            lse = tl.load(LSE_ROW + offs_m)
            delta = tl.load(DELTA_ROW + offs_m)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        s_t = tl.dot(k, tl.trans(q)) * qk_scale  # (BLOCK_N, BLOCK_M): S^T in base 2
        if MASKED:
            ok = visible(offs_m + shift, cols, heads, offs_m < n_q, col_ok, KIND, P0, P1, P2,
                         LAYOUT, stride_lh, stride_lq)  # (BLOCK_M, BLOCK_N)
            s_t = tl.where(tl.trans(ok.to(tl.int8)) != 0, s_t, float("-inf"))
        p_t = tl.exp2(s_t - lse[None, :])
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk)
    return dk, dv


@triton.jit(do_not_specialize=["H", "H_KV"])  # one binary for every head count
def _sparse_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, qk_scale, sm_scale,
                     FULL_CNT, FULL_IDX, PART_CNT, PART_IDX, LAYOUT,
                     stride_qb, stride_qh, stride_qn,
                     stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn,
                     stride_dob, stride_doh, stride_don,
                     stride_dkb, stride_dkh, stride_dkn,
                     stride_dvb, stride_dvh, stride_dvn,
                     stride_fch, stride_fih, stride_fim, stride_pch, stride_pih, stride_pim,
                     stride_lh, stride_lq,
                     H, H_KV, GROUP, N_Q, N_K, N_TILES, P0, P1, P2,
                     KIND: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Lists are by key tile: (H or 1, N_TILES[, width]) of query tiles. Early key tiles see the
    most query tiles (causal, sinks, strides), so they are launched first."""
    pid_n = tl.program_id(0)
    start_n = pid_n * BLOCK_N
    off_bkv = tl.program_id(1)
    off_b, off_kvh, cols, col_ok, offs_d, k, v = load_key_tile(
        K, V, start_n, off_bkv, H_KV, N_K, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        BLOCK_N, HEAD_DIM, UPCAST)
    offs_m0 = tl.arange(0, BLOCK_M)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    shift = N_K - N_Q
    for g in range(0, GROUP):
        off_h = off_kvh * GROUP + g
        off_bh = off_b * H + off_h
        heads = tl.zeros([BLOCK_M], dtype=tl.int32) + off_h.to(tl.int32)
        q_base = Q + off_b * stride_qb + off_h * stride_qh + offs_m0[:, None] * stride_qn + offs_d[None, :]
        do_base = DO + off_b * stride_dob + off_h * stride_doh + offs_m0[:, None] * stride_don + offs_d[None, :]
        lse_row = LSE + off_bh * N_Q
        delta_row = DELTA + off_bh * N_Q
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_row, delta_row, stride_qn, stride_don,
                             FULL_CNT + off_h * stride_fch + pid_n, FULL_IDX + off_h * stride_fih + pid_n * stride_fim,
                             offs_m0, cols, heads, col_ok, N_Q, shift, qk_scale, LAYOUT, stride_lh, stride_lq,
                             P0, P1, P2, False, KIND, UPCAST, BLOCK_M)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_row, delta_row, stride_qn, stride_don,
                             PART_CNT + off_h * stride_pch + pid_n, PART_IDX + off_h * stride_pih + pid_n * stride_pim,
                             offs_m0, cols, heads, col_ok, N_Q, shift, qk_scale, LAYOUT, stride_lh, stride_lq,
                             P0, P1, P2, True, KIND, UPCAST, BLOCK_M)
    dk = dk * sm_scale
    tl.store(DK + off_b * stride_dkb + off_kvh * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + off_b * stride_dvb + off_kvh * stride_dvh + cols[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, CNT_PTR, IDX_PTR,
              offs_n, rows, heads, row_ok, n_k, qk_scale, LAYOUT, stride_lh, stride_lq, P0, P1, P2,
              MASKED: tl.constexpr, KIND: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr):
    """Accumulate dQ of one query tile over the key tiles listed at IDX_PTR."""
    cnt = tl.load(CNT_PTR)
    for t in range(0, cnt):
        start_n = tl.load(IDX_PTR + t) * BLOCK_N
        cols = start_n + offs_n
        k, v = load_kv_tile(k_base + start_n * stride_kn, v_base + start_n * stride_vn, cols < n_k, MASKED, UPCAST)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if MASKED:
            ok = visible(rows, cols, heads, row_ok, cols < n_k, KIND, P0, P1, P2, LAYOUT, stride_lh, stride_lq)
            s = tl.where(ok, s, float("-inf"))
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit(do_not_specialize=["H"])  # one binary for every head count
def _sparse_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, qk_scale, sm_scale,
                   FULL_CNT, FULL_IDX, PART_CNT, PART_IDX, LAYOUT,
                   stride_qb, stride_qh, stride_qn,
                   stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn,
                   stride_dob, stride_doh, stride_don,
                   stride_dqb, stride_dqh, stride_dqn,
                   stride_fch, stride_fih, stride_fim, stride_pch, stride_pih, stride_pim,
                   stride_lh, stride_lq,
                   H, GROUP, N_Q, N_K, M_TILES, P0, P1, P2,
                   KIND: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = M_TILES - 1 - tl.program_id(0)
    start_m = pid_m * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    off_kvh = off_h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N_Q
    rows = offs_m + (N_K - N_Q)
    heads = tl.zeros([BLOCK_M], dtype=tl.int32) + off_h.to(tl.int32)
    q, do, lse, delta = load_dq_rows(Q, DO, LSE, DELTA, off_b, off_h, off_bh, offs_m, offs_d, row_ok,
                                     stride_qb, stride_qh, stride_qn, stride_dob, stride_doh, stride_don,
                                     N_Q, UPCAST)
    k_base = K + off_b * stride_kb + off_kvh * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_base = V + off_b * stride_vb + off_kvh * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn,
                   FULL_CNT + off_h * stride_fch + pid_m, FULL_IDX + off_h * stride_fih + pid_m * stride_fim,
                   offs_n, rows, heads, row_ok, N_K, qk_scale, LAYOUT, stride_lh, stride_lq, P0, P1, P2,
                   False, KIND, UPCAST, BLOCK_N)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn,
                   PART_CNT + off_h * stride_pch + pid_m, PART_IDX + off_h * stride_pih + pid_m * stride_pim,
                   offs_n, rows, heads, row_ok, N_K, qk_scale, LAYOUT, stride_lh, stride_lq, P0, P1, P2,
                   True, KIND, UPCAST, BLOCK_N)
    dq = dq * sm_scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])
