"""CATS: a gated MLP whose small gate activations are zeroed, and a decode kernel that skips them.

CATS (Lee et al. 2024, "Contextually-Aware Thresholding for Sparsity in Large Language Models")
replaces the gate activation SiLU(x W_gate) of a gated MLP by t(SiLU(x W_gate)), where
t(a) = a where |a| > threshold and 0 elsewhere, with a per-layer threshold calibrated for a target
sparsity (``srl.generation.cats_calibration``). Wherever t(a) is 0 the matching row of W_up and
of W_down^T contributes nothing, so at small batch (decode, bound by reading weights) a kernel
that reads only the active rows moves about (1 + 2 (1 - sparsity)) / 3 of the dense bytes.

Weights use nn.Linear layouts: gate and up (F, D), down (D, F). The decode path reads rows of
down^T, so down is best stored transposed once (``transpose_down_storage``: the same (D, F)
tensor over (F, D) row-major storage); any other layout is transposed on every call.

Decode path (batch M <= 16, three launches, capturable in a CUDA graph):
1. ``_cats_gate_up``, one program per BLOCK_F rows of F: the gate rows densely (x @ W_gate^T),
   SiLU, the threshold; a row is active when any of the M batch rows keeps it. Only the active
   rows of W_up are loaded (masked-off loads read no memory); act = t(silu(g)) * (x @ W_up^T).
   Active rows are appended to a compact list (index, act) through an atomic counter.
2. ``_cats_down``, programs over (D columns, splits of the active list): out[m, :] +=
   act[m, k] * W_down^T[idx[k], :], each active row a contiguous read; splits add up atomically
   into a float32 buffer.
3. ``_cats_finish``: the float32 buffer to the output dtype; it zeroes the buffer and the counter
   behind itself, so the workspace needs no memset before the next call.
The list's order depends on program timing, so results can differ between calls in the last bits
of the float32 sum. Above ``KERNEL_MAX_BATCH`` rows the union of active rows nears F (with
independent rows 1 - sparsity^M of them) and the dense torch computation is faster.

Measured on the H200 (bf16, 4096 -> 11008 -> 4096, 50% sparsity, CUDA-graph replays): 59.7 us
against 80.9 us for the dense torch MLP at batch 1 (1.36x; the same-bandwidth bound is 1.51x).

Shapes: M rows, D model width, F hidden width.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F_
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
BLOCK_M = 16  # batch rows per tile (tl.dot needs >= 16); the decode path takes M <= BLOCK_M
KERNEL_MAX_BATCH = 12
"""Rows up to which ``cats_mlp`` uses the sparse kernel on CUDA by default: the measured
break-even at 50% sparsity on the H200 with independent random rows (Llama-7B MLP, bf16: 1.36x
at 1 row, 1.01x at 12, 0.99x at 16; benchmarks/kernels/cats.py, docs/benchmarks.md)."""
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# tile configurations: the fastest of a sweep at batch 1 on the H200 (benchmarks/kernels/cats.py,
# 59.5 us per Llama-7B MLP against 60.9-90.6 for the others); one small tile when interpreting
GATE_CONFIG = dict(BLOCK_F=32, BLOCK_D=256, num_warps=4, num_stages=3)
DOWN_CONFIG = dict(BLOCK_N=256, BLOCK_K=16, SPLIT=32, num_warps=4, num_stages=4)
_INTERP_GATE = dict(BLOCK_F=16, BLOCK_D=32)
_INTERP_DOWN = dict(BLOCK_N=32, BLOCK_K=16, SPLIT=2)
_FINISH_BLOCK = 1024


# --------------------------------------------------------------------------- reference

def cats_mlp_reference(x: Tensor, gate_weight: Tensor, up_weight: Tensor, down_weight: Tensor,
                       threshold: float) -> Tensor:
    """(t(silu(x @ gate_weight.T)) * (x @ up_weight.T)) @ down_weight.T in x's dtype (..., D)."""
    a = F_.silu(F_.linear(x, gate_weight))
    a = torch.where(a.abs() > threshold, a, torch.zeros_like(a))
    return F_.linear(a * F_.linear(x, up_weight), down_weight)


def active_rows_reference(x: Tensor, gate_weight: Tensor, threshold: float) -> Tensor:
    """How many of the F hidden units any row of x (..., D) keeps: the rows of up/down read."""
    a = F_.silu(F_.linear(x.reshape(-1, x.shape[-1]), gate_weight))
    return (a.abs() > threshold).any(0).sum()


# --------------------------------------------------------------------------- kernels

@triton.jit
def _x_times_rows(W, rows, row_ok, X, M, D, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_M: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """X (BLOCK_M, D) @ W[rows]^T (D, BLOCK_F) in float32; rows where ``row_ok`` is false read nothing.

    The attention-score pattern (x as the queries, weight rows as the keys): both tiles are
    loaded along D, contiguous, and pipelined."""
    ms = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_F], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        w = tl.load(W + rows[:, None].to(tl.int64) * D + ds[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_F, BLOCK_D)
        x = tl.load(X + ms[:, None] * D + ds[None, :], mask=(ms < M)[:, None] & d_ok[None, :],
                    other=0.0)  # (BLOCK_M, BLOCK_D)
        if UPCAST:
            w = w.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PREC)
    return acc


@triton.jit
def _cats_gate_up(X, WG, WU, COUNT, IDX, ACT, threshold, M, F, D,
                  BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                  UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Dense gate, threshold, active rows of up; append (index, act (BLOCK_M,)) per active row."""
    rows = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    ms = tl.arange(0, BLOCK_M)
    row_ok = rows < F
    g = _x_times_rows(WG, rows, row_ok, X, M, D, BLOCK_F, BLOCK_D, BLOCK_M, UPCAST, PREC)  # (BLOCK_M, BLOCK_F)
    a = g * tl.sigmoid(g)
    keep = (tl.abs(a) > threshold) & (ms < M)[:, None] & row_ok[None, :]
    active = tl.max(keep.to(tl.int32), 0)  # (BLOCK_F,): any batch row keeps it
    u = _x_times_rows(WU, rows, active > 0, X, M, D, BLOCK_F, BLOCK_D, BLOCK_M, UPCAST, PREC)
    act = tl.where(keep, a * u, 0.0)
    base = tl.atomic_add(COUNT, tl.sum(active, 0))
    slot = base + tl.cumsum(active, 0) - 1  # (BLOCK_F,): compact position of each active row
    ok = (active > 0) & (slot < F)
    tl.store(IDX + slot, rows, mask=ok)
    tl.store(ACT + ms[:, None] * F + slot[None, :], act, mask=(ms < M)[:, None] & ok[None, :])


@triton.jit
def _cats_down(COUNT, IDX, ACT, WDT, OUT, M, F, D,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
               BLOCK_M: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """OUT[:, cols] += ACT[:, k] @ W_down^T[IDX[k], cols] over this program's share of the list."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = tl.arange(0, BLOCK_M)
    col_ok = cols < D
    count = tl.minimum(tl.load(COUNT), F)  # never past the list, even on a stale counter
    per = tl.cdiv(tl.cdiv(count, BLOCK_K), SPLIT) * BLOCK_K  # list entries per split
    k_lo = tl.program_id(1) * per
    k_hi = tl.minimum(k_lo + per, count)
    if k_lo < k_hi:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < k_hi
            idx = tl.load(IDX + ks, mask=k_ok, other=0)
            act = tl.load(ACT + ms[:, None] * F + ks[None, :],
                          mask=(ms < M)[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
            w = tl.load(WDT + idx[:, None].to(tl.int64) * D + cols[None, :],
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
            if UPCAST:
                w = w.to(tl.float32)
            acc = tl.dot(act.to(w.dtype), w, acc, input_precision=PREC)
        tl.atomic_add(OUT + ms[:, None] * D + cols[None, :], acc,
                      mask=(ms < M)[:, None] & col_ok[None, :])


@triton.jit
def _cats_finish(OUT, Y, COUNT, ACTIVE, n, BLOCK: tl.constexpr):
    """Y = OUT in Y's dtype; zero OUT and the counter for the next call (count -> ACTIVE first)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    y = tl.load(OUT + offs, mask=ok, other=0.0)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=ok)
    tl.store(OUT + offs, tl.zeros_like(y), mask=ok)
    if tl.program_id(0) == 0:
        tl.store(ACTIVE, tl.load(COUNT))
        tl.store(COUNT, 0)


# --------------------------------------------------------------------------- wrapper

class _Workspace:
    """Buffers one decode call needs; the finish kernel leaves ``out`` and ``count`` at zero."""

    def __init__(self, F: int, D: int, device):
        self.count = torch.zeros(1, dtype=torch.int32, device=device)
        self.active = torch.zeros(1, dtype=torch.int32, device=device)
        self.idx = torch.empty(F, dtype=torch.int32, device=device)
        self.act = torch.empty(BLOCK_M, F, dtype=torch.float32, device=device)
        self.out = torch.zeros(BLOCK_M, D, dtype=torch.float32, device=device)


_WORKSPACES: dict[tuple, _Workspace] = {}


def _workspace(F: int, D: int, device) -> _Workspace:
    """One workspace per (device, F, D): calls on one stream run in order, so they can share it."""
    key = (str(device), F, D)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = _Workspace(F, D, device)
    return _WORKSPACES[key]


def transpose_down_storage(down_weight: Tensor) -> Tensor:
    """``down_weight`` (D, F) with the same values, stored as its transpose: ``.t()`` is contiguous.

    nn.Linear and F.linear take it as they are; the decode kernel then reads active rows of
    down^T without copying. Done once at load (``GatedMLP.enable_cats``)."""
    return down_weight.t().contiguous().t()


def check_cats_inputs(x: Tensor, gate_weight: Tensor, up_weight: Tensor, down_weight: Tensor) -> None:
    """Raise ValueError unless the shapes (x (..., D), gate/up (F, D), down (D, F)) and dtypes agree."""
    D = x.shape[-1]
    if gate_weight.dim() != 2 or gate_weight.shape[1] != D:
        raise ValueError(f"gate_weight must be (F, D={D}), got {tuple(gate_weight.shape)}")
    F = gate_weight.shape[0]
    if tuple(up_weight.shape) != (F, D):
        raise ValueError(f"up_weight must be (F, D) = {(F, D)}, got {tuple(up_weight.shape)}")
    if tuple(down_weight.shape) != (D, F):
        raise ValueError(f"down_weight must be (D, F) = {(D, F)}, got {tuple(down_weight.shape)}")
    for name, t in (("gate_weight", gate_weight), ("up_weight", up_weight), ("down_weight", down_weight)):
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device}; x is {x.dtype} on {x.device}")


def _down_t(down_weight: Tensor) -> Tensor:
    t = down_weight.t()
    return t if t.is_contiguous() else t.contiguous()


def _launch_gate_down(x: Tensor, gate_weight: Tensor, up_weight: Tensor, down_weight: Tensor,
                      threshold: float, ws: "_Workspace", gate_config: dict | None,
                      down_config: dict | None) -> None:
    """Steps 1 and 2 of the decode path: the active rows' contributions summed into ``ws.out``."""
    M, D = x.shape
    F = gate_weight.shape[0]
    upcast = INTERPRET and x.dtype != torch.float32
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    g = dict(_INTERP_GATE) if INTERPRET else dict(gate_config or GATE_CONFIG)
    d = dict(_INTERP_DOWN) if INTERPRET else dict(down_config or DOWN_CONFIG)
    _cats_gate_up[(triton.cdiv(F, g["BLOCK_F"]),)](
        x, gate_weight.contiguous(), up_weight.contiguous(), ws.count, ws.idx, ws.act,
        float(threshold), M, F, D, BLOCK_M=BLOCK_M, UPCAST=upcast, PREC=prec, **g)
    _cats_down[(triton.cdiv(D, d["BLOCK_N"]), d["SPLIT"])](
        ws.count, ws.idx, ws.act, _down_t(down_weight), ws.out, M, F, D,
        BLOCK_M=BLOCK_M, UPCAST=upcast, PREC=prec, **d)


def _check_kernel_rows(x: Tensor) -> None:
    if not 1 <= x.shape[0] <= BLOCK_M:
        raise ValueError(f"x must have 1..{BLOCK_M} rows for the decode kernel, got {x.shape[0]}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"dtype {x.dtype} is not supported; use float16, bfloat16 or float32")


def cats_mlp_partial(x: Tensor, gate_weight: Tensor, up_weight: Tensor, down_weight: Tensor,
                     threshold: float, down_config: dict | None = None) -> tuple[Tensor, Tensor]:
    """The decode path without its final cast, for a caller that fuses it into its next kernel.

    Returns (acc, counter): the float32 sum (M, D), a view of the shared workspace, and the int32
    active-row counter. The caller must read acc and then zero both acc and counter before the
    next CATS call on this device and shape (``srl.kernels.decode_step.residual_norm`` does)."""
    _check_kernel_rows(x)
    x = x.contiguous()
    ws = _workspace(gate_weight.shape[0], x.shape[1], x.device)
    try:
        _launch_gate_down(x, gate_weight, up_weight, down_weight, threshold, ws, None, down_config)
    except Exception:
        ws.count.zero_()
        ws.out.zero_()
        raise
    return ws.out[:x.shape[0]], ws.count


def cats_mlp_kernel(x: Tensor, gate_weight: Tensor, up_weight: Tensor, down_weight: Tensor,
                    threshold: float, gate_config: dict | None = None,
                    down_config: dict | None = None) -> tuple[Tensor, Tensor]:
    """The Triton decode path on x (M, D), M <= 16: (y (M, D), active rows (1,) int32).

    ``gate_config`` / ``down_config`` override the tile tables (the benchmark sweeps them)."""
    M, D = x.shape
    F = gate_weight.shape[0]
    _check_kernel_rows(x)
    x = x.contiguous()
    ws = _workspace(F, D, x.device)
    y = torch.empty_like(x)
    try:
        _launch_gate_down(x, gate_weight, up_weight, down_weight, threshold, ws, gate_config, down_config)
        _cats_finish[(triton.cdiv(M * D, _FINISH_BLOCK),)](
            ws.out, y, ws.count, ws.active, M * D, BLOCK=_FINISH_BLOCK)
    except Exception:  # a launch that fails (e.g. a tile the compiler rejects) leaves no stale counts
        ws.count.zero_()
        ws.out.zero_()
        raise
    return y, ws.active


def _kernel_wanted(x2: Tensor, weights: tuple[Tensor, ...], use_kernel: bool | None) -> bool:
    if use_kernel is not None:
        return use_kernel
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x2, *weights))
    return x2.is_cuda and not grad and x2.shape[0] <= KERNEL_MAX_BATCH


def cats_mlp(x: Tensor, gate_weight: Tensor, up_weight: Tensor, down_weight: Tensor,
             threshold: float, use_kernel: bool | None = None, return_active: bool = False):
    """CATS gated MLP: (t(silu(x @ gate_weight.T)) * (x @ up_weight.T)) @ down_weight.T.

    Args:
        x: (..., D) input rows; gate_weight, up_weight (F, D); down_weight (D, F) (nn.Linear
            layouts; ``transpose_down_storage`` makes the decode path's read of down^T free).
        threshold: t(a) keeps a where |a| > threshold; 0 keeps every nonzero activation.
        use_kernel: the Triton decode path (needs at most 16 rows); default: on CUDA, without
            autograd, for at most ``KERNEL_MAX_BATCH`` rows. Otherwise dense torch ops.
        return_active: also return how many hidden units any row keeps (rows of up/down read).
    Returns:
        y (..., D) in x's dtype, and with ``return_active`` a 0-dim integer tensor.
    """
    check_cats_inputs(x, gate_weight, up_weight, down_weight)
    x2 = x.reshape(-1, x.shape[-1])  # (M, D)
    if _kernel_wanted(x2, (gate_weight, up_weight, down_weight), use_kernel):
        y, active = cats_mlp_kernel(x2, gate_weight, up_weight, down_weight, threshold)
        # the count is copied only when asked for: a copy is one more launch per decode layer
        y, active = y.view(x.shape), (active[0].clone() if return_active else None)
    else:
        y = cats_mlp_reference(x, gate_weight, up_weight, down_weight, threshold)
        active = active_rows_reference(x2, gate_weight, threshold) if return_active else None
    return (y, active) if return_active else y
