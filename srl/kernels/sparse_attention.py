"""Block-sparse causal attention with static patterns: S2-Attention and LongGen.

``sparse_attention(q, k, v, pattern, sm_scale=None)`` is ``flash_attention(q, k, v, causal=True)``
with the keys further restricted by ``pattern`` (see ``_sparse_patterns.py``):

* :class:`SinkWindow` (sink, window): LongGen's attention-sink layers;
* :class:`S2Strided` (block, local_blocks, stride): S2-Attention's heterogeneous strided shards
  (LongGen's BlockSparse layers), a different shard per query head;
* :class:`BlockLayout` (layout, block): any per-head boolean block map.

Inputs are (B, H, N, D); K and V may have fewer heads (GQA); Nq <= Nk with query row i at key
position Nk - Nq + i. A row that sees no key returns zeros (and zero gradients), never NaN.

The Triton kernels visit only the tiles the pattern touches: the work is proportional to the
visible blocks. SinkWindow and S2Strided take the range kernels (``_sparse_ranges.py``), which
compute each program's key (or query) ranges from its position; block layouts take the list
kernels (``_sparse_kernels.py``), which read per (head, query tile) a list of full tiles (no
mask) and one of partial tiles (element mask), built once per pattern and shape and cached.
They share the dense kernels' tile loader and online-softmax step (``_flash_common.py``).
Each range-kernel launch is planned once per call signature and later calls go straight to the
compiled kernel's launcher (``_sparse_launch.py``): at 32k the host work was ~12% of a forward call.
Decode against a cache that keeps only what the pattern can still see is in ``_sparse_decode.py``.

Dispatch as in ``flash_attention``: CUDA tensors run Triton; CPU tensors run the reference, or
the Triton interpreter under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
from triton.runtime import _allocation
from triton.tools.tensor_descriptor import TensorDescriptor

from srl.kernels._flash_bwd import _bwd_preprocess
from srl.kernels._flash_common import (INTERPRET, check_inputs, check_kernel_inputs, host_cdiv, last_dim_contiguous,
                                       needs_upcast)
from srl.kernels._sparse_decode import S2Cache, SinkWindowCache, sparse_decode
from srl.kernels._sparse_launch import CachedLaunch, signature
from srl.kernels._sparse_kernels import _sparse_bwd_dkdv, _sparse_bwd_dq, _sparse_fwd
from srl.kernels._sparse_ranges import _range_bwd_dkdv, _range_bwd_dq, _range_fwd
from srl.kernels._sparse_patterns import (KIND_LAYOUT, KIND_S2, KIND_SINK_WINDOW, BlockLayout, Pattern, S2Strided,
                                          SinkWindow, TileLists, check_pattern, dense_mask, layer_patterns,
                                          tile_classes, tile_lists)
from srl.kernels.flash_attention import _has_tma

__all__ = ["sparse_attention", "sparse_attention_reference", "SinkWindow", "S2Strided", "BlockLayout",
           "sparse_decode", "SinkWindowCache", "S2Cache", "dense_mask", "tile_classes", "layer_patterns"]

_LOG2E = 1.4426950408889634  # 1 / ln(2)


# --------------------------------------------------------------------------
# Reference: the definition of the result
# --------------------------------------------------------------------------
def sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern,
                               sm_scale: float | None = None) -> torch.Tensor:
    """Dense attention under the pattern's element mask; float32 (float64 for float64 inputs)."""
    check_inputs(q, k, v)
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if Nq > Nk:
        raise ValueError(f"sparse attention needs Nq <= Nk, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    check_pattern(pattern, H, Nk)
    scale = D ** -0.5 if sm_scale is None else sm_scale
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = q.to(cdt), k.to(cdt), v.to(cdt)
    if Hkv != H:  # (B, Hkv, Nk, D) -> (B, H, Nk, D)
        kf = kf.repeat_interleave(H // Hkv, dim=1)
        vf = vf.repeat_interleave(H // Hkv, dim=1)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # (B, H, Nq, Nk)
    s = s.masked_fill(~dense_mask(pattern, H, Nq, Nk, q.device)[None], float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.matmul(p, vf).to(q.dtype)


# --------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------
def _tiles(block_m, block_n, warps, stages, **extra):
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages, **extra}


# GPU tiles per stage and pattern kind (H200, D = 128, picked by benchmarks/kernels/
# sparse_attention_sweep.py and sparse_attention_probe.py): the range kernels (RANGES) for sink+window and S2, TMA K/V loads in
# the forward, backward grids with heads fastest; block layouts (and S2 blocks that are not a
# tile width) take the list kernels with the same tile sizes. D = 256 takes the smaller list
# tiles. ``TILE_OVERRIDE`` lets the benchmarks try others. Sink+window's dK/dV reads q and dO
# through descriptors that each program builds (DESC_DEV: 7% faster than pointer loads on the H200,
# no host-side encoding per launch); its forward keeps host descriptors (built on the device they
# cost each program ~1.5 us, more than the ~0.08 ms of host time they save per call at 128k) and
# takes 64-row query tiles with 4 warps: ~113 KB of shared memory, so two programs share an SM and
# each one's softmax overlaps the other's matrix products (the 128-row, 8-warp tile holds one SM
# alone, and its two warp groups meet at block-wide barriers every key tile). On the H200 it is
# 8-15% faster per call at 32k and forward+backward 1-3% faster at 128k (docs/benchmarks.md, round F);
# a 64-row band also computes fewer keys (34 tiles per 64 rows, not 35 per 128).
_R = {"RANGES": True}
_RH = {"RANGES": True, "HEADS_FAST": True}
_FD = {"FUSE_DELTA": True}  # the dQ kernel computes rowsum(dO * O) (no separate pass; dQ before dK/dV)
_GPU_TILES = {"fwd": _tiles(128, 64, 8, 4, TMA=True, **_R), "dkdv": _tiles(64, 64, 4, 2, **_RH),
              "dq": _tiles(128, 64, 8, 2, **_RH, **_FD)}
_KIND_TILES = {KIND_SINK_WINDOW: {"fwd": _tiles(64, 64, 4, 3, TMA=True, **_R),
                                  "dkdv": _tiles(64, 64, 4, 2, TMA=True, DESC_DEV=True, **_RH),
                                  "dq": _tiles(128, 64, 8, 3, **_RH, **_FD)}}
_BIG_HEAD_TILES = {"fwd": _tiles(64, 32, 4, 2), "dkdv": _tiles(32, 64, 4, 2), "dq": _tiles(64, 32, 4, 2)}
_INTERP_TILES = _tiles(32, 32, 4, 1)
TILE_OVERRIDE: dict = {}  # stage -> tiles, for sweeps


def _stage_tiles(stage, d, kind):
    if stage in TILE_OVERRIDE:
        return dict(TILE_OVERRIDE[stage])
    gpu = _KIND_TILES.get(kind, {}).get(stage, _GPU_TILES[stage])
    if INTERPRET:  # small tiles, the GPU default's kernel choice (so that tests run the shipped path)
        flags = ("RANGES", "TMA", "DESC_DEV", "HEADS_FAST", "FUSE_DELTA")
        return dict(_INTERP_TILES, **{f: gpu[f] for f in flags if f in gpu})
    if d > 128:
        return dict(_BIG_HEAD_TILES[stage])
    return dict(gpu)


def _strides(t):  # (b, h, n) strides; the last dim is contiguous
    return t.stride(0), t.stride(1), t.stride(2)


def _list_args(lists: TileLists):
    """Pointers and (head, row) strides of the tile lists; a shared list has head stride 0."""
    hs = 0 if lists.shared else 1
    return ((lists.full_cnt, lists.full_idx, lists.part_cnt, lists.part_idx),
            (lists.full_cnt.stride(0) * hs, lists.full_idx.stride(0) * hs, lists.full_idx.stride(1),
             lists.part_cnt.stride(0) * hs, lists.part_idx.stride(0) * hs, lists.part_idx.stride(1)))


def _pattern_args(pattern, device, dummy):
    """(KIND, P0, P1, P2), the layout tensor and its (head, row) strides."""
    kind, p0, p1, p2 = pattern.kernel_params()
    if kind != KIND_LAYOUT:
        return (kind, p0, p1, p2), dummy, (0, 0)
    layout = pattern._cache.get(("u8", str(device)))
    if layout is None:
        layout = pattern._cache[("u8", str(device))] = pattern.layout.to(device=device, dtype=torch.uint8)
    hs = layout.stride(0) if layout.shape[0] > 1 else 0
    return (kind, p0, p1, p2), layout, (hs, layout.stride(1))


def _kv_descriptors(k, v, block_n):
    """TMA descriptors over (B*H_kv, Nk, D) with (1, BLOCK_N, D) blocks, or None (no TMA unit, or
    strides that a descriptor cannot take). Built from the tensors' own strides (no views: this runs
    at every launch, and the host time counts at short sequences)."""
    if not (_tma_unit(k.device) and _rows_ok(k) and _rows_ok(v)):
        return None
    out = []
    for t in (k, v):
        b, h, n, d = t.shape
        out.append(TensorDescriptor(t, [b * h, n, d], [t.stride(1), t.stride(2), 1], [1, block_n, d]))
    return out


_TMA_DEVICES: dict = {}  # device -> has a TMA unit (asked once: the query costs microseconds a call)


def _tma_unit(device):
    has = _TMA_DEVICES.get(device)
    if has is None:
        has = _TMA_DEVICES[device] = _has_tma(device)
    return has


def _rows_ok(t):
    """t (B, H, N, D) can be read as the (B*H, N, D) rows of a descriptor (``_tma_rows``'s rules,
    without building the view): B and H strides merge, base and strides 16-byte aligned."""
    b, h = t.shape[0], t.shape[1]
    sb, sh, sn, sd = t.stride()
    es = t.element_size()
    return sd == 1 and (b == 1 or sb == h * sh) and t.data_ptr() % 16 == 0 and sh * es % 16 == 0 and sn * es % 16 == 0


def _scratch(size, alignment, stream):
    """Global scratch of kernels that build descriptors on the device (128 bytes each per program)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator():
    """Give Triton an allocator for device-built descriptors unless the caller set one (the setting
    is per thread: autograd runs the backward in a thread of its own)."""
    current = _allocation._allocator
    current = current.get() if hasattr(current, "get") else current
    if isinstance(current, _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def _desc_mode(a, b, tiles):
    """How the kernel reads two (B, H, N, D) tensors, as ``tiles`` asks (its TMA and DESC_DEV flags
    are removed): "dev" (descriptors each program builds), "host" (host descriptors) or None
    (plain pointers: no TMA unit, or strides a descriptor cannot take)."""
    tma, dev = tiles.pop("TMA", False), tiles.pop("DESC_DEV", False)
    if not (tma and _tma_unit(a.device) and _rows_ok(a) and _rows_ok(b)):
        return None
    return "dev" if dev else "host"


def _desc_spec(a, b, block):
    """Fields (all but the base) of host descriptors over the two tensors' (B*H, N, D) rows with
    (1, block, D) blocks; built (and so validated) once here, then copied per call by ``_descs``."""
    out = []
    for t in (a, b):
        d = TensorDescriptor(t, [t.shape[0] * t.shape[1], t.shape[2], t.shape[3]], [t.stride(1), t.stride(2), 1],
                             [1, block, t.shape[3]])
        out.append({f: v for f, v in vars(d).items() if f != "base"})
    return tuple(out)


class _Plan(NamedTuple):
    """A range kernel's launch for one call signature: the cached launch, the spec of the two host
    descriptors it takes (None: it takes the tensors) and its scalar arguments."""
    launch: CachedLaunch
    desc: tuple | None
    scalars: tuple


def _descs(plan, a, b):
    """The plan's two descriptor arguments for tensors a, b (host descriptors, or a, b)."""
    if plan.desc is None:
        return a, b
    out = []
    for t, fields in zip((a, b), plan.desc):  # the plan's key holds t's strides and alignment: valid
        d = _new_desc(TensorDescriptor)
        d.__dict__.update(fields)
        d.base = t
        out.append(d)
    return out


_new_desc = object.__new__
_PLANS: dict = {}  # call signature -> _Plan (or None: the list kernels)
_PLAN_LIMIT = 512
DIRECT_LAUNCH = True  # later calls of a signature skip Triton's binder (``_sparse_launch.py``); benchmarks compare


def _override_key():
    return tuple((k, tuple(sorted(t.items()))) for k, t in sorted(TILE_OVERRIDE.items())) if TILE_OVERRIDE else ()


def _plan(stage, build, pattern, sm_scale, *tensors):
    """The cached plan of ``stage`` for this call signature: shapes, strides, dtype, device and
    16-byte alignment of ``tensors``, pattern, scale and tile override; built by ``build()``."""
    key = (stage, pattern, sm_scale, tensors[0].dtype, tensors[0].device, DIRECT_LAUNCH, _override_key(),
           *signature(tensors))
    plan = _PLANS.get(key, _PLANS)
    if plan is _PLANS:
        if len(_PLANS) >= _PLAN_LIMIT:
            _PLANS.clear()
        plan = _PLANS[key] = build()
    return plan


def _ensure_dev_allocator(mode):
    if mode == "dev" and not INTERPRET:
        _ensure_allocator()


def _range_pre(pattern, tiles, key_tiles=False):
    """Prefix tile width of the range kernels for this pattern and tiles, or None when they do
    not apply (block layouts; S2 blocks that are not a tile width, or, for dK/dV, not BLOCK_N)."""
    if not tiles.pop("RANGES", False):
        return None
    pre = tiles.pop("PRE_N", min(tiles["BLOCK_N"], 64))
    kind, p0 = pattern.kernel_params()[:2]
    if kind == KIND_SINK_WINDOW:
        return pre
    ok = kind == KIND_S2 and p0 in (16, 32, 64, 128) and (not key_tiles or p0 == tiles["BLOCK_N"])
    return p0 if ok else None


def _fwd_plan(q, k, v, pattern, sm_scale):
    """The range forward's plan, or None when the pattern takes the list kernels."""
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    tiles = _stage_tiles("fwd", D, pattern.kernel_params()[0])
    pre_n = _range_pre(pattern, tiles)
    if pre_n is None:
        return None
    kind, p0, p1, p2 = pattern.kernel_params()
    mode = _desc_mode(k, v, tiles)
    m_tiles = host_cdiv(Nq, tiles["BLOCK_M"])
    fast = tiles.pop("HEADS_FAST", False)
    tma = mode is not None
    consts = dict(KIND=kind, HEAD_DIM=D, UPCAST=needs_upcast(q), TMA=tma, PRE_TMA=tma and pre_n == tiles["BLOCK_N"],
                  PRE_N=pre_n, HEADS_FAST=fast, DESC_DEV=mode == "dev", **tiles)
    o_strides = (H * Nq * D, Nq * D, D)  # O is allocated contiguous
    scalars = (sm_scale * _LOG2E, *_all_strides(q, k, v), *o_strides,
               H, H // Hkv, Nq, Nk, m_tiles, p0, p1, p2)
    grid = (B * H, m_tiles) if fast else (m_tiles, B * H)
    return _Plan(CachedLaunch(_range_fwd, grid, consts, DIRECT_LAUNCH),
                 _desc_spec(k, v, tiles["BLOCK_N"]) if mode == "host" else None, (mode,) + scalars)


def _range_forward(q, k, v, plan):
    """Forward through the range kernel (``_sparse_ranges.py``)."""
    B, H, Nq, _ = q.shape
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    _ensure_dev_allocator(plan.scalars[0])
    plan.launch(q, k, v, *_descs(plan, k, v), o, lse, *plan.scalars[1:])
    return o, lse


def _forward(q, k, v, pattern, sm_scale):
    """Returns O (like q) and the base-2 row logsumexp L, (B, H, Nq) fp32."""
    plan = _plan("fwd", lambda: _fwd_plan(q, k, v, pattern, sm_scale), pattern, sm_scale, q, k, v)
    if plan is not None:
        return _range_forward(q, k, v, plan)
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    tiles = _stage_tiles("fwd", D, pattern.kernel_params()[0])
    for key in ("RANGES", "PRE_N", "HEADS_FAST", "DESC_DEV"):  # the list kernels take host descriptors only
        tiles.pop(key, None)
    bm, bn = tiles["BLOCK_M"], tiles["BLOCK_N"]
    lists = tile_lists(pattern, H, Nq, Nk, bm, bn, q.device)
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    kv = (k, v)
    if tiles.pop("TMA", False):
        kv = _kv_descriptors(k, v, bn) or kv
    runs = tiles.pop("RUNS", False)
    run_len = lists.full_idx  # unused without runs
    if runs:
        lists, run_len = lists.as_runs()
    (kind, p0, p1, p2), layout, lstrides = _pattern_args(pattern, q.device, lists.full_cnt)
    ptrs, list_strides = _list_args(lists)
    m_tiles = triton.cdiv(Nq, bm)
    _sparse_fwd[(m_tiles, B * H)](
        q, *kv, o, lse, sm_scale * _LOG2E, *ptrs, layout, run_len,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o), *list_strides, *lstrides,
        H, H // Hkv, Nq, Nk, m_tiles, p0, p1, p2,
        KIND=kind, HEAD_DIM=D, UPCAST=needs_upcast(q), TMA=kv[0] is not k, RUNS=runs, **tiles)
    return o, lse


def _backward(do, q, k, v, o, lse, pattern, sm_scale):
    B, H, Nq, D = q.shape
    do = last_dim_contiguous(do)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    delta = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    plans = _plan("bwd", lambda: _fused_plans(do, q, k, v, o, dq, dk, dv, pattern, sm_scale), pattern, sm_scale,
                  q, k, v, do, o)
    if plans is not None:
        # the range dQ kernel computes D = rowsum(dO * O) itself; dK/dV, launched after it, reads D
        dq_plan, dkdv_plan = plans
        _ensure_dev_allocator(dq_plan.scalars[0])
        dq_plan.launch(q, k, v, *_descs(dq_plan, k, v), do, dq, lse, delta, o, *dq_plan.scalars[1:])
        _ensure_dev_allocator(dkdv_plan.scalars[0])
        dkdv_plan.launch(q, k, v, do, *_descs(dkdv_plan, q, do), dk, dv, lse, delta, *dkdv_plan.scalars[1:])
        return dq, dk, dv
    _bwd_preprocess[(triton.cdiv(Nq, 64), B * H)](
        o, do, delta, *_strides(o), *_strides(do), H, Nq, HEAD_DIM=D, BLOCK_M=64)
    _backward_dkdv(do, q, k, v, dk, dv, lse, delta, pattern, sm_scale)
    _backward_dq(do, q, k, v, dq, lse, delta, pattern, sm_scale)
    return dq, dk, dv


def _fused_plans(do, q, k, v, o, dq, dk, dv, pattern, sm_scale):
    """(dQ plan, dK/dV plan) when both take range kernels and dQ computes delta (dQ, dK, dV are
    allocated contiguous, so their strides follow from the shapes in the key), else None."""
    tiles = _stage_tiles("dq", q.shape[3], pattern.kernel_params()[0])
    if not (tiles.get("FUSE_DELTA") and _range_pre(pattern, tiles) is not None):
        return None
    dq_plan = _dq_plan(do, q, k, v, dq, o, pattern, sm_scale, True)
    dkdv_plan = _dkdv_plan(do, q, k, v, dk, dv, pattern, sm_scale)
    return None if dkdv_plan is None else (dq_plan, dkdv_plan)


def _dkdv_plan(do, q, k, v, dk, dv, pattern, sm_scale):
    """The range dK/dV kernel's plan (q, dO through descriptors as the tiles ask), or None."""
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    tiles = _stage_tiles("dkdv", D, pattern.kernel_params()[0])
    if _range_pre(pattern, tiles, key_tiles=True) is None:
        return None
    fast = tiles.pop("HEADS_FAST", False)
    for key in ("PRE_N", "RUNS"):
        tiles.pop(key, None)
    mode = _desc_mode(q, do, tiles)
    n_tiles = host_cdiv(Nk, tiles["BLOCK_N"])
    kind, p0, p1, p2 = pattern.kernel_params()
    scalars = (sm_scale * _LOG2E, sm_scale, *_all_strides(q, k, v, do, dk, dv), H, Hkv, H // Hkv, Nq, Nk, p0, p1, p2)
    consts = dict(KIND=kind, HEAD_DIM=D, UPCAST=needs_upcast(q), HEADS_FAST=fast, TMA=mode is not None,
                  DESC_DEV=mode == "dev", **tiles)
    grid = (B * Hkv, n_tiles) if fast else (n_tiles, B * Hkv)
    return _Plan(CachedLaunch(_range_bwd_dkdv, grid, consts, DIRECT_LAUNCH),
                 _desc_spec(q, do, tiles["BLOCK_M"]) if mode == "host" else None, (mode,) + scalars)


def _backward_dkdv(do, q, k, v, dk, dv, lse, delta, pattern, sm_scale):
    plan = _plan("dkdv", lambda: _dkdv_plan(do, q, k, v, dk, dv, pattern, sm_scale), pattern, sm_scale, q, k, v, do,
                 dk, dv)
    if plan is not None:
        _ensure_dev_allocator(plan.scalars[0])
        plan.launch(q, k, v, do, *_descs(plan, q, do), dk, dv, lse, delta, *plan.scalars[1:])
        return
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    tiles, (kind, p0, p1, p2), lists, list_strides = _list_stage("dkdv", pattern, q, k, by_key=True)
    n_tiles = host_cdiv(Nk, tiles["BLOCK_N"])
    _sparse_bwd_dkdv[(n_tiles, B * Hkv)](
        q, k, v, do, dk, dv, lse, delta, sm_scale * _LOG2E, sm_scale, *lists, *_all_strides(q, k, v, do, dk, dv),
        *list_strides, H, Hkv, H // Hkv, Nq, Nk, n_tiles, p0, p1, p2,
        KIND=kind, HEAD_DIM=D, UPCAST=needs_upcast(q), **tiles)


_RANGE_FLAGS = ("RANGES", "PRE_N", "RUNS", "FUSE_DELTA", "HEADS_FAST", "TMA", "DESC_DEV")


def _list_stage(stage, pattern, q, k, by_key=False):
    """Tiles, pattern parameters, (list pointers, layout) and their strides of a backward list
    kernel (block layouts, and S2 blocks the range kernels do not take)."""
    H, Nq, D = q.shape[1], q.shape[2], q.shape[3]
    tiles = _stage_tiles(stage, D, pattern.kernel_params()[0])
    for key in _RANGE_FLAGS:
        tiles.pop(key, None)
    lists = tile_lists(pattern, H, Nq, k.shape[2], tiles["BLOCK_M"], tiles["BLOCK_N"], q.device, by_key=by_key)
    _, layout, lstrides = _pattern_args(pattern, q.device, lists.full_cnt)
    ptrs, list_strides = _list_args(lists)
    return tiles, pattern.kernel_params(), (*ptrs, layout), (*list_strides, *lstrides)


def _all_strides(*tensors):
    return tuple(s for t in tensors for s in _strides(t))


def _dq_plan(do, q, k, v, dq, o, pattern, sm_scale, fused):
    """The range dQ kernel's plan (K, V through descriptors as the tiles ask), or None. ``o``: O
    (fused: the kernel also computes delta from it) or dQ (unused)."""
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    tiles = _stage_tiles("dq", D, pattern.kernel_params()[0])
    pre_n = _range_pre(pattern, tiles)
    if pre_n is None:
        return None
    fast = tiles.pop("HEADS_FAST", False)
    for key in ("PRE_N", "RUNS", "FUSE_DELTA"):
        tiles.pop(key, None)
    mode = _desc_mode(k, v, tiles)
    m_tiles = host_cdiv(Nq, tiles["BLOCK_M"])
    kind, p0, p1, p2 = pattern.kernel_params()
    scalars = (sm_scale * _LOG2E, sm_scale, *_all_strides(q, k, v, do, dq, o), H, H // Hkv, Nq, Nk, m_tiles, p0, p1, p2)
    consts = dict(KIND=kind, HEAD_DIM=D, UPCAST=needs_upcast(q), PRE_N=pre_n, HEADS_FAST=fast, FUSE_DELTA=fused,
                  TMA=mode is not None, DESC_DEV=mode == "dev", **tiles)
    grid = (B * H, m_tiles) if fast else (m_tiles, B * H)
    return _Plan(CachedLaunch(_range_bwd_dq, grid, consts, DIRECT_LAUNCH),
                 _desc_spec(k, v, tiles["BLOCK_N"]) if mode == "host" else None, (mode,) + scalars)


def _backward_dq(do, q, k, v, dq, lse, delta, pattern, sm_scale, o=None):
    """dQ; with ``o`` (range kernels only) it also writes ``delta`` = rowsum(dO * O)."""
    fused = o is not None
    o = o if fused else dq
    plan = _plan("dq_fused" if fused else "dq", lambda: _dq_plan(do, q, k, v, dq, o, pattern, sm_scale, fused),
                 pattern, sm_scale, q, k, v, do, dq, o)
    if plan is not None:
        _ensure_dev_allocator(plan.scalars[0])
        plan.launch(q, k, v, *_descs(plan, k, v), do, dq, lse, delta, o, *plan.scalars[1:])
        return
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    tiles, (kind, p0, p1, p2), lists, list_strides = _list_stage("dq", pattern, q, k)
    m_tiles = host_cdiv(Nq, tiles["BLOCK_M"])
    _sparse_bwd_dq[(m_tiles, B * H)](
        q, k, v, do, dq, lse, delta, sm_scale * _LOG2E, sm_scale, *lists, *_all_strides(q, k, v, do, dq),
        *list_strides, H, H // Hkv, Nq, Nk, m_tiles, p0, p1, p2,
        KIND=kind, HEAD_DIM=D, UPCAST=needs_upcast(q), **tiles)


# --------------------------------------------------------------------------
# autograd.Function and dispatcher
# --------------------------------------------------------------------------
class SparseAttentionFunction(torch.autograd.Function):
    """Triton block-sparse attention; saves q, k, v, O and the row logsumexp only."""

    @staticmethod
    def forward(ctx, q, k, v, pattern, sm_scale):
        q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
        o, lse = _forward(q, k, v, pattern, sm_scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.pattern = pattern
        ctx.sm_scale = sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, ctx.pattern, ctx.sm_scale)
        return dq, dk, dv, None, None


# Function.apply without its Python wrapper (which binds default arguments and unwraps functorch's
# dead wrappers, neither of which this Function needs outside functorch transforms): ~10 us a call.
_APPLY = super(torch.autograd.Function, SparseAttentionFunction).apply
_VALID: set = set()  # call signatures (shapes, dtypes, devices, pattern) that passed the checks


def _check_call(q, k, v, pattern) -> None:
    """The input checks, once per call signature (they cost as much as the rest of the wrapper)."""
    try:
        key = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, pattern)
        if key in _VALID:
            return
    except (AttributeError, TypeError):  # not tensors, or an unhashable pattern: the checks say what is wrong
        key = None
    check_kernel_inputs(q, k, v)
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"sparse attention needs Nq <= Nk, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    check_pattern(pattern, q.shape[1], k.shape[2])
    if key is not None:
        if len(_VALID) >= _PLAN_LIMIT:
            _VALID.clear()
        _VALID.add(key)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern,
                     sm_scale: float | None = None) -> torch.Tensor:
    """Causal attention on (B, H, N, D) tensors restricted to ``pattern``'s visible keys.

    Args:
        q: (B, H, Nq, D) queries, float16 / bfloat16 / float32.
        k, v: (B, H_kv, Nk, D), H a multiple of H_kv, Nk >= Nq (query i at key position Nk - Nq + i).
        pattern: :class:`SinkWindow`, :class:`S2Strided` or :class:`BlockLayout`.
        sm_scale: softmax scale, default 1/sqrt(D).

    Returns:
        (B, H, Nq, D) tensor of q's dtype; rows that see no key are zero.

    Raises:
        ValueError: on shapes, dtypes, devices, head dims or patterns it does not support.
    """
    _check_call(q, k, v, pattern)
    scale = float(q.shape[-1] ** -0.5 if sm_scale is None else sm_scale)
    if not (q.is_cuda or INTERPRET):
        return sparse_attention_reference(q, k, v, pattern, sm_scale=scale)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        if torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling():
            return SparseAttentionFunction.apply(q, k, v, pattern, scale)
        return _APPLY(q, k, v, pattern, scale)
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    return _forward(q, k, v, pattern, scale)[0]
