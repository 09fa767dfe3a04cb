"""Atomic checkpoints: weights as safetensors, optimizer state and counters beside them.

Each checkpoint is written into a temporary folder, fsynced, then renamed into place, and only
then does ``latest`` (itself replaced atomically) point at it. A crash at any moment leaves the
previous checkpoint intact; a restarted run resumes from whatever ``latest`` names.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file


@dataclass
class Checkpoint:
    path: str
    weights: dict[str, torch.Tensor]
    trainer_state: dict
    counters: dict


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def save_checkpoint(run_dir: str, version: int, weights: dict[str, torch.Tensor], trainer_state: dict,
                    counters: dict, keep: int = 3) -> str:
    root = checkpoint_root(run_dir)
    os.makedirs(root, exist_ok=True)
    name = f"ckpt-{version:09d}"
    final = os.path.join(root, name)
    tmp = os.path.join(root, f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, os.path.join(tmp, "model.safetensors"))
    torch.save(trainer_state, os.path.join(tmp, "trainer.pt"))
    with open(os.path.join(tmp, "counters.json"), "w", encoding="utf-8") as fh:
        json.dump({**counters, "version": version}, fh)
    for fname in os.listdir(tmp):
        _fsync(os.path.join(tmp, fname))
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
    _write_atomic(os.path.join(root, "latest"), name)
    _fsync_dir(root)
    _prune(root, keep, name)
    return final


def load_latest(run_dir: str) -> Checkpoint | None:
    root = checkpoint_root(run_dir)
    try:
        with open(os.path.join(root, "latest"), encoding="utf-8") as fh:
            name = fh.read().strip()
    except FileNotFoundError:
        return None
    path = os.path.join(root, name)
    weights = load_file(os.path.join(path, "model.safetensors"))
    trainer_state = torch.load(os.path.join(path, "trainer.pt"), weights_only=True)
    with open(os.path.join(path, "counters.json"), encoding="utf-8") as fh:
        counters = json.load(fh)
    return Checkpoint(path, weights, trainer_state, counters)


def _prune(root: str, keep: int, newest: str) -> None:
    names = sorted(n for n in os.listdir(root) if n.startswith("ckpt-"))
    for name in names[:-keep]:
        if name != newest:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


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
