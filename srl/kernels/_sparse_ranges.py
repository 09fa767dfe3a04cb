"""Triton kernels of srl's sparse attention for SinkWindow and S2Strided without tile lists.

Both patterns visit contiguous key ranges that a program can compute from its own position,
so these kernels walk them as plain ``tl.range`` loops (software-pipelined like the dense
kernel's) instead of reading per-tile index lists:

* a prefix: the sink (SinkWindow, keys [0, min(sink, window start)), PRE_N-wide tiles) or the
  head's strided blocks before the local band (S2Strided, one ``block``-wide tile every
  ``stride`` blocks; always unmasked);
* the band (window or local blocks): masked tiles at its lower edge, unmasked tiles, masked
  tiles on the diagonal. A SinkWindow band starts at the tile's first row's window start, not at
  a tile boundary, so it spans window + BLOCK_M - 1 keys.

A program runs two loops, one over the unmasked tiles and one over the masked ones, each
walking up to three of these segments through a virtual tile index (every extra pipelined loop
costs a pipeline fill and its own shared-memory buffers). Masked tiles evaluate the pattern per
element (``visible``) and are clipped to their segment's end, so segments never count a key
twice. dK/dV programs walk query rows the same way: the band of rows whose window (local
blocks) holds the key tile, then the rows after it that still see the tile (the sink, or a
strided block of this head). K/V tiles (forward, dQ) and q/dO rows (dK/dV) may come through TMA
descriptors, encoded on the host or built by each program (DESC_DEV).
"""

from __future__ import annotations

import triton
import triton.language as tl

from srl.kernels._flash_common import (load_dq_rows, load_kv_desc, load_kv_tile, online_softmax_step,
                                       online_softmax_step_unmasked)
from srl.kernels._sparse_kernels import load_key_tile, visible


@triton.jit
def q_ranges(r0, r1, head, P0, P1, P2, KIND: tl.constexpr, BLOCK_N: tl.constexpr, PRE_N: tl.constexpr):
    """Key ranges of the query rows [r0, r1] (absolute positions, r1 < N_K) of one head.

    Returns (pre_lo, pre_hi, pre_step, pre_full, band_lo, full_lo, full_hi, end): prefix tiles at
    pre_lo + i * pre_step below pre_hi (unmasked iff pre_full); band keys [band_lo, end), of which
    [full_lo, full_hi) are visible to every row."""
    end = r1 + 1
    if KIND == 1:  # sink (P0), window (P1)
        band_lo = tl.maximum(r0 - P1 + 1, 0)
        pre_lo = band_lo * 0
        pre_hi = tl.minimum(band_lo, P0)
        pre_step = PRE_N
        pre_full = (pre_hi == P0) & (P0 % PRE_N == 0) & (P0 <= r0 + 1)
        full_lo = band_lo + tl.cdiv(tl.maximum(r1 - P1 + 1 - band_lo, 0), BLOCK_N) * BLOCK_N
    else:  # S2: block (P0), local blocks (P1), stride (P2); PRE_N == P0
        band_lo = tl.maximum(r0 // P0 - P1 + 1, 0) * P0
        pre_lo = ((P2 - head % P2) % P2) * P0
        pre_hi = band_lo
        pre_step = P2 * P0
        pre_full = band_lo >= 0
        full_lo = tl.maximum(r1 // P0 - P1 + 1, 0) * P0
    full_lo = tl.minimum(full_lo, end)
    full_hi = full_lo + tl.maximum(r0 + 1 - full_lo, 0) // BLOCK_N * BLOCK_N
    return pre_lo, pre_hi, pre_step, pre_full, band_lo, full_lo, full_hi, end


@triton.jit
def k_ranges(c0, c1, head, shift, n_k, P0, P1, P2, KIND: tl.constexpr, BLOCK_M: tl.constexpr):
    """Query-row ranges (absolute) that see the key tile [c0, c1] of one head.

    Returns (band_lo, full_lo, full_hi, band_end, post_on, post_full): band rows [band_lo,
    band_end), of which [full_lo, full_hi) see every key of the tile; rows [band_end, N_K) see
    it too iff post_on (unmasked iff post_full). For S2 the tile is one block (BLOCK_N == P0)."""
    band_lo = tl.maximum(c0, shift)
    if KIND == 1:
        full_end = c0 + P1  # rows below see every key of the tile through the window
        band_end = tl.minimum(c1 + P1, n_k)
        post_on = c0 < P0
        post_full = c1 < P0
    else:
        full_end = (c0 // P0 + P1) * P0
        band_end = tl.minimum(full_end, n_k)
        post_on = (c0 // P0 + head) % P2 == 0
        post_full = post_on
    band_end = tl.maximum(band_end, band_lo)
    full_lo = band_lo + tl.cdiv(tl.maximum(c1 - band_lo, 0), BLOCK_M) * BLOCK_M  # rows >= c1: causal
    full_lo = tl.minimum(full_lo, band_end)
    full_hi = full_lo + tl.maximum(tl.minimum(full_end, n_k) - full_lo, 0) // BLOCK_M * BLOCK_M
    return band_lo, full_lo, full_hi, band_end, post_on, post_full


@triton.jit
def _tile_and_head(HEADS_FAST: tl.constexpr):
    """(tile, head) program ids. With HEADS_FAST the grid is (heads, tiles), so the first
    programs are the first tile of every head (all the heaviest programs launch first), else
    (tiles, heads): a head's tiles run together (their keys share the L2)."""
    if HEADS_FAST:
        return tl.program_id(1), tl.program_id(0)
    return tl.program_id(0), tl.program_id(1)


@triton.jit
def _kv(K, V, kd, vd, kv_row, start_n, n_k, stride_kn, stride_vn, MASKED: tl.constexpr, UPCAST: tl.constexpr,
        DESC: tl.constexpr, TILE_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """K, V tiles at keys [start_n, start_n + TILE_N): descriptors (zeros past N_K) or pointers."""
    if DESC:
        k, v = load_kv_desc(kd, vd, kv_row, start_n, UPCAST, TILE_N, HEAD_DIM)
    else:
        cols = start_n + tl.arange(0, TILE_N)
        offs_d = tl.arange(0, HEAD_DIM)
        k, v = load_kv_tile(K + cols[:, None] * stride_kn + offs_d[None, :],
                            V + cols[:, None] * stride_vn + offs_d[None, :], cols < n_k, MASKED, UPCAST)
    return k, v


@triton.jit
def rows_desc(base, rows, n, stride_r, stride_n, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A TMA descriptor over (rows, n, HEAD_DIM) with (1, BLOCK, HEAD_DIM) blocks, built by the
    program itself (no host-side encoding at launch; needs ``triton.set_allocator``)."""
    return tl.make_tensor_descriptor(base, shape=[rows, n, HEAD_DIM], strides=[stride_r, stride_n, 1],
                                     block_shape=[1, BLOCK, HEAD_DIM])


@triton.jit
def _n_heads(HEADS_FAST: tl.constexpr):
    """Programs along the grid's (batch, head) axis."""
    if HEADS_FAST:
        return tl.num_programs(0)
    return tl.num_programs(1)


@triton.jit
def _seg(t, n0, n1, a0, a1, a2):
    """Segment value of virtual tile t: a0 for t < n0, a1 for the next n1 tiles, then a2."""
    return tl.where(t < n0, a0, tl.where(t < n0 + n1, a1, a2))


@triton.jit
def _start(t, n0, n1, lo0, s0, lo1, s1, lo2, s2):
    """First key (row) of virtual tile t over three segments of n0, n1 and the rest tiles."""
    return _seg(t, n0, n1, lo0 + t * s0, lo1 + (t - n0) * s1, lo2 + (t - n0 - n1) * s2)


@triton.jit
def _fwd_loop(acc, l_i, m_i, q, n, n0, n1, lo0, s0, lo1, s1, lo2, s2, hi0, hi1, hi2,
              K, V, kd, vd, kv_row, stride_kn, stride_vn, rows, heads, row_ok, n_k, qk_scale, P0, P1, P2,
              MASKED: tl.constexpr, KIND: tl.constexpr, UPCAST: tl.constexpr, DESC: tl.constexpr,
              TILE_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Fold n key tiles (three segments: first keys lo*, steps s*, ends hi*) into one query
    tile's online softmax."""
    for t in tl.range(0, n):
        start_n = _start(t, n0, n1, lo0, s0, lo1, s1, lo2, s2)
        k, v = _kv(K, V, kd, vd, kv_row, start_n, n_k, stride_kn, stride_vn, MASKED, UPCAST, DESC, TILE_N,
                   HEAD_DIM)
        qk = tl.dot(q, tl.trans(k))
        if MASKED:
            cols = start_n + tl.arange(0, TILE_N)
            col_ok = (cols < n_k) & (cols < _seg(t, n0, n1, hi0, hi1, hi2))
            ok = visible(rows, cols, heads, row_ok, col_ok, KIND, P0, P1, P2, K, 0, 0)
            p, m_i, l_i, acc = online_softmax_step(tl.where(ok, qk * qk_scale, float("-inf")), m_i, l_i, acc)
        else:
            p, m_i, l_i, acc = online_softmax_step_unmasked(qk, qk_scale, m_i, l_i, acc)
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_i


@triton.jit
def _tile_counts(pre_lo, pre_hi, pre_step, pre_full, band_lo, full_lo, full_hi, end, BLOCK_N: tl.constexpr,
                 MERGE_PRE: tl.constexpr):
    """Tiles of each segment: (prefix in the unmasked loop, prefix in the masked loop, lower edge,
    full band, diagonal). Without MERGE_PRE the prefix has a loop of its own (both counts 0)."""
    n_pre = tl.cdiv(tl.maximum(pre_hi - pre_lo, 0), pre_step)
    n_pf = tl.where(pre_full, n_pre, 0)
    if not MERGE_PRE:
        n_pf = 0
        n_pre = 0
    n_low = tl.cdiv(tl.maximum(full_lo - band_lo, 0), BLOCK_N)
    n_up = tl.cdiv(tl.maximum(end - full_hi, 0), BLOCK_N)
    return n_pf, n_pre - n_pf, n_low, (full_hi - full_lo) // BLOCK_N, n_up


@triton.jit
def _q_tile(H, N_Q, N_K, M_TILES, BLOCK_M: tl.constexpr, HEADS_FAST: tl.constexpr):
    """Where a query-tile program (forward, dQ) works, the heaviest (last) query tiles first:
    (off_bh, off_b, off_h, start_m, offs_m, row_ok, rows, heads); rows are key positions (query i
    sits at N_K - N_Q + i), heads the head of every row (for the pattern's mask)."""
    pid_t, off_bh = _tile_and_head(HEADS_FAST)
    start_m = (M_TILES - 1 - pid_t) * BLOCK_M
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    heads = tl.zeros([BLOCK_M], dtype=tl.int32) + off_h.to(tl.int32)
    return off_bh, off_b, off_h, start_m, offs_m, offs_m < N_Q, offs_m + (N_K - N_Q), heads


@triton.jit
def _kv_head(K, V, KD, VD, off_bh, H, GROUP, N_K, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
             HEADS_FAST: tl.constexpr, DESC_DEV: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """K and V of query head ``off_bh`` (batch * H + head): base pointers, descriptor row and the
    descriptors (KD, VD as passed, or built here by the program with DESC_DEV)."""
    off_b = (off_bh // H).to(tl.int64)
    off_kvh = ((off_bh % H) // GROUP).to(tl.int64)
    k_head = K + off_b * stride_kb + off_kvh * stride_kh
    v_head = V + off_b * stride_vb + off_kvh * stride_vh
    kv_row = (off_bh // H) * (H // GROUP) + (off_bh % H) // GROUP
    kd = KD
    vd = VD
    if DESC_DEV:
        kv_rows = _n_heads(HEADS_FAST) // GROUP  # B * H_kv
        kd = rows_desc(K, kv_rows, N_K, stride_kh, stride_kn, BLOCK_N, HEAD_DIM)
        vd = rows_desc(V, kv_rows, N_K, stride_vh, stride_vn, BLOCK_N, HEAD_DIM)
    return k_head, v_head, kd, vd, kv_row


@triton.jit
def _q_segments(start_m, head, N_Q, N_K, P0, P1, P2, KIND: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, PRE_N: tl.constexpr):
    """Key segments of the query tile at ``start_m`` of one head (``q_ranges``) and their tile
    counts (``_tile_counts``): (pre_lo, pre_hi, pre_step, band_lo, full_lo, full_hi, end, n_pf,
    n_pm, n_low, n_full, n_up)."""
    shift = N_K - N_Q
    r0 = start_m + shift
    r1 = tl.minimum(start_m + BLOCK_M, N_Q) - 1 + shift
    pre_lo, pre_hi, pre_step, pre_full, band_lo, full_lo, full_hi, end = q_ranges(
        r0, r1, head, P0, P1, P2, KIND, BLOCK_N, PRE_N)
    MERGE: tl.constexpr = PRE_N == BLOCK_N
    n_pf, n_pm, n_low, n_full, n_up = _tile_counts(pre_lo, pre_hi, pre_step, pre_full, band_lo, full_lo, full_hi,
                                                   end, BLOCK_N, MERGE)
    return pre_lo, pre_hi, pre_step, band_lo, full_lo, full_hi, end, n_pf, n_pm, n_low, n_full, n_up


@triton.jit(do_not_specialize=["H"])  # one binary for every head count
def _range_fwd(Q, K, V, KD, VD, O, LSE, qk_scale,
               stride_qb, stride_qh, stride_qn,
               stride_kb, stride_kh, stride_kn,
               stride_vb, stride_vh, stride_vn,
               stride_ob, stride_oh, stride_on,
               H, GROUP, N_Q, N_K, M_TILES, P0, P1, P2,
               KIND: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr,
               PRE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRE_N: tl.constexpr,
               HEADS_FAST: tl.constexpr = False, DESC_DEV: tl.constexpr = False):
    """Forward over the prefix and band ranges. KD, VD: TMA descriptors over (B*H_kv, N_K, D)
    with (1, BLOCK_N, D) blocks when TMA (used by a PRE_N-wide prefix too when PRE_TMA), else
    K, V; with DESC_DEV the program builds them from K, V (whose B and H_kv strides then merge).
    A prefix of BLOCK_N-wide tiles joins the two loops; a narrower one has its own."""
    off_bh, off_b, off_h, start_m, offs_m, row_ok, rows, heads = _q_tile(H, N_Q, N_K, M_TILES, BLOCK_M, HEADS_FAST)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_head, v_head, kd, vd, kv_row = _kv_head(K, V, KD, VD, off_bh, H, GROUP, N_K, stride_kb, stride_kh, stride_kn,
                                              stride_vb, stride_vh, stride_vn, HEADS_FAST, DESC_DEV, BLOCK_N, HEAD_DIM)
    pre_lo, pre_hi, pre_step, band_lo, full_lo, full_hi, end, n_pf, n_pm, n_low, n_full, n_up = _q_segments(
        start_m, off_h.to(tl.int32), N_Q, N_K, P0, P1, P2, KIND, BLOCK_M, BLOCK_N, PRE_N)
    MERGE: tl.constexpr = PRE_N == BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    args = (k_head, v_head, kd, vd, kv_row, stride_kn, stride_vn, rows, heads, row_ok, N_K, qk_scale, P0, P1, P2)
    if not MERGE:  # the prefix in PRE_N-wide tiles of its own
        n_pre = tl.cdiv(tl.maximum(pre_hi - pre_lo, 0), pre_step)
        acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, n_pre, n_pre, 0, pre_lo, pre_step, 0, 0, 0, 0,
                                  pre_hi, pre_hi, pre_hi, *args, KIND == 1, KIND, UPCAST, PRE_TMA, PRE_N, HEAD_DIM)
    acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, n_pf + n_full, n_pf, n_full, pre_lo, pre_step, full_lo, BLOCK_N,
                              0, 0, 0, 0, 0, *args, False, KIND, UPCAST, TMA, BLOCK_N, HEAD_DIM)
    acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, n_pm + n_low + n_up, n_pm, n_low, pre_lo, pre_step, band_lo,
                              BLOCK_N, full_hi, BLOCK_N, pre_hi, full_lo, end, *args, True, KIND, UPCAST, TMA,
                              BLOCK_N, HEAD_DIM)

    empty = l_i == 0.0  # rows that saw no key: output 0, L = +inf (so P = 0 in backward)
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("inf"), m_i + tl.log2(l_safe))
    tl.store(LSE + off_bh.to(tl.int64) * N_Q + offs_m, lse, mask=row_ok)
    tl.store(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
             (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None])


# --------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------
@triton.jit
def _dq_loop(dq, q, do, lse, delta, n, n0, n1, lo0, s0, lo1, s1, lo2, s2, hi0, hi1, hi2,
             K, V, kd, vd, kv_row, stride_kn, stride_vn, rows, heads, row_ok, n_k, qk_scale, P0, P1, P2,
             MASKED: tl.constexpr, KIND: tl.constexpr, UPCAST: tl.constexpr, DESC: tl.constexpr,
             TILE_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Accumulate dQ of one query tile over n key tiles in three segments (as ``_fwd_loop``)."""
    for t in tl.range(0, n):
        start_n = _start(t, n0, n1, lo0, s0, lo1, s1, lo2, s2)
        k, v = _kv(K, V, kd, vd, kv_row, start_n, n_k, stride_kn, stride_vn, MASKED, UPCAST, DESC, TILE_N,
                   HEAD_DIM)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if MASKED:
            cols = start_n + tl.arange(0, TILE_N)
            col_ok = (cols < n_k) & (cols < _seg(t, n0, n1, hi0, hi1, hi2))
            s = tl.where(visible(rows, cols, heads, row_ok, col_ok, KIND, P0, P1, P2, K, 0, 0), s, float("-inf"))
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit(do_not_specialize=["H"])  # one binary for every head count
def _range_bwd_dq(Q, K, V, KD, VD, DO, DQ, LSE, DELTA, O, qk_scale, sm_scale,
                  stride_qb, stride_qh, stride_qn,
                  stride_kb, stride_kh, stride_kn,
                  stride_vb, stride_vh, stride_vn,
                  stride_dob, stride_doh, stride_don,
                  stride_dqb, stride_dqh, stride_dqn,
                  stride_ob, stride_oh, stride_on,
                  H, GROUP, N_Q, N_K, M_TILES, P0, P1, P2,
                  KIND: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRE_N: tl.constexpr,
                  HEADS_FAST: tl.constexpr = False, FUSE_DELTA: tl.constexpr = False, TMA: tl.constexpr = False,
                  DESC_DEV: tl.constexpr = False):
    """dQ of one query tile. With FUSE_DELTA it also computes D = rowsum(dO * O) of its rows and
    stores it in DELTA (the dK/dV kernel, launched after, reads it): no separate pass over O.
    With TMA, K and V tiles of BLOCK_N keys come through descriptors KD, VD as in the forward
    (built by the program with DESC_DEV)."""
    off_bh, off_b, off_h, start_m, offs_m, row_ok, rows, heads = _q_tile(H, N_Q, N_K, M_TILES, BLOCK_M, HEADS_FAST)
    offs_d = tl.arange(0, HEAD_DIM)
    q, do, lse, delta = load_dq_rows(Q, DO, LSE, DELTA, off_b, off_h, off_bh, offs_m, offs_d, row_ok,
                                     stride_qb, stride_qh, stride_qn, stride_dob, stride_doh, stride_don,
                                     N_Q, UPCAST)
    if FUSE_DELTA:  # the DELTA rows loaded above are not written yet: compute them here
        o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + off_bh.to(tl.int64) * N_Q + offs_m, delta, mask=row_ok)
    k_head, v_head, kd, vd, kv_row = _kv_head(K, V, KD, VD, off_bh, H, GROUP, N_K, stride_kb, stride_kh, stride_kn,
                                              stride_vb, stride_vh, stride_vn, HEADS_FAST, DESC_DEV, BLOCK_N, HEAD_DIM)
    pre_lo, pre_hi, pre_step, band_lo, full_lo, full_hi, end, n_pf, n_pm, n_low, n_full, n_up = _q_segments(
        start_m, off_h.to(tl.int32), N_Q, N_K, P0, P1, P2, KIND, BLOCK_M, BLOCK_N, PRE_N)
    MERGE: tl.constexpr = PRE_N == BLOCK_N
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    args = (k_head, v_head, kd, vd, kv_row, stride_kn, stride_vn, rows, heads, row_ok, N_K, qk_scale, P0, P1, P2)
    if not MERGE:  # the prefix in PRE_N-wide tiles, pointer loads
        n_pre = tl.cdiv(tl.maximum(pre_hi - pre_lo, 0), pre_step)
        dq = _dq_loop(dq, q, do, lse, delta, n_pre, n_pre, 0, pre_lo, pre_step, 0, 0, 0, 0, pre_hi, pre_hi, pre_hi,
                      *args, KIND == 1, KIND, UPCAST, False, PRE_N, HEAD_DIM)
    dq = _dq_loop(dq, q, do, lse, delta, n_pf + n_full, n_pf, n_full, pre_lo, pre_step, full_lo, BLOCK_N, 0, 0,
                  0, 0, 0, *args, False, KIND, UPCAST, TMA, BLOCK_N, HEAD_DIM)
    dq = _dq_loop(dq, q, do, lse, delta, n_pm + n_low + n_up, n_pm, n_low, pre_lo, pre_step, band_lo, BLOCK_N,
                  full_hi, BLOCK_N, pre_hi, full_lo, end, *args, True, KIND, UPCAST, TMA, BLOCK_N, HEAD_DIM)
    dq = dq * sm_scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _q_do(Q, DO, qd, dod, q_row, start_m, offs_m, row_ok, stride_qn, stride_don, MASKED: tl.constexpr,
          DESC: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """q and dO rows [start_m, start_m + BLOCK_M) of one head: through descriptors (rows past N_Q
    arrive as zeros; the caller's mask hides the other rows outside its segment) or pointers."""
    if DESC:
        q = qd.load([q_row, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
        do = dod.load([q_row, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
    else:
        offs_d = tl.arange(0, HEAD_DIM)
        q, do = load_kv_tile(Q + offs_m[:, None] * stride_qn + offs_d[None, :],
                             DO + offs_m[:, None] * stride_don + offs_d[None, :], row_ok, MASKED, False)
    return q, do


@triton.jit
def _dkdv_loop(dk, dv, k, v, n, n0, n1, lo0, lo1, lo2, hi0, hi1, hi2, Q, DO, qd, dod, q_row, LSE_ROW, DELTA_ROW,
               stride_qn, stride_don, cols, heads, col_ok, n_q, shift, qk_scale, P0, P1, P2, MASKED: tl.constexpr,
               KIND: tl.constexpr, UPCAST: tl.constexpr, DESC: tl.constexpr, BLOCK_M: tl.constexpr,
               HEAD_DIM: tl.constexpr):
    """Accumulate dK, dV of one key tile over n query tiles of BLOCK_M rows in three segments
    (first absolute rows lo*, ends hi*)."""
    for t in tl.range(0, n):
        start = _start(t, n0, n1, lo0, BLOCK_M, lo1, BLOCK_M, lo2, BLOCK_M)
        offs_m = start - shift + tl.arange(0, BLOCK_M)  # query indices
        if MASKED:
            row_ok = (offs_m < n_q) & (offs_m + shift < _seg(t, n0, n1, hi0, hi1, hi2))
            lse = tl.load(LSE_ROW + offs_m, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA_ROW + offs_m, mask=row_ok, other=0.0)
        else:
            row_ok = offs_m < n_q
            lse = tl.load(LSE_ROW + offs_m)
            delta = tl.load(DELTA_ROW + offs_m)
        q, do = _q_do(Q, DO, qd, dod, q_row, start - shift, offs_m, row_ok, stride_qn, stride_don, MASKED, DESC,
                      BLOCK_M, HEAD_DIM)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        s_t = tl.dot(k, tl.trans(q)) * qk_scale  # (BLOCK_N, BLOCK_M): S^T in base 2
        if MASKED:
            ok = visible(offs_m + shift, cols, heads, row_ok, col_ok, KIND, P0, P1, P2, LSE_ROW, 0, 0)
            s_t = tl.where(tl.trans(ok.to(tl.int8)) != 0, s_t, float("-inf"))
        p_t = tl.exp2(s_t - lse[None, :])
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk)
    return dk, dv


@triton.jit(do_not_specialize=["H", "H_KV"])  # one binary for every head count
def _range_bwd_dkdv(Q, K, V, DO, QD, DOD, DK, DV, LSE, DELTA, qk_scale, sm_scale,
                    stride_qb, stride_qh, stride_qn,
                    stride_kb, stride_kh, stride_kn,
                    stride_vb, stride_vh, stride_vn,
                    stride_dob, stride_doh, stride_don,
                    stride_dkb, stride_dkh, stride_dkn,
                    stride_dvb, stride_dvh, stride_dvn,
                    H, H_KV, GROUP, N_Q, N_K, P0, P1, P2,
                    KIND: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEADS_FAST: tl.constexpr = False,
                    TMA: tl.constexpr = False, DESC_DEV: tl.constexpr = False):
    """One key tile (first tiles first: the sink and early strided blocks see the most rows).
    Unmasked loop: full band rows, then the rows after the band if they see the whole tile;
    masked loop: the band's lower and upper edges, then the rows after it otherwise. With TMA,
    q and dO rows come through descriptors QD, DOD over (B*H, N_Q, D) with (1, BLOCK_M, D)
    blocks (built by the program with DESC_DEV)."""
    pid_t, off_bkv = _tile_and_head(HEADS_FAST)
    start_n = pid_t * BLOCK_N
    off_b, off_kvh, cols, col_ok, offs_d, k, v = load_key_tile(
        K, V, start_n, off_bkv, H_KV, N_K, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        BLOCK_N, HEAD_DIM, UPCAST)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    shift = N_K - N_Q
    c1 = tl.minimum(start_n + BLOCK_N, N_K) - 1
    qd = QD
    dod = DOD
    if DESC_DEV:
        q_rows = _n_heads(HEADS_FAST) * GROUP  # B * H
        qd = rows_desc(Q, q_rows, N_Q, stride_qh, stride_qn, BLOCK_M, HEAD_DIM)
        dod = rows_desc(DO, q_rows, N_Q, stride_doh, stride_don, BLOCK_M, HEAD_DIM)
    for g in range(0, GROUP):
        off_h = off_kvh * GROUP + g
        off_bh = off_b * H + off_h
        heads = tl.zeros([BLOCK_M], dtype=tl.int32) + off_h.to(tl.int32)
        band_lo, full_lo, full_hi, band_end, post_on, post_full = k_ranges(
            start_n, c1, off_h.to(tl.int32), shift, N_K, P0, P1, P2, KIND, BLOCK_M)
        n_full = (full_hi - full_lo) // BLOCK_M
        n_post = tl.where(post_on, tl.cdiv(N_K - band_end, BLOCK_M), 0)
        n_post_full = tl.where(post_full, (N_K - band_end) // BLOCK_M, 0)
        post_mid = band_end + n_post_full * BLOCK_M
        n_low = tl.cdiv(full_lo - band_lo, BLOCK_M)
        n_up = tl.cdiv(band_end - full_hi, BLOCK_M)
        args = (Q + off_b * stride_qb + off_h * stride_qh, DO + off_b * stride_dob + off_h * stride_doh,
                qd, dod, off_bh.to(tl.int32), LSE + off_bh * N_Q, DELTA + off_bh * N_Q, stride_qn, stride_don, cols,
                heads, col_ok, N_Q, shift, qk_scale, P0, P1, P2)
        dk, dv = _dkdv_loop(dk, dv, k, v, n_full + n_post_full, n_full, n_post_full, full_lo, band_end, 0,
                            0, 0, 0, *args, False, KIND, UPCAST, TMA, BLOCK_M, HEAD_DIM)
        dk, dv = _dkdv_loop(dk, dv, k, v, n_low + n_up + n_post - n_post_full, n_low, n_up, band_lo, full_hi,
                            post_mid, full_lo, band_end, N_K, *args, True, KIND, UPCAST, TMA, BLOCK_M, HEAD_DIM)
    dk = dk * sm_scale
    tl.store(DK + off_b * stride_dkb + off_kvh * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + off_b * stride_dvb + off_kvh * stride_dvh + cols[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=col_ok[:, None])
