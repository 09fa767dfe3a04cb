"""Range kernels of sparse attention (``_sparse_ranges.py``) against the float64 reference.

SinkWindow and S2Strided through the list-free kernels: forward (pointer and TMA loads, prefix
tiles narrower than the band's or as wide, grids with heads fastest), dQ (with rowsum(dO * O)
computed in the dQ kernel or in its own pass), dK/dV (descriptor loads: host-encoded, or built by
the kernel, and the pointer fallback when strides rule descriptors out),
at small shapes in the interpreter (ragged N, GQA, Nq != Nk, windows and sinks that are not tile
multiples, tiny windows). A negative control checks that the comparison can fail.
"""

import os
import sys

import pytest
import torch

_CPU = not torch.cuda.is_available()
_LATE = _CPU and os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and "triton" in sys.modules
if _CPU:
    os.environ["TRITON_INTERPRET"] = "1"

from srl.kernels.sparse_attention import TILE_OVERRIDE, S2Strided, SinkWindow, sparse_attention  # noqa: E402
from tests.test_sparse_attention import TOL, check_against_reference, make_qkv, rel_err  # noqa: E402

pytestmark = pytest.mark.skipif(_LATE, reason="triton was imported before TRITON_INTERPRET was set")


def ranges(block_m, block_n, **extra):
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=1, RANGES=True, **extra)


DEV = {"TMA": True, "DESC_DEV": True}


def use(fwd, dkdv, dq):
    TILE_OVERRIDE.clear()
    TILE_OVERRIDE.update(fwd=fwd, dkdv=dkdv, dq=dq)


CASES = [  # (pattern, B, H, H_kv, Nq, Nk, D, fwd tiles, dK/dV tiles, dQ tiles)
    (SinkWindow(32, 40), 1, 4, 2, 200, 200, 32, ranges(32, 32), ranges(16, 32), ranges(32, 16, FUSE_DELTA=True)),
    (SinkWindow(16, 37), 1, 2, 1, 77, 200, 16, ranges(32, 32, PRE_N=16, TMA=True, HEADS_FAST=True),
     ranges(32, 16, HEADS_FAST=True), ranges(16, 32, HEADS_FAST=True)),
    (SinkWindow(0, 33), 2, 2, 2, 50, 150, 32, ranges(16, 32, TMA=True), ranges(32, 32), ranges(32, 32)),
    (SinkWindow(5, 3), 1, 2, 1, 90, 90, 16, ranges(32, 16), ranges(16, 16), ranges(32, 16)),
    (S2Strided(16, 2, 4), 1, 4, 4, 200, 200, 32, ranges(32, 16, TMA=True), ranges(32, 16), ranges(32, 16)),
    (S2Strided(16, 3, 3), 1, 6, 2, 130, 203, 16, ranges(64, 32, HEADS_FAST=True),
     ranges(16, 16, HEADS_FAST=True), ranges(16, 32, HEADS_FAST=True, FUSE_DELTA=True)),
    (S2Strided(32, 1, 2), 1, 2, 1, 256, 256, 32, ranges(32, 32, TMA=True), ranges(16, 32), ranges(32, 32)),
    # descriptors built by the kernels (DESC_DEV), for K/V in the forward and dQ, q/dO in dK/dV
    (SinkWindow(16, 37), 2, 2, 1, 77, 200, 16, ranges(32, 32, PRE_N=16, **DEV), ranges(32, 16, HEADS_FAST=True, **DEV),
     ranges(16, 32, HEADS_FAST=True, FUSE_DELTA=True, **DEV)),
    # host descriptors in the backward; S2 prefix through the descriptors (PRE_N == BLOCK_N)
    (S2Strided(16, 2, 4), 1, 4, 2, 100, 130, 16, ranges(32, 16, **DEV), ranges(16, 16, TMA=True),
     ranges(32, 16, TMA=True)),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_range_kernels_match_float64(case):
    pattern, b, h, h_kv, n_q, n_k, d, fwd, dkdv, dq = CASES[case]
    q, k, v = make_qkv(b, h, h_kv, n_q, n_k, d, torch.float32, seed=10 + case)
    use(fwd, dkdv, dq)
    try:
        check_against_reference(q, k, v, pattern, TOL[torch.float32])
    finally:
        TILE_OVERRIDE.clear()


def test_s2_blocks_that_are_not_a_tile_width_take_the_list_kernels():
    """A 24-token block cannot be a strided tile: the lists serve it, with the same result."""
    q, k, v = make_qkv(1, 3, 1, 77, 120, 16, torch.float32, seed=3)
    use(ranges(32, 32), ranges(32, 32), ranges(32, 32))
    try:
        check_against_reference(q, k, v, S2Strided(24, 1, 3), TOL[torch.float32])
    finally:
        TILE_OVERRIDE.clear()


def test_negative_control_a_wider_window_is_caught():
    q, k, v = make_qkv(1, 2, 1, 120, 120, 16, torch.float32, seed=5)
    use(ranges(32, 32), ranges(32, 32), ranges(32, 32))
    try:
        with torch.no_grad():
            out = sparse_attention(q, k, v, SinkWindow(4, 30))
            other = sparse_attention(q, k, v, SinkWindow(4, 31))
    finally:
        TILE_OVERRIDE.clear()
    assert rel_err(out, other) > 1e-4


def test_device_descriptors_fall_back_to_pointers_on_unmergeable_strides():
    """q, k, v stored head-major ((H, B, N, D) seen as (B, H, N, D)): the (B, H) strides do not
    merge into descriptor rows, so the DESC_DEV kernels take pointer loads, with the same result."""
    sa = sys.modules["srl.kernels.sparse_attention"]
    q, k, v = make_qkv(2, 4, 2, 60, 60, 16, torch.float32, seed=7)
    q, k, v = (t.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_() for t in (q, k, v))
    assert not sa._rows_ok(q) and sa._desc_mode(k, v, {"TMA": True, "DESC_DEV": True}) is None
    use(ranges(32, 16, **DEV), ranges(16, 16, **DEV), ranges(32, 16, **DEV))
    try:
        check_against_reference(q, k, v, SinkWindow(4, 20), TOL[torch.float32])
    finally:
        TILE_OVERRIDE.clear()


def test_allocator_for_device_descriptors_keeps_the_callers():
    """Triton needs an allocator for kernel-built descriptors: ours only where none is set."""
    import triton
    from triton.runtime import _allocation

    sa = sys.modules["srl.kernels.sparse_attention"]

    def current():
        a = _allocation._allocator
        return a.get() if hasattr(a, "get") else a

    def mine(size, alignment, stream):
        return torch.empty(size, dtype=torch.int8)
    before = current()
    try:
        triton.set_allocator(_allocation.NullAllocator())
        sa._ensure_allocator()
        assert current() is sa._scratch
        triton.set_allocator(mine)
        sa._ensure_allocator()
        assert current() is mine
    finally:
        triton.set_allocator(before)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 8, 8, 3000, 3000, 128), (2, 8, 2, 1000, 1333, 64)])
def test_gpu_device_descriptors_bf16(shape):
    """The shipped tile shapes with kernel-built descriptors in all three kernels (the backward runs
    in autograd's thread, which needs an allocator of its own)."""
    b, h, h_kv, n_q, n_k, d = shape
    q, k, v = make_qkv(b, h, h_kv, n_q, n_k, d, torch.bfloat16, seed=n_q)
    use(ranges(64, 64, **DEV) | {"num_stages": 3}, ranges(64, 64, HEADS_FAST=True, **DEV),
        ranges(128, 64, HEADS_FAST=True, FUSE_DELTA=True, **DEV) | {"num_warps": 8, "num_stages": 3})
    try:
        for pattern in (SinkWindow(64, 1024), S2Strided(64, 4, 8)):
            for t in (q, k, v):
                t.grad = None
            check_against_reference(q, k, v, pattern, TOL[torch.bfloat16])
    finally:
        TILE_OVERRIDE.clear()
