"""Decode attention: a few query rows against a long KV cache, split over KV (flash-decoding).

Used through ``srl.kernels.flash_attention.flash_decode`` (and by ``flash_attention``
for short queries that need no gradient). A program owns one (batch, KV head) pair,
one block of query rows of that KV head's group (GROUP heads x Nq positions packed
into the M dimension of one tile, so a KV tile is read once per group) and one
contiguous split of the keys.

With more than one split everything still runs in one launch. Each program writes a
normalized partial output and its base-2 logsumexp, then increments a counter for its
(batch, KV head, row block); the program that arrives last merges the splits,
``O = sum_s 2^(L_s - L) O_s`` with ``L = log2 sum_s 2^L_s``, writes O and puts the
counter back to zero. The counters and partial buffers are cached per device and
reused by every call (see ``_Scratch``), so a call allocates only its output.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from srl.kernels._flash_common import (INTERPRET, TUNE, autotune, check_kernel_inputs, last_dim_contiguous,
                                       load_kv_tile, needs_upcast, online_softmax_step)

_LOG2E = 1.4426950408889634  # 1 / ln(2)
MAX_DECODE_QUERIES = 16
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


@triton.jit
def _merge_splits(O_PART, LSE_PART, first_part_row, row_ok, M_PAD, NUM_SPLITS,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """Merge the NUM_SPLITS normalized partials of BLOCK_M rows; ``first_part_row`` indexes split 0's.

    Two passes over the splits: the row max of the logsumexps, then the weighted sum (weights
    2^(L_s - max), 0 for empty splits; a row with no visible key anywhere comes out 0). The
    partials were written by programs on other SMs: loads go through L2 (``.cg``)."""
    offs_d = tl.arange(0, HEAD_DIM)
    lse_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in range(NUM_SPLITS):
        lse = tl.load(LSE_PART + first_part_row + s * M_PAD, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
        lse_max = tl.maximum(lse_max, lse)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    den = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for s in range(NUM_SPLITS):
        part_row = first_part_row + s * M_PAD
        lse = tl.load(LSE_PART + part_row, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
        w = tl.exp2(lse - lse_max)
        o = tl.load(O_PART + part_row[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0,
                    cache_modifier=".cg")
        acc += w[:, None] * o
        den += w
    return acc / tl.where(den == 0.0, 1.0, den)[:, None]


@autotune(_decode_configs, key=["HEAD_DIM", "BLOCK_M", "SPLIT", "LEN_BUCKET", "CAUSAL"])
@triton.jit
def _decode_kernel(Q, K, V, O, O_PART, LSE_PART, COUNTERS, KV_LENS, qk_scale,
                   stride_qb, stride_qh, stride_qn,
                   stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn,
                   H_KV, N_Q, N_K, GROUP, NUM_SPLITS, SPLIT_LEN, LEN_BUCKET,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                   HAS_KV_LENS: tl.constexpr, SPLIT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """O is contiguous (B, H, N_Q, D). With SPLIT: O_PART (B*H_KV, NUM_SPLITS, M_PAD, D) and
    LSE_PART (B*H_KV, NUM_SPLITS, M_PAD) fp32 scratch, COUNTERS one int32 per (b, kv head, row
    block), all zero on entry and on exit."""
    split = tl.program_id(0)
    off_bkv = tl.program_id(1)
    m_block = tl.program_id(2)
    m_pad = tl.num_programs(2) * BLOCK_M
    off_b = (off_bkv // H_KV).to(tl.int64)
    off_kvh = (off_bkv % H_KV).to(tl.int64)
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # packed (head in group, position)
    row_ok = rows < GROUP * N_Q
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
        s = tl.where(visible, s, float("-inf"))
        p, m_i, l_i, acc = online_softmax_step(s, m_i, l_i, acc)
        acc = tl.dot(p.to(v.dtype), v, acc)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    o_ptrs = O + ((off_b * H_KV * GROUP + off_h[:, None]) * N_Q + pos[:, None]) * HEAD_DIM + offs_d[None, :]
    if SPLIT:
        first_part_row = off_bkv.to(tl.int64) * NUM_SPLITS * m_pad + rows
        part_row = first_part_row + split * m_pad
        tl.store(LSE_PART + part_row, tl.where(empty, float("-inf"), m_i + tl.log2(l_safe)), mask=row_ok)
        tl.store(O_PART + part_row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_ok[:, None])
        # every thread's partial stores come before the signal; the atomic (acq_rel) publishes them
        # and, in the last program to arrive, makes the other splits' partials visible
        tl.debug_barrier()
        counter = COUNTERS + off_bkv * tl.num_programs(2) + m_block
        if tl.atomic_add(counter, 1) == NUM_SPLITS - 1:
            out = _merge_splits(O_PART, LSE_PART, first_part_row, row_ok, m_pad, NUM_SPLITS, HEAD_DIM, BLOCK_M)
            tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
            tl.store(counter, 0)  # every split has arrived: ready for the next call
    else:
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None])


@functools.lru_cache(maxsize=None)
def _sm_count(device):
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


_WAVES = 4  # programs per SM the split count aims for


def _num_splits(programs, n_k, device):
    """Enough splits to give the GPU about _WAVES programs per SM, each >= 256 keys."""
    sms = _sm_count(device)
    want = triton.cdiv(_WAVES * sms, programs)
    return max(1, min(want, triton.cdiv(n_k, 256), 256))


class _Plan(NamedTuple):
    """Everything about a launch that depends only on shapes and flags (cached per shape)."""
    grid: tuple
    splits: int
    split_len: int
    len_bucket: int
    counters: int  # int32 counters the split path needs
    partial_rows: int  # rows of O_PART / LSE_PART the split path needs
    kwargs: dict  # constexpr meta-parameters, plus the tile unless autotuning


@functools.lru_cache(maxsize=1024)
def _plan(batch, kv_heads, group, n_q, n_k, head_dim, device, num_splits, causal, has_kv_lens, upcast,
          waves, tiles_key):
    """Launch plan for one shape; ``waves`` and ``tiles_key`` are in the key so that a benchmark
    changing ``_WAVES`` or ``_DECODE_TILES`` gets a fresh plan."""
    rows = group * n_q
    block_m = 16 if rows <= 16 else (32 if rows <= 32 else 64)
    m_blocks = triton.cdiv(rows, block_m)
    splits = num_splits or _num_splits(batch * kv_heads * m_blocks, n_k, device)
    split_len = triton.cdiv(n_k, splits)
    splits = triton.cdiv(n_k, split_len)  # no empty trailing split
    tiles = {} if TUNE else dict(tiles_key)
    kwargs = dict(HEAD_DIM=head_dim, CAUSAL=causal, UPCAST=upcast, HAS_KV_LENS=has_kv_lens,
                  SPLIT=splits > 1, BLOCK_M=block_m, **tiles)
    return _Plan(grid=(splits, batch * kv_heads, m_blocks), splits=splits, split_len=split_len,
                 len_bucket=1 << max(split_len - 1, 0).bit_length(), counters=batch * kv_heads * m_blocks,
                 partial_rows=batch * kv_heads * splits * m_blocks * block_m, kwargs=kwargs)


class _Scratch:
    """Per-device scratch of the split path: zeroed int32 counters and fp32 partial buffers.

    Reused by every call (no allocation or memset per call, so it is also what a CUDA graph
    captures and replays). The kernel leaves the counters at zero. Buffers only grow; a
    replaced buffer is kept alive because a graph captured earlier may still point at it.
    Not supported: calls on one device that run concurrently on different streams (they would
    share counters and partials); calls ordered on one stream, graph replays included, are fine.
    """

    def __init__(self, device):
        self.device = device
        self.counters = torch.zeros(0, dtype=torch.int32, device=device)
        self.o_part = torch.empty(0, dtype=torch.float32, device=device)
        self.lse_part = torch.empty(0, dtype=torch.float32, device=device)
        self._retired = []

    def ensure(self, counters, partial_rows, head_dim):
        if self.counters.numel() < counters:
            self._retired.append(self.counters)
            self.counters = torch.zeros(_grown(counters), dtype=torch.int32, device=self.device)
        if self.lse_part.numel() < partial_rows:
            self._retired.append(self.lse_part)
            self.lse_part = torch.empty(_grown(partial_rows), dtype=torch.float32, device=self.device)
        if self.o_part.numel() < partial_rows * head_dim:
            self._retired.append(self.o_part)
            self.o_part = torch.empty(_grown(partial_rows * head_dim), dtype=torch.float32, device=self.device)
        return self


def _grown(n):
    return max(triton.next_power_of_2(n), 1024)


_SCRATCH: dict = {}  # torch.device -> _Scratch


def _scratch(device, plan, head_dim):
    scratch = _SCRATCH.get(device)
    if scratch is None:
        scratch = _SCRATCH[device] = _Scratch(device)
    return scratch.ensure(plan.counters, plan.partial_rows, head_dim)


def _int32_lens(kv_lens, batch, device):
    if kv_lens.shape != (batch,) or kv_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"kv_lens must be an int32/int64 tensor of shape ({batch},), got "
                         f"{kv_lens.dtype} {tuple(kv_lens.shape)}")
    if kv_lens.dtype == torch.int32 and kv_lens.device == device:
        return kv_lens
    return kv_lens.to(device=device, dtype=torch.int32)


def flash_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                 sm_scale: Optional[float] = None, kv_lens: Optional[torch.Tensor] = None,
                 num_splits: Optional[int] = None) -> torch.Tensor:
    """Attention of a few new query rows against a KV cache (flash-decoding), one kernel launch.

    Args:
        q: (B, H, Nq, D) with Nq in 1..16 (decode, or speculative verification).
        k, v: (B, H_kv, Nk, D) cache views (any strides with a contiguous last
            dim); H must be a multiple of H_kv.
        causal: query i sees key j iff j <= i + Nk - Nq (bottom-right); with one
            query row this is plain attention over the whole cache.
        sm_scale: softmax scale, default 1/sqrt(D).
        kv_lens: optional (B,) integer tensor, valid cache length per batch
            element; keys past it are ignored (values are clamped to [0, Nk]).
        num_splits: KV splits; default picks enough to fill the GPU.

    Returns:
        (B, H, Nq, D) tensor of q's dtype.

    Calls that split the keys share a per-device scratch buffer: calls on one device must be
    ordered on one stream (see ``_Scratch``).
    """
    check_kernel_inputs(q, k, v)
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if Nq > MAX_DECODE_QUERIES:
        raise ValueError(f"flash_decode takes at most {MAX_DECODE_QUERIES} query rows, got q shape {tuple(q.shape)}")
    if kv_lens is not None:
        kv_lens = _int32_lens(kv_lens, B, q.device)
    scale = float(D ** -0.5 if sm_scale is None else sm_scale)
    if not (q.is_cuda or INTERPRET):
        from srl.kernels.flash_attention import attention_reference  # flash_attention imports this module

        return attention_reference(q, k, v, causal=causal, sm_scale=scale, kv_lens=kv_lens)
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)

    tiles = _INTERP_DECODE if INTERPRET else _DECODE_TILES[D]
    plan = _plan(B, Hkv, H // Hkv, Nq, Nk, D, q.device, num_splits, bool(causal), kv_lens is not None,
                 needs_upcast(q), _WAVES, tuple(tiles.items()))
    o = torch.empty((B, H, Nq, D), device=q.device, dtype=q.dtype)
    if plan.splits > 1:
        scratch = _scratch(q.device, plan, D)
        o_part, lse_part, counters = scratch.o_part, scratch.lse_part, scratch.counters
    else:  # one split writes O directly and never touches these
        o_part = lse_part = counters = o
    qs, ks, vs = q.stride(), k.stride(), v.stride()
    _decode_kernel[plan.grid](
        q, k, v, o, o_part, lse_part, counters, o if kv_lens is None else kv_lens, scale * _LOG2E,
        qs[0], qs[1], qs[2], ks[0], ks[1], ks[2], vs[0], vs[1], vs[2],
        Hkv, Nq, Nk, H // Hkv, plan.splits, plan.split_len, plan.len_bucket, **plan.kwargs)
    return o
