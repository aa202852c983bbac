"""Training checkpoints: one atomic writer, one safe reader, one RNG snapshot.

Used by pretraining, fine-tuning and detection so that every resumable job writes and
finds its checkpoint the same way (``torch.load(..., weights_only=True)`` only).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .files import atomic_path


def rng_state() -> dict:
    """Python, NumPy and torch CPU RNG states as weights-only-loadable values."""
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "numpy": np.random.get_state()[1].tolist()}


def save(path: str | Path, payload: dict) -> None:
    """``torch.save`` through a temporary file: a killed job never leaves half a checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def find(path: str | Path, name: str) -> Path:
    """``path`` itself, or ``path/name`` for a run folder; missing is an error, never a fresh start."""
    path = Path(path)
    if path.is_dir():
        path = path / name
    if not path.is_file():
        raise DataError(f"--resume {path}: no checkpoint there. Pass the run folder or its "
                        f"{name}; a missing checkpoint never starts a fresh run.")
    return path


def resume_path(resume: str | None, out: str | Path, name: str) -> Path | None:
    """What ``--resume`` points at: None (fresh run), ``auto`` = this run's own checkpoint
    if there is one, else a path that must exist (:func:`find`)."""
    if resume is None:
        return None
    if resume == "auto":
        candidate = Path(out) / name
        return candidate if candidate.is_file() else None
    return find(resume, name)


def load(path: str | Path, name: str) -> dict:
    return torch.load(find(path, name), map_location="cpu", weights_only=True)
