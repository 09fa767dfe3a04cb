"""Helpers shared by the FlashAttention kernels: interpreter mode, input checks, autotuning, jit helpers."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Triton decides at decoration time whether a kernel is interpreted, so this is
# read once, at import, the same way.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# Autotuning compiles and times every config at each new shape class (minutes at
# first use); by default the launchers use the tuned tile table instead.
TUNE = os.environ.get("SRL_FLASH_AUTOTUNE", "0") == "1" and not INTERPRET
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ValueError unless q (B, H, Nq, D) and k, v (B, H_kv, Nk, D) form a valid attention call."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, N, D), got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    B, H, Nq, D = q.shape
    Bk, Hkv, Nk, Dk = k.shape
    if Bk != B or Dk != D:
        raise ValueError(
            f"q (B, H, Nq, D) = {tuple(q.shape)} and k/v (B, H_kv, Nk, D) = {tuple(k.shape)} "
            "must agree on batch size B and head dim D")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"q heads H={H} must be a multiple of k/v heads H_kv={Hkv} (grouped-query attention)")
    if Nq == 0 or Nk == 0 or B == 0 or H == 0:
        raise ValueError(f"empty input: q {tuple(q.shape)}, k/v {tuple(k.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def check_kernel_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """``check_inputs`` plus the head dims and dtypes the Triton kernels support."""
    check_inputs(q, k, v)
    D = q.shape[-1]
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim D={D} (q shape {tuple(q.shape)}) is not supported; use one of {SUPPORTED_HEAD_DIMS}")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"dtype {q.dtype} is not supported; use float16, bfloat16 or float32")


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def needs_upcast(t: torch.Tensor) -> bool:
    """The interpreter computes bf16 ``tl.dot`` on raw bit patterns: upcast after load."""
    return INTERPRET and t.dtype == torch.bfloat16


def autotune(configs, key, prune=None):
    """``triton.autotune`` when SRL_FLASH_AUTOTUNE=1 on a GPU, else a no-op.

    ``configs`` is a callable returning the config list. Without autotuning (and
    always under the interpreter) the launcher passes one tile configuration.
    """
    if not TUNE:
        return lambda fn: fn
    kwargs = {}
    if prune is not None:
        kwargs["prune_configs_by"] = {"early_config_prune": prune}
    return triton.autotune(configs=configs(), key=key, **kwargs)


def constexpr_arg(name, named_args, kwargs):
    """Look up a launch argument in an autotune prune hook (positional or keyword)."""
    if name in named_args:
        return named_args[name]
    return kwargs[name]


def launch(kernel, grid, args, meta, config):
    """Launch with ``config`` (dict of tile sizes, num_warps, num_stages) unless autotuning.

    ``grid`` maps the tile sizes to the launch grid.
    """
    if TUNE:
        kernel[lambda m: grid(m)](*args, **meta)
    else:
        kernel[grid(config)](*args, **meta, **config)


@triton.jit
def load_kv_tile(k_ptrs, v_ptrs, col_ok, MASKED: tl.constexpr, UPCAST: tl.constexpr):
    """One (BLOCK_N, HEAD_DIM) tile of K and V; ``col_ok`` masks keys past the end."""
    if MASKED:
        k = tl.load(k_ptrs, mask=col_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def load_kv_desc(k_desc, v_desc, row, start_n, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
                 HEAD_DIM: tl.constexpr):
    """The K and V tiles at keys [start_n, start_n + BLOCK_N) of ``row``, through TMA descriptors
    over (rows, N_K, D) with block (1, BLOCK_N, HEAD_DIM): keys past N_K arrive as zeros."""
    k = k_desc.load([row, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
    v = v_desc.load([row, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def online_softmax_step(s, m_i, l_i, acc):
    """Fold masked base-2 logits ``s`` into the running max, sum and rescaled accumulator.

    A row with no visible key so far keeps m = -inf and is shifted by 0 instead, so it stays
    exactly zero rather than NaN. Returns (p, m_new, l_i, acc); the caller adds p @ V to acc."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_shift[:, None])
    alpha = tl.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    return p, m_new, l_i, acc


@triton.jit
def online_softmax_step_unmasked(qk, qk_scale, m_i, l_i, acc):
    """``online_softmax_step`` for a tile with no masked key, on unscaled logits ``qk``: the scale
    (> 0) folds into the row max and the exponent's FMA. Returns (p, m_new, l_i, acc)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    return p, m_new, l_i, acc


@triton.jit
def causal_bounds(start_m, N_Q, N_K, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key ranges for the query block starting at ``start_m``: keys [0, full_hi) are visible to
    every row (no mask needed), [full_hi, hi) need the mask. Key j is visible to query i iff
    j <= i + causal_shift (causal aligned bottom-right, as decode and verification need)."""
    causal_shift = N_K - N_Q
    if CAUSAL:
        full_hi = tl.minimum(tl.maximum(start_m + causal_shift + 1, 0), N_K)
        full_hi = (full_hi // BLOCK_N) * BLOCK_N
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + causal_shift, 0), N_K)
    else:
        full_hi = (N_K // BLOCK_N) * BLOCK_N
        hi = N_K
    return causal_shift, full_hi, hi


@triton.jit
def start_bounds(START_ROW, offs_m, N_Q, N_K, full_hi, BLOCK_N: tl.constexpr):
    """Per-row key starts of a query block (key j is hidden from query i when j < start[i]).

    Returns (start, lo, mid): keys [lo, mid) need the start mask, [mid, full_hi) are visible to
    every row as far as the starts go (the caller's causal split still applies)."""
    row_ok = offs_m < N_Q
    start = tl.load(START_ROW + offs_m, mask=row_ok, other=0)
    lo = tl.min(tl.where(row_ok, start, N_K), 0)
    lo = tl.minimum((tl.maximum(lo, 0) // BLOCK_N) * BLOCK_N, full_hi)
    mid = tl.cdiv(tl.max(start, 0), BLOCK_N) * BLOCK_N
    mid = tl.minimum(tl.maximum(mid, lo), full_hi)
    return start, lo, mid


@triton.jit
def load_dq_rows(Q, DO, LSE, DELTA, off_b, off_h, off_bh, offs_m, offs_d, row_ok,
                 stride_qb, stride_qh, stride_qn, stride_dob, stride_doh, stride_don, N_Q,
                 UPCAST: tl.constexpr):
    """A dQ program's query rows: q and dO (BLOCK_M, D), the base-2 logsumexp L and
    D = rowsum(dO * O); rows past N_Q load zeros (L = +inf, so their P is 0)."""
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + off_bh.to(tl.int64) * N_Q + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + off_bh.to(tl.int64) * N_Q + offs_m, mask=row_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    return q, do, lse, delta


def check_index(name: str, t, shape: tuple[int, ...], q: torch.Tensor) -> torch.Tensor:
    """``t`` as a contiguous int32/int64 tensor of ``shape`` on q's device, or a one-line ValueError.

    The dtype is kept: kernels cast index values after loading them, so an int64 tensor (the
    samplers' lengths) costs no conversion launch per call (one per layer inside a CUDA graph)."""
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype not in (torch.int32, torch.int64):
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        dims = "(B, Nq)" if len(shape) == 2 else "(B,)"
        raise ValueError(f"{name} must be an int32/int64 tensor of shape {dims} = {shape}, got {got}")
    return t.to(device=q.device).contiguous()


def empty_like_heads(t: torch.Tensor) -> torch.Tensor:
    """An empty (B, H, N, D) tensor in t's storage order: (B, N, H, D) storage when t is a (B, N, H, D)
    tensor seen through a transpose (an LM's q, k, v), so that the caller's transpose back to
    (B, N, H * D) is a view rather than a copy; otherwise contiguous (B, H, N, D)."""
    B, H, N, D = t.shape
    if H > 1 and N > 1 and t.stride(1) < t.stride(2):
        return torch.empty((B, N, H, D), device=t.device, dtype=t.dtype).transpose(1, 2)
    return torch.empty((B, H, N, D), device=t.device, dtype=t.dtype)


def host_cdiv(a: int, b: int) -> int:
    """ceil(a / b) on the host: ``triton.cdiv`` is a Triton constexpr function, microseconds a call
    in a launcher that runs per layer."""
    return -(-a // b)
