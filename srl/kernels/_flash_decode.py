"""Decode attention: a few query rows against a long KV cache, split over KV (flash-decoding).

Used through ``srl.kernels.flash_attention.flash_decode`` (and by ``flash_attention``
for short queries that need no gradient). A program owns one (batch, KV head) pair,
all query rows of that KV head's group (GROUP heads x Nq positions packed into the
M dimension of one tile, so a KV tile is read once per group) and one contiguous
split of the keys. With more than one split each program writes a normalized
partial output and its base-2 logsumexp; a second kernel merges the splits:
``O = sum_s 2^(L_s - L) O_s`` with ``L = log2 sum_s 2^L_s``.

Per-row starts and a shared prefix (``kv_start``, ``kv_prefix``, as in ``flash_attention``) let
it run the speculative tree pass too (1 + k*L query rows over a short cache); ``flash_attention``
sends the tree pass here only with ``_DECODE_STARTS``, since its forward kernel measured faster
for it on the H200.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from srl.kernels._flash_common import (INTERPRET, autotune, check_index, check_kernel_inputs, empty_like_heads,
                                       host_cdiv, last_dim_contiguous, launch, load_kv_tile, needs_upcast,
                                       online_softmax_step)
from srl.kernels._reference import attention_reference

_LOG2E = 1.4426950408889634  # 1 / ln(2)
MAX_DECODE_QUERIES = 64  # query rows per call: decode, or 1 + k*L rows of a speculative tree
_INTERP_DECODE = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 1}
# H100 tiles by head dim (see flash_attention.py for how they were picked)
_DECODE_TILES = {16: {"BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
                 32: {"BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
                 64: {"BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
                 128: {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
                 256: {"BLOCK_N": 32, "num_warps": 4, "num_stages": 3}}


def _decode_configs():
    cfg = triton.Config
    return [
        cfg({"BLOCK_N": 64}, num_warps=4, num_stages=3),
        cfg({"BLOCK_N": 64}, num_warps=4, num_stages=4),
        cfg({"BLOCK_N": 128}, num_warps=4, num_stages=3),
        cfg({"BLOCK_N": 128}, num_warps=8, num_stages=3),
        cfg({"BLOCK_N": 32}, num_warps=4, num_stages=4),
    ]


@autotune(_decode_configs, key=["HEAD_DIM", "BLOCK_M", "SPLIT", "LEN_BUCKET", "CAUSAL"])
@triton.jit
def _decode_kernel(Q, K, V, O, O_PART, LSE_PART, KV_LENS, KV_START, KV_PREFIX, qk_scale,
                   stride_qb, stride_qh, stride_qn,
                   stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn,
                   stride_ob, stride_oh, stride_on,
                   H_KV, N_Q, N_K, GROUP, ROWS, M_PAD, NUM_SPLITS, SPLIT_LEN, LEN_BUCKET,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                   HAS_KV_LENS: tl.constexpr, SPLIT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   HAS_START: tl.constexpr = False, HAS_PREFIX: tl.constexpr = False):
    """Index tensors (KV_LENS (B,), KV_START (B, N_Q), KV_PREFIX (B,)) may be int32 or int64:
    they are cast after the load, so the caller never launches a conversion."""
    split = tl.program_id(0)
    off_bkv = tl.program_id(1)
    off_b = (off_bkv // H_KV).to(tl.int64)
    off_kvh = (off_bkv % H_KV).to(tl.int64)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)  # packed (head in group, position)
    row_ok = rows < ROWS
    pos = rows % N_Q
    off_h = off_kvh * GROUP + (rows // N_Q).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    q = tl.load(Q + off_b * stride_qb + off_h[:, None] * stride_qh + pos[:, None] * stride_qn + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    if HAS_KV_LENS:  # clamped to [0, N_K], so a bad length cannot read past the cache
        n_k = tl.minimum(tl.maximum(tl.load(KV_LENS + off_b).to(tl.int32), 0), N_K)
    else:
        n_k = N_K
    causal_shift = n_k - N_Q  # query pos sees key j iff j <= pos + causal_shift
    lo = split * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, n_k)
    start = pos  # unused unless HAS_START
    prefix = 0
    if HAS_START:  # key j is hidden from row pos when j < start[pos], unless j < prefix
        start = tl.load(KV_START + off_b * N_Q + pos, mask=row_ok, other=0).to(tl.int32)
        first = tl.min(tl.where(row_ok, start, n_k), 0)  # no row sees a key before this one
        if HAS_PREFIX:
            prefix = tl.load(KV_PREFIX + off_b).to(tl.int32)
            first = tl.where(prefix > 0, 0, first)
        lo = tl.maximum(lo, first)
    k_ptrs = K + off_b * stride_kb + off_kvh * stride_kh + (lo + offs_n)[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = V + off_b * stride_vb + off_kvh * stride_vh + (lo + offs_n)[:, None] * stride_vn + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < hi
        k, v = load_kv_tile(k_ptrs, v_ptrs, col_ok, True, UPCAST)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        visible = col_ok[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= pos[:, None] + causal_shift)
        if HAS_START:
            visible = visible & ((cols[None, :] >= start[:, None]) | (cols[None, :] < prefix))
        s = tl.where(visible, s, float("-inf"))
        p, m_i, l_i, acc = online_softmax_step(s, m_i, l_i, acc)
        acc = tl.dot(p.to(v.dtype), v, acc)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    if SPLIT:
        # partials: O_PART (B*H_KV, NUM_SPLITS, M_PAD, D) fp32, LSE_PART (B*H_KV, NUM_SPLITS, M_PAD)
        part = (off_bkv.to(tl.int64) * NUM_SPLITS + split) * M_PAD + rows
        tl.store(LSE_PART + part, tl.where(empty, float("-inf"), m_i + tl.log2(l_safe)), mask=row_ok)
        tl.store(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_ok[:, None])
    else:
        o_ptrs = O + off_b * stride_ob + off_h[:, None] * stride_oh + pos[:, None] * stride_on + offs_d[None, :]
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _decode_combine(O_PART, LSE_PART, O, stride_ob, stride_oh, stride_on,
                    H_KV, N_Q, GROUP, M_PAD, NUM_SPLITS,
                    HEAD_DIM: tl.constexpr, SPLITS_P2: tl.constexpr):
    row = tl.program_id(0)
    off_bkv = tl.program_id(1)
    off_b = (off_bkv // H_KV).to(tl.int64)
    off_h = (off_bkv % H_KV).to(tl.int64) * GROUP + row // N_Q
    pos = row % N_Q
    offs_s = tl.arange(0, SPLITS_P2)
    offs_d = tl.arange(0, HEAD_DIM)
    s_ok = offs_s < NUM_SPLITS
    part = (off_bkv.to(tl.int64) * NUM_SPLITS + offs_s) * M_PAD + row
    lse = tl.load(LSE_PART + part, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)  # (SPLITS_P2,), 0 for empty splits
    o = tl.load(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    den = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(den == 0.0, 1.0, den)
    tl.store(O + off_b * stride_ob + off_h * stride_oh + pos * stride_on + offs_d, out.to(O.dtype.element_ty))


@functools.lru_cache(maxsize=None)
def _sm_count(device):
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


_WAVES = 4  # programs per SM the split count aims for


def _num_splits(programs, n_k, device):
    """Enough splits to give the GPU about _WAVES programs per SM, each >= 256 keys."""
    sms = _sm_count(device)
    want = host_cdiv(_WAVES * sms, programs)
    return max(1, min(want, host_cdiv(n_k, 256), 256))


def flash_decode(q, k, v, causal=True, sm_scale=None, kv_lens=None, num_splits=None, kv_start=None,
                 kv_prefix=None):
    """Attention of a few new query rows against a KV cache (flash-decoding).

    Args:
        q: (B, H, Nq, D) with Nq in 1..MAX_DECODE_QUERIES (decode, or speculative verification).
        k, v: (B, H_kv, Nk, D) cache views (any strides with a contiguous last
            dim); H must be a multiple of H_kv.
        causal: query i sees key j iff j <= i + Nk - Nq (bottom-right); with one
            query row this is plain attention over the whole cache.
        sm_scale: softmax scale, default 1/sqrt(D).
        kv_lens: optional (B,) integer tensor, valid cache length per batch
            element; keys past it are ignored (values are clamped to [0, Nk]).
        num_splits: KV splits; default picks enough to fill the GPU.
        kv_start: optional (B, Nq) integer tensor: query i of batch b sees no key before
            ``kv_start[b, i]`` (as in ``flash_attention``).
        kv_prefix: optional (B,) integer tensor, with ``kv_start``: keys before it stay visible
            to every query (k draft blocks verified over a shared prefix).

    Returns:
        (B, H, Nq, D) tensor of q's dtype; rows that see no key are zero.
    """
    check_kernel_inputs(q, k, v)
    B, H, Nq, D = q.shape
    if Nq > MAX_DECODE_QUERIES:
        raise ValueError(f"flash_decode takes at most {MAX_DECODE_QUERIES} query rows, got q shape {tuple(q.shape)}")
    kv_lens, kv_start, kv_prefix = (None if t is None else check_index(name, t, shape, q) for name, t, shape in
                                    (("kv_lens", kv_lens, (B,)), ("kv_start", kv_start, (B, Nq)),
                                     ("kv_prefix", kv_prefix, (B,))))
    if kv_prefix is not None and kv_start is None:
        raise ValueError("kv_prefix only applies with kv_start (it exempts a prefix from the starts)")
    scale = float(D ** -0.5 if sm_scale is None else sm_scale)
    if not (q.is_cuda or INTERPRET):
        return attention_reference(q, k, v, causal=causal, sm_scale=scale, kv_lens=kv_lens, kv_start=kv_start,
                                   kv_prefix=kv_prefix)
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    return _decode_launch(q, k, v, bool(causal), scale, kv_lens, kv_start, kv_prefix, num_splits)


def _decode_launch(q, k, v, causal, scale, kv_lens, kv_start, kv_prefix, num_splits):
    """Checked inputs -> output: the split kernel, then the merge of the splits (when more than one)."""
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    group = H // Hkv
    rows = group * Nq
    block_m = 16 if rows <= 16 else (32 if rows <= 32 else 64)
    m_blocks = host_cdiv(rows, block_m)
    m_pad = m_blocks * block_m
    splits = num_splits or _num_splits(B * Hkv * m_blocks, Nk, q.device)
    split_len = host_cdiv(Nk, splits)
    splits = host_cdiv(Nk, split_len)
    use_split = splits > 1

    o = empty_like_heads(q)
    if use_split:
        o_part = torch.empty((B * Hkv, splits, m_pad, D), device=q.device, dtype=torch.float32)
        lse_part = torch.empty((B * Hkv, splits, m_pad), device=q.device, dtype=torch.float32)
    else:
        o_part = lse_part = o  # unused
    index = [o if t is None else t for t in (kv_lens, kv_start, kv_prefix)]  # o: unused placeholder
    args = (q, k, v, o, o_part, lse_part, *index, scale * _LOG2E,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
            Hkv, Nq, Nk, group, rows, m_pad, splits, split_len, 1 << max(split_len - 1, 0).bit_length())
    meta = dict(HEAD_DIM=D, CAUSAL=causal, UPCAST=needs_upcast(q), HAS_KV_LENS=kv_lens is not None,
                SPLIT=use_split, BLOCK_M=block_m, HAS_START=kv_start is not None, HAS_PREFIX=kv_prefix is not None)
    tiles = _INTERP_DECODE if INTERPRET else _DECODE_TILES[D]
    launch(_decode_kernel, lambda c: (splits, B * Hkv, m_blocks), args, meta, tiles)
    if use_split:
        _decode_combine[(rows, B * Hkv)](
            o_part, lse_part, o, o.stride(0), o.stride(1), o.stride(2), Hkv, Nq, group, m_pad, splits,
            HEAD_DIM=D, SPLITS_P2=max(1 << (splits - 1).bit_length(), 2))
    return o
