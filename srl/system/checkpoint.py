"""Atomic, verified checkpoints: weights as safetensors, optimizer state and counters beside them.

Each checkpoint is written into a temporary folder: the weights, ``trainer.pt``, ``counters.json``
and, last, ``manifest.json`` with the size and SHA-256 of every other file. The folder is fsynced
and renamed into place (``checkpoints/ckpt-<version>``); a crash at any moment leaves the earlier
checkpoints intact.

Loading trusts no pointer: :func:`load_latest` scans ``checkpoints/`` from the highest version
down and returns the first checkpoint that verifies (manifest, sizes, checksums, loadable files,
finite weights, counters naming the same version). The ones it passed over are logged as warnings
and listed in :attr:`Checkpoint.skipped`. A ``latest`` file is still written for people to read;
nothing reads it back.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file

from srl.errors import SrlError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FILES = ("model.safetensors", "trainer.pt", "counters.json")
"""Files every checkpoint holds besides the manifest."""
_FORMAT = 1
_NAME = re.compile(r"ckpt-(\d{1,18})")
_MAX_MANIFEST_BYTES = 1 << 20


class CheckpointError(SrlError):
    """No checkpoint of a run can be used; the message is one line naming the folder and why."""


class _Unusable(Exception):
    """One checkpoint failed verification (the message is the one-line reason)."""


@dataclass
class Checkpoint:
    path: str
    weights: dict[str, torch.Tensor]
    trainer_state: dict
    counters: dict
    version: int = -1
    """The version in the folder name, equal to ``counters["version"]``."""
    skipped: list[str] = field(default_factory=list)
    """Newer checkpoints passed over, one line each: ``ckpt-000000090: counters.json: size ...``."""


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


# --------------------------------------------------------------------------- save


def save_checkpoint(run_dir: str, version: int, weights: dict[str, torch.Tensor], trainer_state: dict,
                    counters: dict, keep: int = 3) -> str:
    """Write ``checkpoints/ckpt-<version>`` atomically and return its path.

    Raises ValueError naming the tensor when a weight holds nan or inf: such a checkpoint would
    only hand the failure to the next run. Raises :class:`CheckpointError` (one line naming the
    path) when the filesystem refuses the write; the earlier checkpoints stay as they were.
    """
    _check_finite(weights)
    root = checkpoint_root(run_dir)
    name = f"ckpt-{version:09d}"
    tmp = os.path.join(root, f".{name}.tmp-{os.getpid()}")
    try:
        return _save(root, name, tmp, version, weights, trainer_state, counters, keep)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write checkpoint {os.path.join(root, name)}: "
                              f"{exc.strerror or _one_line(exc)}") from None


def _save(root: str, name: str, tmp: str, version: int, weights: dict[str, torch.Tensor], trainer_state: dict,
          counters: dict, keep: int) -> str:
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, name)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, os.path.join(tmp, FILES[0]))
    torch.save(trainer_state, os.path.join(tmp, FILES[1]))
    with open(os.path.join(tmp, FILES[2]), "w", encoding="utf-8") as fh:
        json.dump({**counters, "version": version}, fh)
    _write_manifest(tmp, version)  # last: a folder with a valid manifest is complete
    for fname in os.listdir(tmp):
        _fsync(os.path.join(tmp, fname))
    _fsync_dir(tmp)
    _replace_dir(tmp, final)
    _fsync_dir(root)
    try:  # the checkpoint is complete: what follows is housekeeping
        _write_atomic(os.path.join(root, "latest"), name)  # for people; the loader scans instead
        _prune(root, keep, name)
    except OSError:
        pass
    return final


def _check_finite(weights: dict[str, torch.Tensor]) -> None:
    for key, tensor in weights.items():
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"weights[{key!r}]: holds nan or inf; checkpoint not written")


def _write_manifest(folder: str, version: int) -> None:
    files = {}
    for fname in FILES:
        path = os.path.join(folder, fname)
        files[fname] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
    with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as fh:
        json.dump({"format": _FORMAT, "version": version, "files": files}, fh, indent=1)


def _replace_dir(tmp: str, final: str) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` (same version saved again) is moved aside
    first and removed after, so some complete copy exists at every moment."""
    if not os.path.exists(final):
        os.rename(tmp, final)
        return
    aside = f"{tmp}.old"
    shutil.rmtree(aside, ignore_errors=True)
    os.rename(final, aside)
    os.rename(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)


# --------------------------------------------------------------------------- load


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """``(version, name)`` of every ``ckpt-*`` folder, newest first (nothing is verified).
    Raises :class:`CheckpointError` when the folder exists but cannot be listed."""
    return sorted(_scan(checkpoint_root(run_dir)), reverse=True)


def _scan(root: str) -> list[tuple[int, str]]:
    try:
        names = os.listdir(root)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise CheckpointError(f"cannot list {root}: {exc.strerror or _one_line(exc)}") from None
    found = []
    for name in names:
        m = _NAME.fullmatch(name)
        if m and os.path.isdir(os.path.join(root, name)):
            found.append((int(m.group(1)), name))
    return found


def load_latest(run_dir: str) -> Checkpoint | None:
    """The newest checkpoint of ``run_dir`` that verifies; None when the run has none at all.

    Checkpoints that fail verification are skipped with a warning and listed in
    ``Checkpoint.skipped``. Raises :class:`CheckpointError` (one line) when checkpoints exist but
    none of them can be used.
    """
    skipped: list[str] = []
    candidates = list_checkpoints(run_dir)
    for version, name in candidates:
        path = os.path.join(checkpoint_root(run_dir), name)
        try:
            ckpt = _load_verified(path, version)
        except (_Unusable, OSError) as exc:
            reason = f"{name}: {exc}" if isinstance(exc, _Unusable) else f"{name}: cannot read ({_one_line(exc)})"
            log.warning("skipping checkpoint %s", reason)
            skipped.append(reason)
            continue
        ckpt.skipped = skipped
        return ckpt
    if skipped:
        raise CheckpointError(f"{checkpoint_root(run_dir)}: no usable checkpoint among {len(skipped)} "
                              f"({'; '.join(skipped[:3])}{'; ...' if len(skipped) > 3 else ''})")
    return None


def has_checkpoint(run_dir: str) -> bool:
    """Whether some checkpoint of ``run_dir`` passes its manifest (sizes and checksums; the files
    are not loaded, so ``load_latest`` may still skip it for non-finite weights)."""
    for version, name in list_checkpoints(run_dir):
        try:
            _verify_manifest(os.path.join(checkpoint_root(run_dir), name), version)
            return True
        except (_Unusable, OSError):
            continue
    return False


def _load_verified(path: str, version: int) -> Checkpoint:
    _verify_manifest(path, version)
    try:
        weights = load_file(os.path.join(path, FILES[0]))
    except Exception as exc:  # safetensors raises several types on a bad header
        raise _Unusable(f"{FILES[0]}: cannot load ({_one_line(exc)})") from None
    for key, tensor in weights.items():
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            raise _Unusable(f"{FILES[0]}: weight {key!r} holds nan or inf")
    try:
        trainer_state = torch.load(os.path.join(path, FILES[1]), weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise _Unusable(f"{FILES[1]}: cannot load ({_one_line(exc)})") from None
    counters = _read_json(os.path.join(path, FILES[2]), FILES[2])
    if not isinstance(counters, dict) or type(counters.get("version")) is not int:
        raise _Unusable(f"{FILES[2]}: not a mapping with an integer version")
    if counters["version"] != version:
        raise _Unusable(f"{FILES[2]}: version {counters['version']} but the folder says {version}")
    return Checkpoint(path, weights, trainer_state, counters, version)


def _verify_manifest(path: str, version: int) -> None:
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise _Unusable(f"no {MANIFEST} (incomplete, or written before manifests)")
    if os.path.getsize(manifest_path) > _MAX_MANIFEST_BYTES:
        raise _Unusable(f"{MANIFEST}: larger than {_MAX_MANIFEST_BYTES} bytes")
    manifest = _read_json(manifest_path, MANIFEST)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("version") != version:
        raise _Unusable(f"{MANIFEST}: not a manifest of version {version}")
    for fname in FILES:
        entry = files.get(fname)
        if not (isinstance(entry, dict) and type(entry.get("size")) is int and isinstance(entry.get("sha256"), str)):
            raise _Unusable(f"{MANIFEST}: no size and sha256 for {fname}")
        fpath = os.path.join(path, fname)
        try:
            size = os.path.getsize(fpath)
        except OSError:
            raise _Unusable(f"{fname}: missing") from None
        if size != entry["size"]:
            raise _Unusable(f"{fname}: {size} bytes, the manifest says {entry['size']} (truncated or replaced)")
        if _sha256(fpath) != entry["sha256"]:
            raise _Unusable(f"{fname}: checksum differs from the manifest (corrupted or replaced)")


def _read_json(path: str, label: str):
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _Unusable(f"{label}: not readable JSON ({_one_line(exc)})") from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:160]


# --------------------------------------------------------------------------- housekeeping


def _prune(root: str, keep: int, newest: str) -> None:
    names = [name for _, name in sorted(_scan(root))]  # oldest first
    for name in names[:-keep]:
        if name != newest:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        _fsync(path)
    except OSError:
        pass
