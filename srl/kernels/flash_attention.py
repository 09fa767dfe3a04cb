"""FlashAttention-2 in Triton: forward, backward and a split-KV decode path.

``flash_attention(q, k, v, causal=False, sm_scale=None)`` computes
``softmax(sm_scale * q @ k^T + mask) @ v`` on (B, H, N, D) tensors, like
``torch.nn.functional.scaled_dot_product_attention``, with two extensions:

* grouped-query attention: ``k`` and ``v`` may have fewer heads than ``q``
  (``H % H_kv == 0``; query head ``h`` reads KV head ``h // (H // H_kv)``);
* ``Nq != Nk`` with the causal mask aligned bottom-right: query ``i`` sees key
  ``j`` iff ``j <= i + Nk - Nq``. A query row that sees no key returns zeros
  (and gets zero gradients), never NaN.

The module follows the usual order: reference (the definition), Triton kernels,
launchers, ``torch.autograd.Function``, dispatcher. The decode kernels (queries
of length 1.._DECODE_Q against a KV cache, flash-decoding; they take per-row starts and a
shared prefix too) live in ``_flash_decode.py``.

Algorithm (FlashAttention-2). Forward: a program owns BLOCK_M query rows and
streams BLOCK_N keys at a time, keeping a running row max ``m``, running sum
``l`` and an unnormalized fp32 accumulator; scores are kept in base 2 (the scale
is multiplied by log2(e) once) so the kernel uses ``exp2``. Only the row
logsumexp ``L = m + log2(l)`` (base 2) is saved. Backward: ``D = rowsum(dO * O)``
is precomputed; one kernel owns a key block and accumulates dK, dV over query
blocks (and over the query heads of its KV group), a second owns a query block
and accumulates dQ over key blocks. Both recompute ``P = exp2(S - L)``, so no
atomics are needed and results are deterministic.

Dispatch: CUDA tensors run the Triton kernels; CPU tensors run the reference,
or the Triton interpreter when the environment has ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from srl.kernels._flash_bwd import _attn_bwd_dkdv, _attn_bwd_dq, _bwd_preprocess
from srl.kernels._flash_common import (INTERPRET, SUPPORTED_HEAD_DIMS, TUNE, autotune, causal_bounds, check_index,
                                       check_kernel_inputs, constexpr_arg, empty_like_heads, host_cdiv,
                                       last_dim_contiguous, launch, load_kv_desc, load_kv_tile, needs_upcast,
                                       online_softmax_step, start_bounds)
from srl.kernels._flash_decode import _decode_launch, flash_decode
from srl.kernels._reference import attention_reference  # noqa: F401 - public here too

__all__ = ["flash_attention", "attention_reference", "flash_decode", "SUPPORTED_HEAD_DIMS"]

_LOG2E = 1.4426950408889634  # 1 / ln(2): exp(x) == exp2(x * log2(e))


# --------------------------------------------------------------------------
# Reference: the definition of the result
# --------------------------------------------------------------------------
def _fwd_configs():
    cfg = triton.Config
    return [
        cfg({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        cfg({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=4),
        cfg({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
        cfg({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
        cfg({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        cfg({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        cfg({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=3),
        cfg({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=4),
    ]


def _prune_big_head(configs, named_args, **kwargs):
    """Drop tiles that cannot fit in shared memory/registers at D=256."""
    if constexpr_arg("HEAD_DIM", named_args, kwargs) < 256:
        return configs
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 64
            and c.kwargs.get("BLOCK_N", 64) <= 64 and c.num_stages <= 3]
    return kept or configs[:1]


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_src, v_src, kv_row, stride_kn, stride_vn,
               offs_m, offs_n, lo, hi, n_k, causal_shift, qk_scale, start, prefix,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_START: tl.constexpr, UPCAST: tl.constexpr,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, LAZY_RESCALE: tl.constexpr,
               WARP_SPEC: tl.constexpr, TMA: tl.constexpr):
    """Stream key blocks [lo, hi) through the online softmax of one query block.

    ``k_src``/``v_src`` are pointer blocks at key 0 of this KV head, or with TMA descriptors over
    (B*H_kv, N_K, D) whose row ``kv_row`` is this KV head."""
    if not TMA:
        k_src += lo * stride_kn
        v_src += lo * stride_vn
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPEC):
        cols = start_n + offs_n
        if TMA:
            k, v = load_kv_desc(k_src, v_src, kv_row, start_n, UPCAST, BLOCK_N, HEAD_DIM)
        else:
            k, v = load_kv_tile(k_src, v_src, cols < n_k, MASKED, UPCAST)
        qk = tl.dot(q, tl.trans(k))  # (BLOCK_M, BLOCK_N); logits in base 2 are qk * qk_scale
        if MASKED:
            visible = cols[None, :] < n_k
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + causal_shift)
            if HAS_START:  # keys before the row's start are hidden, but for a shared prefix
                visible = visible & ((cols[None, :] >= start[:, None]) | (cols[None, :] < prefix))
            s = tl.where(visible, qk * qk_scale, float("-inf"))
            p, m_i, l_i, acc = online_softmax_step(s, m_i, l_i, acc)
        elif LAZY_RESCALE:
            # keep a stale max until some row's max grows by more than 8 (p <= 2^8):
            # the accumulator is rescaled only on those (rare) tiles
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            if tl.max(m_new - m_i, 0) > 8.0:
                alpha = tl.exp2(m_i - m_new)
                acc = acc * alpha[:, None]
                l_i = l_i * alpha
                m_i = m_new
            p = tl.exp2(qk * qk_scale - m_i[:, None])
            l_i = l_i + tl.sum(p, 1)
        else:
            # scale after the row max (qk_scale > 0), so scale and shift fuse into one FMA
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            m_i = m_new
        acc = tl.dot(p.to(v.dtype), v, acc)
        if not TMA:
            k_src += BLOCK_N * stride_kn
            v_src += BLOCK_N * stride_vn
    return acc, l_i, m_i


@autotune(_fwd_configs, key=["HEAD_DIM", "CAUSAL", "N_BUCKET"], prune=_prune_big_head)
@triton.jit
def _attn_fwd(Q, K, V, O, LSE, KV_START, KV_LENS, KV_PREFIX, qk_scale,
              stride_qb, stride_qh, stride_qn,
              stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn,
              stride_ob, stride_oh, stride_on,
              H, GROUP, N_Q, N_K, N_BUCKET,
              HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_START: tl.constexpr, HAS_LENS: tl.constexpr,
              HAS_PREFIX: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              LAZY_RESCALE: tl.constexpr = False, WARP_SPEC: tl.constexpr = False, TMA: tl.constexpr = False):
    """With TMA, Q, K, V, O are tensor descriptors over (B*H, N_Q, D), (B*H_kv, N_K, D) (blocks
    (1, BLOCK_M or BLOCK_N, D)) and the pointer strides are unused; otherwise plain pointers."""
    tl.static_assert(BLOCK_N <= 256)
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    off_kvh = off_h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    kv_row = (off_bh // H) * (H // GROUP) + (off_bh % H) // GROUP  # this KV head's row in (B*H_kv, N_K, D)
    if TMA:
        q = Q.load([off_bh, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)  # rows past N_Q are zeros
        k_src = K
        v_src = V
    else:
        q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :]
        q = tl.load(q_ptrs, mask=(offs_m < N_Q)[:, None], other=0.0)
        k_src = K + off_b * stride_kb + off_kvh * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]
        v_src = V + off_b * stride_vb + off_kvh * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    n_k = N_K
    if HAS_LENS:  # this batch element's valid keys: the causal mask aligns to its end
        n_k = tl.minimum(tl.load(KV_LENS + off_b).to(tl.int32), N_K)
    causal_shift, full_hi, hi = causal_bounds(start_m, N_Q, n_k, CAUSAL, BLOCK_M, BLOCK_N)
    start = offs_m  # unused unless HAS_START
    prefix = 0
    lo = 0
    mid = 0
    if HAS_START:  # keys [lo, mid) under the per-row start mask, [mid, full_hi) unmasked
        start, lo, mid = start_bounds(KV_START + off_b * N_Q, offs_m, N_Q, n_k, full_hi, BLOCK_N)
        if HAS_PREFIX:  # the shared prefix is visible to every row: walk it under the mask too
            prefix = tl.load(KV_PREFIX + off_b).to(tl.int32)
            lo = tl.where(prefix > 0, 0, lo)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_src, v_src, kv_row, stride_kn, stride_vn,
                                   offs_m, offs_n, lo, mid, n_k, causal_shift, qk_scale, start, prefix,
                                   True, False, True, UPCAST, BLOCK_N, HEAD_DIM, False, False, TMA)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_src, v_src, kv_row, stride_kn, stride_vn,
                               offs_m, offs_n, mid, full_hi, n_k, causal_shift, qk_scale, start, prefix,
                               False, CAUSAL, False, UPCAST, BLOCK_N, HEAD_DIM, LAZY_RESCALE, WARP_SPEC, TMA)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_src, v_src, kv_row, stride_kn, stride_vn,
                               offs_m, offs_n, full_hi, hi, n_k, causal_shift, qk_scale, start, prefix,
                               True, CAUSAL, HAS_START, UPCAST, BLOCK_N, HEAD_DIM, False, False, TMA)

    empty = l_i == 0.0  # rows that saw no key: output 0, L = +inf (so P = 0 in backward)
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("inf"), m_i + tl.log2(l_safe))
    acc = acc / l_safe[:, None]
    row_ok = offs_m < N_Q
    tl.store(LSE + off_bh.to(tl.int64) * N_Q + offs_m, lse, mask=row_ok)
    if TMA:  # rows past N_Q are dropped
        O.store([off_bh, start_m, 0], acc.to(O.dtype).reshape(1, BLOCK_M, HEAD_DIM))
    else:
        o_ptrs = O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None])


# --------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------
def _tiles(block_m, block_n, warps, stages):
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}


# Tiles per head dim (H100, triton 3.6; picked from SRL_FLASH_AUTOTUNE=1 runs of
# benchmarks/kernels/attention.py). The interpreter uses one small tile.
_FWD_TILES = {16: _tiles(64, 64, 4, 3), 32: _tiles(64, 64, 4, 3), 64: _tiles(128, 64, 8, 4),
              128: dict(_tiles(128, 128, 8, 3), TMA=True), 256: _tiles(64, 64, 4, 2)}
# when TMA cannot address the inputs (odd strides, pre-Hopper), the pointer path's best tile
_FWD_POINTER_TILES = {128: _tiles(128, 64, 8, 3)}
# and for short key ranges: at N = 512 (B = 32, non-causal) the TMA tile ran 198 TFLOP/s
# against 308 for the pointer tile
_TMA_MIN_KEYS = 512
# backward: dK/dV programs own BLOCK_N keys and step over BLOCK_M queries; dQ the reverse
_DKDV_TILES = {16: _tiles(64, 64, 4, 3), 32: _tiles(64, 64, 4, 3), 64: _tiles(64, 64, 4, 3),
               128: _tiles(64, 128, 8, 3), 256: _tiles(32, 64, 4, 2)}
_DQ_TILES = {16: _tiles(64, 64, 4, 3), 32: _tiles(64, 64, 4, 3), 64: _tiles(64, 64, 4, 3),
             128: _tiles(128, 64, 8, 3), 256: _tiles(64, 32, 4, 2)}
# few query rows (speculative verification: 1 + k*L of them, a short prefill): 128-row query tiles
# would mostly compute padding, so calls with at most _SHORT_Q rows take narrower ones
_SHORT_Q = 64
_SHORT_Q_TILES = {16: _tiles(32, 64, 4, 2), 32: _tiles(32, 64, 4, 2), 64: _tiles(32, 64, 4, 2),
                  128: _tiles(32, 64, 4, 3), 256: _tiles(16, 32, 4, 2)}
# calls over a KV cache (kv_lens: prefill) at width 64: H200, 2026-12-02, prefill of 16 x 511 tokens
# 1.09x SDPA with 64 x 64 tiles against 0.91x with the training tile above (lm_attention_h200*.json);
# again 2026-12-03: 6.78 ms against 7.22 (training tile), 6.90 (128 x 64, 4 warps) and 7.39 for SDPA
# (lm_prefill_probe_h200_roundA.json)
_CACHED_FWD_TILES = {64: _tiles(64, 64, 4, 3)}
# Queries of at most _DECODE_Q rows that need no gradient (decode steps) take the split-KV decode
# kernel (_flash_decode.py); calls with per-row starts (the speculative tree pass) only with
# _DECODE_STARTS: on the H200 the tree pass over the sampler's 256-slot caches ran faster on the
# forward kernel's short-query tile (speculative iterations 1.03-1.09x SDPA against 0.94-1.10x,
# benchmarks/results/lm_attention_h200_run3.json)
_DECODE_Q = 16
_DECODE_STARTS = False
_INTERP_TILES = _tiles(64, 64, 4, 1)
_INTERP_FWD_TILES = dict(_INTERP_TILES)
# The forward also takes LAZY_RESCALE / WARP_SPEC / TMA flags (`--sweep` candidates).
# TMA moves Q, K, V and O through tensor descriptors (Hopper's TMA unit) when the inputs
# allow it (see _tma_descriptors); H100 sweep at D=128: 128x128 tiles with TMA took 0.516 ms
# against 0.617 ms for the best pointer tile (N=2048) and 0.572 against 0.664 (N=4096, causal).
# LAZY_RESCALE (skip the accumulator rescale until a row max grows by > 8, base 2) and
# WARP_SPEC (warp-specialized key loop) were no faster there and stay off.


# float32 inputs (4-byte tiles) at wide heads: the 2-byte tiles above overflow shared memory
# (the forward's D=128 TMA tile asked for 459 KB on the H200, which has 227 KB)
_FP32_FWD_TILES = {128: _tiles(64, 64, 4, 2), 256: _tiles(32, 32, 4, 1)}
_FP32_DKDV_TILES = {128: _tiles(32, 64, 4, 2), 256: _tiles(16, 32, 4, 1)}
_FP32_DQ_TILES = {128: _tiles(64, 32, 4, 2), 256: _tiles(32, 16, 4, 1)}


def _bwd_tiles(d, causal, dtype=torch.float16):
    if INTERPRET:
        return _INTERP_TILES, _INTERP_TILES
    if dtype == torch.float32 and d in _FP32_DKDV_TILES:
        return _FP32_DKDV_TILES[d], _FP32_DQ_TILES[d]
    return _DKDV_TILES[d], _DQ_TILES[d]


def _bucket(n):
    """Autotune key: short (<= 1k) or long sequences; keeps the number of tuning runs small."""
    return 0 if n <= 1024 else 1


def _strides(t):  # (b, h, n) strides; the last dim is contiguous
    return t.stride()[:3]


@functools.lru_cache(maxsize=None)
def _has_tma(device):
    """Interpreter, or a GPU with a TMA unit (compute capability 9.0+)."""
    return INTERPRET or (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9)


def _tma_rows(t):
    """``t`` (B, H, N, D) as a (B*H, N, D) view that a TMA descriptor can address, or None.

    The head rows must merge into one stride (B or H of 1, or stride_b == H * stride_h), and the
    base and the row and key strides must be 16-byte aligned. Outside the descriptor's N rows
    TMA reads zeros and drops writes, so a block may run past the end of a head."""
    b, h, n, d = t.shape
    if t.stride(-1) != 1 or (b > 1 and h > 1 and t.stride(0) != h * t.stride(1)):
        return None
    rows = t.view(b * h, n, d)
    if t.data_ptr() % 16 or any(s * t.element_size() % 16 for s in rows.stride()[:2]):
        return None
    return rows


def _tma_descriptors(q, k, v, o, block_m, block_n):
    """Descriptors over (B*H, N, D) for q and o (blocks of BLOCK_M rows) and (B*H_kv, N, D) for
    k and v (blocks of BLOCK_N keys), or None when one of them breaks TMA's rules."""
    views = [_tma_rows(t) for t in (q, k, v, o)]
    if not _has_tma(q.device) or any(view is None for view in views):
        return None
    d = q.shape[-1]
    return [TensorDescriptor(view, list(view.shape), list(view.stride()), [1, block, d])
            for view, block in zip(views, (block_m, block_n, block_n, block_m))]


def _fwd_plan(q, k, v, o, cached=False):
    """(tiles, operands) of the forward: TMA descriptors where the tile table asks for them and
    they can address the inputs, else the tensors themselves with the pointer tile. ``cached``:
    a call over a KV cache (``kv_lens``, prefill)."""
    D, Nk = q.shape[-1], k.shape[2]
    tiles = _INTERP_FWD_TILES if INTERPRET else _FWD_TILES[D]
    if not INTERPRET and cached and D in _CACHED_FWD_TILES:
        tiles = _CACHED_FWD_TILES[D]
    if not INTERPRET and q.dtype == torch.float32 and D in _FP32_FWD_TILES:
        tiles = _FP32_FWD_TILES[D]
    if not INTERPRET and not TUNE and q.shape[2] <= _SHORT_Q:
        tiles = _SHORT_Q_TILES[D]
    if not tiles.get("TMA") or TUNE:  # autotuned configs do not set TMA
        return tiles, (q, k, v, o)
    pointer_tiles = _FWD_POINTER_TILES.get(D, dict(tiles, TMA=False))
    if D in _FWD_POINTER_TILES and Nk <= _TMA_MIN_KEYS:
        return pointer_tiles, (q, k, v, o)
    descriptors = _tma_descriptors(q, k, v, o, tiles["BLOCK_M"], tiles["BLOCK_N"])
    return (pointer_tiles, (q, k, v, o)) if descriptors is None else (tiles, descriptors)


def _forward(q, k, v, causal, sm_scale, kv_start=None, kv_lens=None, kv_prefix=None):
    """Returns O (like q) and the base-2 row logsumexp L, (B, H, Nq) fp32."""
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    o = empty_like_heads(q)
    lse = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    tiles, operands = _fwd_plan(q, k, v, o, cached=kv_lens is not None)
    optional = [lse if t is None else t for t in (kv_start, kv_lens, kv_prefix)]  # lse: unused placeholder
    args = (*operands, lse, *optional, sm_scale * _LOG2E,
            *_strides(q), *_strides(k), *_strides(v), *_strides(o),
            H, H // Hkv, Nq, Nk, _bucket(max(Nq, Nk)))
    meta = dict(HEAD_DIM=D, CAUSAL=bool(causal), HAS_START=kv_start is not None, HAS_LENS=kv_lens is not None,
                HAS_PREFIX=kv_prefix is not None, UPCAST=needs_upcast(q))
    launch(_attn_fwd, lambda c: (host_cdiv(Nq, c["BLOCK_M"]), B * H), args, meta, tiles)
    return o, lse


def _backward(do, q, k, v, o, lse, causal, sm_scale, kv_start=None):
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    do = last_dim_contiguous(do)
    dq, dk, dv = (empty_like_heads(t) for t in (q, k, v))
    delta = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    pre_m = 64
    _bwd_preprocess[(host_cdiv(Nq, pre_m), B * H)](
        o, do, delta, *_strides(o), *_strides(do), H, Nq, HEAD_DIM=D, BLOCK_M=pre_m)
    upcast = needs_upcast(q)
    bucket = _bucket(max(Nq, Nk))
    start = delta if kv_start is None else kv_start
    kv_args = (q, k, v, do, dk, dv, lse, delta, start, sm_scale * _LOG2E, sm_scale,
               *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
               H, Hkv, H // Hkv, Nq, Nk, bucket)
    q_args = (q, k, v, do, dq, lse, delta, start, sm_scale * _LOG2E, sm_scale,
              *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
              H, H // Hkv, Nq, Nk, bucket)
    meta = dict(HEAD_DIM=D, CAUSAL=bool(causal), HAS_START=kv_start is not None, UPCAST=upcast)
    kv_tiles, q_tiles = _bwd_tiles(D, causal, q.dtype)
    # EVEN_M: every query block is full (all BLOCK_M values tried divide 128)
    even_m = Nq % (128 if TUNE else kv_tiles["BLOCK_M"]) == 0
    launch(_attn_bwd_dkdv, lambda c: (host_cdiv(Nk, c["BLOCK_N"]), B * Hkv), kv_args,
           dict(meta, EVEN_M=even_m), kv_tiles)
    launch(_attn_bwd_dq, lambda c: (host_cdiv(Nq, c["BLOCK_M"]), B * H), q_args, meta, q_tiles)
    return dq, dk, dv


# --------------------------------------------------------------------------
# autograd.Function and dispatcher
# --------------------------------------------------------------------------
class FlashAttentionFunction(torch.autograd.Function):
    """Triton FlashAttention-2; saves q, k, v, O and the row logsumexp only."""

    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale, kv_start):
        q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
        o, lse = _forward(q, k, v, causal, sm_scale, kv_start)
        ctx.save_for_backward(q, k, v, o, lse, kv_start)
        ctx.causal = causal
        ctx.sm_scale = sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, kv_start = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, ctx.causal, ctx.sm_scale, kv_start)
        return dq, dk, dv, None, None, None


def _use_triton(t):
    return t.is_cuda or INTERPRET


def flash_attention(q, k, v, causal=False, sm_scale=None, kv_start=None, kv_lens=None, kv_prefix=None):
    """Scaled dot-product attention on (B, H, N, D) tensors.

    Args:
        q: (B, H, Nq, D) queries, float16 / bfloat16 (float32 is accepted and
            runs tf32 matmuls on the GPU).
        k, v: (B, H_kv, Nk, D) keys and values; H must be a multiple of H_kv.
        causal: mask key j for query i unless j <= i + Nk - Nq (bottom-right).
        sm_scale: softmax scale, default 1/sqrt(D).
        kv_start: optional (B, Nq) integer tensor: query i of batch b sees no key before
            ``kv_start[b, i]`` (episode starts, sliding windows, left padding), on top of
            ``causal``. Shared by every head.
        kv_lens: optional (B,) integer tensor: batch element b has ``kv_lens[b]`` valid keys (a
            KV cache filled to different lengths); the causal mask aligns to that end, so query i
            sees key j iff j <= i + kv_lens[b] - Nq. Forward only.
        kv_prefix: optional (B,) integer tensor, with ``kv_start``: keys before ``kv_prefix[b]``
            stay visible to every query whatever its start (k draft blocks verified over a shared
            prefix: each block's queries start at their block). Forward only.

    Returns:
        (B, H, Nq, D) tensor of q's dtype; rows that see no key are zero.

    Raises:
        ValueError: on shapes, dtypes, devices or head dims it does not support.

    CUDA tensors run the Triton kernels (queries of at most ``_DECODE_Q`` rows that need no
    gradient and have no ``kv_start`` take the split-KV decode kernel); CPU tensors run
    :func:`attention_reference`, or the Triton interpreter under TRITON_INTERPRET=1.
    The output (and the gradients) keep q's (k's, v's) storage order: for q seen through a
    transpose of (B, N, H, D) storage, ``out.transpose(1, 2)`` is contiguous.
    """
    check_kernel_inputs(q, k, v)
    scale = float(q.shape[-1] ** -0.5 if sm_scale is None else sm_scale)
    B, Nq = q.shape[0], q.shape[2]
    kv_start = None if kv_start is None else check_index("kv_start", kv_start, (B, Nq), q)
    kv_lens = None if kv_lens is None else check_index("kv_lens", kv_lens, (B,), q)
    kv_prefix = None if kv_prefix is None else check_index("kv_prefix", kv_prefix, (B,), q)
    if kv_prefix is not None and kv_start is None:
        raise ValueError("kv_prefix only applies with kv_start (it exempts a prefix from the starts)")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if needs_grad and (kv_lens is not None or kv_prefix is not None):
        raise ValueError("kv_lens and kv_prefix are forward-only (inference over a KV cache): no gradients")
    if not _use_triton(q):
        return attention_reference(q, k, v, causal=causal, sm_scale=scale, kv_lens=kv_lens, kv_start=kv_start,
                                   kv_prefix=kv_prefix)
    if needs_grad:
        return FlashAttentionFunction.apply(q, k, v, bool(causal), scale, kv_start)
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    if Nq <= _DECODE_Q and (kv_start is None or _DECODE_STARTS):
        return _decode_launch(q, k, v, bool(causal), scale, kv_lens, kv_start, kv_prefix, None)
    return _forward(q, k, v, bool(causal), scale, kv_start, kv_lens, kv_prefix)[0]

