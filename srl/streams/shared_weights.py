"""Versioned weights in a shared-memory file, for parameter clients on the server's host.

A 100M-parameter policy is 400 MB of float32: through the wire that is an encode, an HMAC over
every byte on each side and a socket copy per client and version (most of an RL step of a
language-model policy). Clients on the same host instead read the weights from a file under
``/dev/shm`` that only this user may open (mode 0600, random name); the authenticated parameter
stream carries only the file's name, the slot and the layout. Nothing read from the file is
unpickled: it is raw array bytes laid out as the authenticated manifest says.

Two slots: version v goes to slot v % 2, so a reader copying version v is not overwritten until
v + 2 is written. Each slot has a sequence number (odd while its slot is being written) and the
version it holds; a reader checks both before and after its copy and drops a torn read (the
client then asks again).

The writer also takes torch tensors: a CUDA tensor is copied by the GPU straight into the slot,
which is page-locked for that (one DMA per tensor, one wait), instead of a device-to-host copy
into fresh memory followed by a second copy into the file.
"""
from __future__ import annotations

import mmap
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable, Mapping

import numpy as np

SHM_DIR = "/dev/shm"
PREFIX = "srl-weights-"
HEADER_BYTES = 64
"""Per slot: [sequence, version] as uint64; two slots, padded to a cache line."""
ALIGN = 64
LOAD_TRIES = 4
"""A load that the writer lapped (two newer versions written meanwhile) is redone this often."""
CUDA_HOST_REGISTER_READ_ONLY = 8


def host_id() -> str:
    """Identifies this machine (and boot) so that a client uses the file only where it exists."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def available() -> bool:
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _nbytes(dtype: str, shape: list) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _spec(value) -> tuple[np.dtype, list[int]]:
    """dtype and shape of a numpy array or a torch tensor."""
    if isinstance(value, np.ndarray):
        return value.dtype, list(value.shape)
    import torch

    return torch.empty((), dtype=value.dtype).numpy().dtype, list(value.shape)


def manifest_of(arrays: Mapping) -> list[list]:
    """[[name, dtype, shape, offset], ...]: each array (or tensor) at an ALIGN-byte boundary of its slot."""
    out, offset = [], 0
    for name, a in arrays.items():
        dtype, shape = _spec(a)
        out.append([name, dtype.str, shape, offset])
        offset += _aligned(_nbytes(dtype.str, shape))
    return out


def slot_bytes(manifest: list[list]) -> int:
    """One slot's size: the last entry's end, aligned."""
    if not manifest:
        return 0
    _, dtype, shape, offset = manifest[-1]
    return offset + _aligned(_nbytes(dtype, shape))


def _remove_stale() -> None:
    """Files of processes that are gone (a killed trainer cannot unlink its own)."""
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return
    for name in names:
        if not name.startswith(PREFIX):
            continue
        try:
            pid = int(name[len(PREFIX):].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                os.unlink(os.path.join(SHM_DIR, name))
            except OSError:
                pass
        except (ValueError, PermissionError):
            pass


class _Mapped:
    def __init__(self, path: str, size: int, write: bool):
        flags = os.O_RDWR if write else os.O_RDONLY
        fd = os.open(path, flags)
        try:
            if os.fstat(fd).st_size < size:
                raise ValueError(f"shared weights file {os.path.basename(path)} holds "
                                 f"{os.fstat(fd).st_size} bytes, the manifest needs {size}")
            self.mm = mmap.mmap(fd, size, prot=mmap.PROT_READ | (mmap.PROT_WRITE if write else 0))
        finally:
            os.close(fd)
        self.header = np.frombuffer(self.mm, np.uint64, 4, 0)

    def view(self, slot: int, entry: list, slot_size: int) -> np.ndarray:
        _, dtype, shape, offset = entry
        start = HEADER_BYTES + slot * slot_size + int(offset)
        return np.frombuffer(self.mm, np.dtype(dtype), int(np.prod(shape, dtype=np.int64)), start).reshape(shape)

    def close(self) -> None:
        self.header = None
        try:
            self.mm.close()
        except BufferError:  # a caller still holds a view; the mapping goes with it
            pass


class SharedWeightsWriter:
    """The server's side: owns the file; ``write(version, arrays)`` fills slot version % 2."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        _remove_stale()
        self.manifest = manifest_of(arrays)
        self.slot_size = slot_bytes(self.manifest)
        self.path = os.path.join(SHM_DIR, f"{PREFIX}{os.getpid()}-{secrets.token_hex(8)}")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:  # reserve the pages now: a full tmpfs (containers often give /dev/shm 64 MB) must
            # fail here, as OSError, not later as SIGBUS on the first write
            os.posix_fallocate(fd, 0, HEADER_BYTES + 2 * self.slot_size)
        except OSError:
            os.close(fd)
            os.unlink(self.path)
            raise
        os.close(fd)
        self.map = _Mapped(self.path, HEADER_BYTES + 2 * self.slot_size, write=True)
        self.pinned: bool | None = None
        """Whether the mapping is page-locked for device copies (None: not tried yet)."""

    def fits(self, arrays: Mapping) -> bool:
        return manifest_of(arrays) == self.manifest

    def write(self, version: int, arrays: Mapping) -> int:
        """Copy ``arrays`` (numpy arrays or torch tensors) into the slot of ``version``; returns the slot."""
        slot = version % 2
        h = self.map.header
        h[2 * slot] += np.uint64(1)  # odd: being written
        tensors = []
        for entry in self.manifest:
            dst, src = self.map.view(slot, entry, self.slot_size), arrays[entry[0]]
            if isinstance(src, np.ndarray):
                np.copyto(dst, src, casting="no")
            else:
                tensors.append((dst, src))
        if tensors:
            self._copy_tensors(tensors)
        h[2 * slot + 1] = np.uint64(version)
        h[2 * slot] += np.uint64(1)
        return slot

    def _copy_tensors(self, pairs: list) -> None:
        import torch

        on_gpu = any(t.is_cuda for _, t in pairs)
        if on_gpu and self.pinned is None:
            self.pinned = _register(self.map.mm, 0)
        with torch.no_grad():
            for dst, t in pairs:
                torch.from_numpy(dst).copy_(t.detach(), non_blocking=t.is_cuda and bool(self.pinned))
        if on_gpu:
            torch.cuda.synchronize()

    def read(self, slot: int) -> dict[str, np.ndarray]:
        """A copy of what slot holds (for clients that get the weights over the wire)."""
        return {entry[0]: self.map.view(slot, entry, self.slot_size).copy() for entry in self.manifest}

    def close(self) -> None:
        if self.pinned:
            _unregister(self.map.mm)
            self.pinned = False
        self.map.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _address(mm: mmap.mmap) -> int:
    return np.frombuffer(mm, np.uint8).ctypes.data


def _register(mm: mmap.mmap, flags: int) -> bool:
    """Page-lock the mapping for CUDA copies; False (pageable copies) if the driver refuses."""
    import torch

    return torch.cuda.cudart().cudaHostRegister(_address(mm), len(mm), flags) == 0


def _unregister(mm: mmap.mmap) -> None:
    import torch

    torch.cuda.cudart().cudaHostUnregister(_address(mm))


class SharedWeightsReader:
    """A client's side: ``read(slot, version)`` returns a copy of the arrays, or None if torn."""

    def __init__(self, path: str, manifest: list[list]):
        if os.path.dirname(path) != SHM_DIR or not os.path.basename(path).startswith(PREFIX):
            raise ValueError(f"shared weights path {path!r} is not an srl file under {SHM_DIR}")
        self.path, self.manifest = path, manifest
        self.slot_size = slot_bytes(manifest)
        self.map = _Mapped(path, HEADER_BYTES + 2 * self.slot_size, write=False)
        self.pinned: bool | None = None

    def load(self, slot: int, version: int, into: Callable[[dict[str, np.ndarray]], None]) -> int | None:
        """Hand the slot's arrays to ``into`` without copying them first (a loader that copies them
        to a GPU reads the file, page-locked for that, directly), then check that the slot was not
        rewritten meanwhile. A torn load is redone from the newest complete slot. Returns the
        version loaded (at least ``version``), or None if every try was torn: ``into``'s
        destination then holds a mix, and the caller must load again."""
        if slot not in (0, 1):
            raise ValueError(f"shared weights slot {slot}, expected 0 or 1")
        self._pin_for_cuda()
        h = self.map.header
        for _ in range(LOAD_TRIES):
            seq, held = int(h[2 * slot]), int(h[2 * slot + 1])
            if seq % 2 == 0 and held >= version:
                into({entry[0]: self.map.view(slot, entry, self.slot_size) for entry in self.manifest})
                if int(h[2 * slot]) == seq:
                    return held
            time.sleep(0.001)
            slot = int(h[3] > h[1])  # the slot with the newer version
        return None

    def _pin_for_cuda(self) -> None:
        """Page-lock the mapping (read-only) once, if this process uses CUDA."""
        if self.pinned is None:
            torch = sys.modules.get("torch")
            self.pinned = False
            if torch is not None and torch.cuda.is_initialized():
                self.pinned = _register(self.map.mm, CUDA_HOST_REGISTER_READ_ONLY)

    def read(self, slot: int, version: int) -> dict[str, np.ndarray] | None:
        if slot not in (0, 1):
            raise ValueError(f"shared weights slot {slot}, expected 0 or 1")
        h = self.map.header
        seq = int(h[2 * slot])
        if seq % 2 or int(h[2 * slot + 1]) != version:
            return None
        out = {entry[0]: self.map.view(slot, entry, self.slot_size).copy() for entry in self.manifest}
        if int(h[2 * slot]) != seq or int(h[2 * slot + 1]) != version:
            return None
        return out

    def close(self) -> None:
        if self.pinned:
            _unregister(self.map.mm)
            self.pinned = False
        self.map.close()
