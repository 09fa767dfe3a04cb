"""Host <-> device transfers of one inference pass through reused pinned buffers.

A policy worker shares its GPU with the trainer (and other policy workers): every synchronous
copy from pageable memory waits its turn on the device. Here a pass's inputs go up in one
asynchronous copy from one pinned buffer, and its outputs come back with one wait.
"""
from __future__ import annotations

import numpy as np
import torch

_ALIGN = 8
"""Byte alignment of each array inside the upload buffer (views as int64 need it)."""


class StagedArrays:
    def __init__(self) -> None:
        self._up: torch.Tensor | None = None
        self._uploaded: torch.cuda.Event | None = None
        self._down: list[torch.Tensor] = []

    def upload(self, arrays: list[np.ndarray], device: str) -> list[torch.Tensor]:
        """``arrays`` on ``device``, same shapes and dtypes: on CUDA packed into one pinned buffer
        (see :func:`pack`) and moved in one asynchronous copy; on the CPU wrapped without a copy."""
        if torch.device(device).type != "cuda":
            return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
        if self._uploaded is not None:
            self._uploaded.synchronize()  # the buffer's last copy has left (normally long done)
        total = packed_size(arrays)
        if self._up is None or self._up.numel() < total:
            size = max(total, 2 * (0 if self._up is None else self._up.numel()))
            self._up = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        offsets = pack(arrays, self._up)
        moved = self._up[:total].to(device, non_blocking=True)
        self._uploaded = torch.cuda.Event()
        self._uploaded.record()
        return unpack(moved, arrays, offsets)

    def download(self, tensors: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> list[np.ndarray]:
        """``tensors`` as numpy arrays (copies), waiting once for the device."""
        if not tensors or not tensors[0].is_cuda:
            return [t.detach().cpu().numpy() for t in tensors]
        while len(self._down) < len(tensors):
            self._down.append(torch.empty(0, dtype=torch.uint8, pin_memory=True))
        outs = []
        for i, t in enumerate(tensors):
            if self._down[i].dtype != t.dtype or self._down[i].numel() < t.numel():
                self._down[i] = torch.empty(max(t.numel(), 2 * self._down[i].numel()), dtype=t.dtype, pin_memory=True)
            out = self._down[i][:t.numel()].view(t.shape)
            out.copy_(t.detach(), non_blocking=True)
            outs.append(out)
        torch.cuda.current_stream(tensors[0].device).synchronize()
        return [o.numpy().copy() for o in outs]


def _offsets(arrays: list[np.ndarray]) -> tuple[list[int], int]:
    offsets, total = [], 0
    for a in arrays:
        total = -(-total // _ALIGN) * _ALIGN
        offsets.append(total)
        total += a.nbytes
    return offsets, total


def packed_size(arrays: list[np.ndarray]) -> int:
    """Bytes :func:`pack` needs for ``arrays``."""
    return _offsets(arrays)[1]


def pack(arrays: list[np.ndarray], buffer: torch.Tensor) -> list[int]:
    """Copy ``arrays`` into the uint8 ``buffer``, each 8-byte aligned; returns their offsets."""
    offsets, _ = _offsets(arrays)
    host = buffer.numpy()
    for a, at in zip(arrays, offsets):
        host[at:at + a.nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    return offsets


def unpack(buffer: torch.Tensor, arrays: list[np.ndarray], offsets: list[int]) -> list[torch.Tensor]:
    """Views of a packed ``buffer`` (on any device) with ``arrays``' shapes and dtypes."""
    return [buffer[at:at + a.nbytes].view(_torch_dtype(a.dtype)).reshape(a.shape) for a, at in zip(arrays, offsets)]


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype)).dtype
