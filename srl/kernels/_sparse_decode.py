"""Decode for sparse patterns against a cache that keeps only what the pattern can still see.

* :class:`SinkWindowCache`: the ``sink`` first positions plus a ring buffer of the last
  ``window + max_new - 1``; its size no longer grows with the context.
* :class:`S2Cache`: per KV head, a ring of the last ``local_blocks + cdiv(max_new - 1, block)``
  blocks plus, in order, the older blocks on that head's strides (the union over the query
  heads of its group); a block leaving the ring moves to the strided region or is dropped.

Every slot records the absolute position it holds (-1: empty), so :func:`sparse_decode` masks
with the same ``visible`` function as the prefill kernels. It is flash-decoding: programs own a
(batch, KV head) pair, the query rows of its group and one split of the slots; the dense
decode's merge kernel combines the splits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from srl.kernels._flash_common import INTERPRET, check_kernel_inputs, last_dim_contiguous, load_kv_tile, \
    needs_upcast, online_softmax_step
from srl.kernels._flash_decode import _decode_combine, _num_splits
from srl.kernels._sparse_kernels import visible
from srl.kernels._sparse_patterns import S2Strided, SinkWindow

_LOG2E = 1.4426950408889634  # 1 / ln(2)


# --------------------------------------------------------------------------
# Caches
# --------------------------------------------------------------------------
class SinkWindowCache:
    """K, V (B, H_kv, sink + ring, D) and slot positions ``pos`` (1, S); ring = window + max_new - 1."""

    def __init__(self, pattern: SinkWindow, batch: int, kv_heads: int, head_dim: int, max_new: int = 16,
                 device=None, dtype=torch.bfloat16):
        if not isinstance(pattern, SinkWindow):
            raise ValueError(f"SinkWindowCache needs a SinkWindow pattern, got {type(pattern).__name__}")
        self.pattern, self.max_new, self.length = pattern, max_new, 0
        self.ring = pattern.window + max_new - 1
        slots = pattern.sink + self.ring
        self.k = torch.zeros(batch, kv_heads, slots, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((1, slots), -1, device=device, dtype=torch.int32)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def used_slots(self) -> int:
        """Slots [0, used) may hold entries (the ring fills in order); decode reads no further."""
        return min(self.length, self.k.shape[2])

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add keys/values (B, H_kv, T, D) of the next T positions, keeping what stays visible."""
        sink, ring = self.pattern.sink, self.ring
        start, end = self.length, self.length + k.shape[2]
        p = torch.arange(start, end, device=self.k.device)
        keep = (p < sink) | (p >= max(sink, end - ring))
        idx = keep.nonzero().squeeze(1)
        p = p[idx]
        slots = torch.where(p < sink, p, sink + (p - sink) % ring)
        self.k[:, :, slots] = k[:, :, idx].to(self.k.dtype)
        self.v[:, :, slots] = v[:, :, idx].to(self.v.dtype)
        self.pos[0, slots] = p.to(torch.int32)
        self.length = end


class S2Cache:
    """Per KV head: ring of recent blocks, then that head's strided blocks; ``pos`` (H_kv, S)."""

    def __init__(self, pattern: S2Strided, batch: int, kv_heads: int, q_heads: int, head_dim: int,
                 max_len: int, max_new: int = 16, device=None, dtype=torch.bfloat16):
        if not isinstance(pattern, S2Strided):
            raise ValueError(f"S2Cache needs an S2Strided pattern, got {type(pattern).__name__}")
        if q_heads % kv_heads:
            raise ValueError(f"q_heads={q_heads} must be a multiple of kv_heads={kv_heads}")
        self.pattern, self.max_new, self.max_len, self.length = pattern, max_new, max_len, 0
        b, stride, group = pattern.block, pattern.stride, q_heads // kv_heads
        self.ring_blocks = pattern.local_blocks + triton.cdiv(max_new - 1, b)
        # residues kb % stride on the strides of the query heads of each KV head's group
        self.residues = [sorted({(-h) % stride for h in range(g * group, (g + 1) * group)})
                         for g in range(kv_heads)]
        n_blocks = triton.cdiv(max_len, b)
        cap = max(self._rank(g, n_blocks) for g in range(kv_heads))
        slots = (self.ring_blocks + cap) * b
        self.k = torch.zeros(batch, kv_heads, slots, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((kv_heads, slots), -1, device=device, dtype=torch.int32)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def used_slots(self) -> int:
        """Slots [0, used) may hold entries: the ring and the strided blocks stored so far."""
        if self.length == 0:
            return 0
        lo = max((self.length - 1) // self.pattern.block - self.ring_blocks + 1, 0)
        stored = max(self._rank(g, lo) for g in range(self.k.shape[1]))
        return (self.ring_blocks + stored) * self.pattern.block

    def _rank(self, g, kb):
        """Number of head-g strided blocks before block kb (int or tensor)."""
        res, stride = self.residues[g], self.pattern.stride
        before = sum((kb % stride) > r for r in res)
        return (kb // stride) * len(res) + before

    def _strided(self, g, kb):
        return sum((kb % self.pattern.stride) == r for r in self.residues[g]) > 0

    def _evict(self, lo_new: int) -> None:
        """Blocks below ring start ``lo_new`` leave the ring: strided ones move, others go."""
        b = self.pattern.block
        last_old = (self.length - 1) // b
        lo_old = max(last_old - self.ring_blocks + 1, 0)
        leaving = torch.arange(lo_old, min(lo_new, last_old + 1), device=self.k.device)
        if self.length == 0 or leaving.numel() == 0:
            return
        off = torch.arange(b, device=self.k.device)
        for g in range(self.k.shape[1]):
            src = ((leaving % self.ring_blocks) * b)[:, None] + off  # (n, b) ring slots
            moving = self._strided(g, leaving)
            dst = (self.ring_blocks + self._rank(g, leaving[moving])) * b
            dst = (dst[:, None] + off).flatten()
            s = src[moving].flatten()
            self.k[:, g, dst] = self.k[:, g, s]
            self.v[:, g, dst] = self.v[:, g, s]
            self.pos[g, dst] = self.pos[g, s]
            self.pos[g, src.flatten()] = -1

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add keys/values (B, H_kv, T, D) of the next T positions, evicting what no query can see."""
        b = self.pattern.block
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"S2Cache holds max_len={self.max_len} positions, appending to {end}")
        lo_new = max((end - 1) // b - self.ring_blocks + 1, 0)
        self._evict(lo_new)
        p = torch.arange(start, end, device=self.k.device)
        kb = p // b
        for g in range(self.k.shape[1]):
            in_ring = kb >= lo_new
            keep = in_ring | self._strided(g, kb)
            idx = keep.nonzero().squeeze(1)
            pk, kbk, ring_k = p[idx], kb[idx], in_ring[idx]
            slots = torch.where(ring_k, (kbk % self.ring_blocks) * b,
                                (self.ring_blocks + self._rank(g, kbk)) * b) + pk % b
            self.k[:, g, slots] = k[:, g, idx].to(self.k.dtype)
            self.v[:, g, slots] = v[:, g, idx].to(self.v.dtype)
            self.pos[g, slots] = pk.to(torch.int32)
        self.length = end


# --------------------------------------------------------------------------
# Reference and kernel
# --------------------------------------------------------------------------
def decode_reference(q: torch.Tensor, cache, sm_scale: float) -> torch.Tensor:
    """Masked attention of q (B, H, Nq, D), at the cache's last Nq positions, over its slots."""
    B, H, Nq, D = q.shape
    hkv = cache.k.shape[1]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    kf = cache.k.to(cdt).repeat_interleave(H // hkv, dim=1)  # (B, H, S, D)
    vf = cache.v.to(cdt).repeat_interleave(H // hkv, dim=1)
    pos = cache.pos.long()
    pos = pos.expand(hkv, -1).repeat_interleave(H // hkv, dim=0)[:, None, :]  # (H, 1, S)
    rows = torch.arange(cache.length - Nq, cache.length, device=q.device)[None, :, None]  # (1, Nq, 1)
    heads = torch.arange(H, device=q.device)[:, None, None]
    mask = cache.pattern.visible(rows, pos, heads) & (pos >= 0)  # (H, Nq, S)
    s = torch.matmul(q.to(cdt), kf.transpose(-1, -2)) * sm_scale
    s = s.masked_fill(~mask[None], float("-inf"))
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    den = p.sum(-1, keepdim=True)
    return torch.matmul(p / torch.where(den > 0, den, torch.ones_like(den)), vf).to(q.dtype)


@triton.jit
def _sparse_decode_kernel(Q, K, V, POS, O, O_PART, LSE_PART, qk_scale,
                          stride_qb, stride_qh, stride_qn,
                          stride_kb, stride_kh, stride_kn,
                          stride_vb, stride_vh, stride_vn,
                          stride_ob, stride_oh, stride_on, stride_ph,
                          H_KV, N_Q, N_SLOTS, GROUP, ROWS, M_PAD, NUM_SPLITS, SPLIT_LEN, Q_POS0, P0, P1, P2,
                          KIND: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    split = tl.program_id(0)
    off_bkv = tl.program_id(1)
    off_b = (off_bkv // H_KV).to(tl.int64)
    off_kvh = (off_bkv % H_KV).to(tl.int64)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)  # packed (head in group, position)
    row_ok = rows < ROWS
    qi = rows % N_Q
    heads = (off_kvh * GROUP).to(tl.int32) + rows // N_Q
    qpos = Q_POS0 + qi  # absolute positions of the query rows
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + off_b * stride_qb + heads[:, None].to(tl.int64) * stride_qh + qi[:, None] * stride_qn
                + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    lo = split * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, N_SLOTS)
    k_ptrs = K + off_b * stride_kb + off_kvh * stride_kh + (lo + offs_n)[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = V + off_b * stride_vb + off_kvh * stride_vh + (lo + offs_n)[:, None] * stride_vn + offs_d[None, :]
    pos_row = POS + off_kvh * stride_ph
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        slots = start_n + offs_n
        slot_ok = slots < hi
        k, v = load_kv_tile(k_ptrs, v_ptrs, slot_ok, True, UPCAST)
        kpos = tl.load(pos_row + slots, mask=slot_ok, other=-1)
        ok = visible(qpos, kpos, heads, row_ok, kpos >= 0, KIND, P0, P1, P2, Q, 0, 0)
        s = tl.where(ok, tl.dot(q, tl.trans(k)) * qk_scale, float("-inf"))
        p, m_i, l_i, acc = online_softmax_step(s, m_i, l_i, acc)
        acc = tl.dot(p.to(v.dtype), v, acc)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    if SPLIT:  # partials in the dense decode's layout: O_PART (B*H_KV, NUM_SPLITS, M_PAD, D)
        part = (off_bkv.to(tl.int64) * NUM_SPLITS + split) * M_PAD + rows
        tl.store(LSE_PART + part, tl.where(empty, float("-inf"), m_i + tl.log2(l_safe)), mask=row_ok)
        tl.store(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_ok[:, None])
    else:
        o_ptrs = O + off_b * stride_ob + heads[:, None].to(tl.int64) * stride_oh + qi[:, None] * stride_on \
            + offs_d[None, :]
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None])


_GPU_DECODE = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
_INTERP_DECODE = {"BLOCK_N": 32, "num_warps": 4, "num_stages": 1}


def sparse_decode(q: torch.Tensor, cache: SinkWindowCache | S2Cache, sm_scale: float | None = None,
                  num_splits: int | None = None) -> torch.Tensor:
    """Attention of the last Nq positions' queries q (B, H, Nq, D) over a sparse cache.

    The new positions' keys and values must already be appended; query row i sits at position
    ``cache.length - Nq + i``. Nq may not exceed the cache's ``max_new``. ``num_splits`` splits
    the slots (split-KV); by default enough splits to fill the GPU.
    """
    if not isinstance(cache, (SinkWindowCache, S2Cache)):
        raise ValueError(f"cache must be a SinkWindowCache or S2Cache, got {type(cache).__name__}")
    check_kernel_inputs(q, cache.k, cache.v)
    B, H, Nq, D = q.shape
    Hkv, S = cache.k.shape[1], cache.used_slots
    if Nq > cache.max_new or Nq > cache.length:
        raise ValueError(f"q has Nq={Nq} rows; the cache takes at most max_new={cache.max_new} and holds "
                         f"{cache.length} positions")
    scale = float(D ** -0.5 if sm_scale is None else sm_scale)
    if not (q.is_cuda or INTERPRET):
        return decode_reference(q, cache, scale)
    q = last_dim_contiguous(q)
    group = H // Hkv
    rows = group * Nq
    block_m = 16 if rows <= 16 else (32 if rows <= 32 else 64)
    m_blocks = triton.cdiv(rows, block_m)
    m_pad = m_blocks * block_m
    splits = num_splits or _num_splits(B * Hkv * m_blocks, S, q.device)
    split_len = triton.cdiv(S, splits)
    splits = triton.cdiv(S, split_len)
    o = torch.empty((B, H, Nq, D), device=q.device, dtype=q.dtype)
    if splits > 1:
        o_part = torch.empty((B * Hkv, splits, m_pad, D), device=q.device, dtype=torch.float32)
        lse_part = torch.empty((B * Hkv, splits, m_pad), device=q.device, dtype=torch.float32)
    else:
        o_part = lse_part = o  # unused
    kind, p0, p1, p2 = cache.pattern.kernel_params()
    k, v, pos = cache.k, cache.v, cache.pos
    tiles = _INTERP_DECODE if INTERPRET else _GPU_DECODE
    _sparse_decode_kernel[(splits, B * Hkv, m_blocks)](
        q, k, v, pos, o, o_part, lse_part, scale * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        pos.stride(0) if pos.shape[0] > 1 else 0,
        Hkv, Nq, S, group, rows, m_pad, splits, split_len, cache.length - Nq, p0, p1, p2,
        KIND=kind, HEAD_DIM=D, UPCAST=needs_upcast(q), SPLIT=splits > 1, BLOCK_M=block_m, **tiles)
    if splits > 1:
        _decode_combine[(rows, B * Hkv)](
            o_part, lse_part, o, o.stride(0), o.stride(1), o.stride(2), Hkv, Nq, group, m_pad, splits,
            HEAD_DIM=D, SPLITS_P2=max(triton.next_power_of_2(splits), 2))
    return o
