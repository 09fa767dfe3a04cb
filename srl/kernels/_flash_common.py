"""Helpers shared by the FlashAttention kernels: interpreter mode and autotuning."""

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
