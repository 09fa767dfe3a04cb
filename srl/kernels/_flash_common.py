"""Helpers shared by the FlashAttention kernels: interpreter mode and autotuning."""

from __future__ import annotations

import os

import torch
import triton

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
