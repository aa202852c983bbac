"""Training checkpoints: one atomic writer, one safe reader, one RNG snapshot.

Used by pretraining, fine-tuning, detection, CLIP training and the weights readers so
that every job writes and reads its files the same way. :func:`read` is MWM's one
``torch.load`` (``weights_only=True``, on the CPU) and :func:`read_safetensors` its one
safetensors reader: a file they cannot use is a :class:`~mwm.errors.DataError` that names
it and says in plain words what is wrong (empty, truncated, not such a file, holding
objects MWM will not unpickle, or a checkpoint of another job).
"""

from __future__ import annotations

import json
import os
import random
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import opt
from .errors import DataError
from .files import atomic_path

FINETUNE_FORMAT = "mwm-finetune"
CLIP_FORMAT = "mwm-clip-checkpoint"
SEGMENT_FORMAT = "mwm-segment"


@dataclass(frozen=True)
class Kind:
    """One job's resume checkpoint: what to call it, the keys resuming reads, how to
    recognise one (to say what a wrong file is) and what to pass instead."""

    title: str
    needs: tuple[str, ...]
    fix: str
    test: Callable[[dict], bool] | None = None


_ENGINE_KEYS = ("model", "optimizer", "step", "epoch")  # Engine.restore and every task read these

KINDS = {
    "clip": Kind("an MWM CLIP training checkpoint",
                 (*_ENGINE_KEYS, "format", "settings_json", "log_json"),
                 "Delete it to start over, or pass --no-resume / a new --out",
                 lambda obj: obj.get("format") == CLIP_FORMAT),
    "finetune": Kind("an MWM fine-tune checkpoint", (*_ENGINE_KEYS, "format", "config", "classes"),
                     "Pass the last.pt (or the run folder) of an mwm finetune run; best.pt holds "
                     "no training state", lambda obj: obj.get("format") == FINETUNE_FORMAT),
    "detect": Kind("an MWM detection checkpoint", (*_ENGINE_KEYS, "config", "rng"),
                   "Pass the checkpoint.pt (or the run folder) of an mwm detect run",
                   lambda obj: "weights_meta" in obj and "num_classes" in obj),
    "segment": Kind("an MWM segmentation checkpoint",
                    (*_ENGINE_KEYS, "format", "config", "classes"),
                    "Pass the last.pt (or the run folder) of an mwm segment run; best.pt holds "
                    "no training state", lambda obj: obj.get("format") == SEGMENT_FORMAT),
    "pretrain": Kind("an MWM pretraining checkpoint", (*_ENGINE_KEYS, "config", "mean", "std"),
                     "Pass the checkpoint.pt (or the run folder) of an mwm pretrain run",
                     lambda obj: isinstance(obj.get("config"), dict)
                     and "masking" in obj["config"]),
    "resume": Kind("an MWM training checkpoint", (*_ENGINE_KEYS, "config"),
                   "Pass the checkpoint the run wrote (or its run folder)"),
}


def resume_option(source: str = "a checkpoint"):
    """The ``--resume`` setting of a resumable command (one wording for all of them)."""
    return opt(None, f"continue from {source} (run folder or file; auto = --out's own if any). "
               "A missing path is an error", metavar="PATH|auto")


def max_steps_option():
    """The ``--max-steps`` setting of a resumable command."""
    return opt(None, "stop after this many optimizer steps (resumable)", low=0)


def rng_state() -> dict:
    """Python, NumPy and torch CPU RNG states as weights-only-loadable values."""
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "numpy": np.random.get_state()[1].tolist()}


def save(path: str | Path, payload: dict) -> None:
    """``torch.save`` through a temporary file: a killed job never leaves half a checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def find(path: str | Path, name: str) -> Path:
    """``path`` itself, or ``path/name`` for a run folder; missing is an error, never a
    fresh start."""
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


def load(path: str | Path, name: str, kind: str = "resume") -> dict:
    """The resume checkpoint at ``path`` (a file or a run folder holding ``name``), checked
    to be ``kind`` (a key of :data:`KINDS`)."""
    return read(find(path, name), "--resume", kind=kind)


# --------------------------------------------------------------------------- reading

def read(path: str | os.PathLike, what: str = "", *, kind: str | None = None) -> Any:
    """What the torch file ``path`` holds, read with ``weights_only=True`` on the CPU.

    ``what``: the flag or role that named the file, for the message. ``kind``: a key of
    :data:`KINDS` the file must be (a dict with its keys); None accepts any content. Any
    failure is a :class:`DataError`; the file's own objects are never unpickled, and
    PyTorch's advice to load it unsafely is never passed on.
    """
    path = Path(path)
    label = f"{what} {path}".strip()
    problem = _unusable(path)
    if problem is None:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - zip, pickle and OS errors of all kinds
            problem = _unreadable(path, err)
    if problem is not None:
        fix = f" {KINDS[kind].fix}." if kind is not None else ""
        raise DataError(f"{label}: {problem}{fix}")
    if kind is not None:
        _check_kind(obj, KINDS[kind], label)
    return obj


def read_safetensors(path: str | os.PathLike, what: str = "") -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path``; any failure is a :class:`DataError`."""
    from safetensors.torch import load_file

    path = Path(path)
    problem = _unusable(path)
    if problem is None:
        try:
            return load_file(os.fspath(path))
        except Exception:  # noqa: BLE001 - safetensors raises its own error types
            problem = _bad_safetensors(path)
    raise DataError(f"{what} {path}".strip() + f": {problem}")


def kind_of(obj: Any) -> str | None:
    """The key of :data:`KINDS` whose checkpoints look like ``obj``, or None."""
    if isinstance(obj, dict):
        for name, kind in KINDS.items():
            if kind.test is not None and kind.test(obj):
                return name
    return None


def describe(obj: Any) -> str:
    """What a loaded file holds, in words."""
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}"
    if (name := kind_of(obj)) is not None:
        return KINDS[name].title
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return f"a state dict of {len(obj)} tensors (weights only, no training state)"
    keys = sorted(map(str, obj))
    return "a dict with the keys " + ", ".join(keys[:8]) + (", …" if len(keys) > 8 else "")


def _check_kind(obj: Any, want: Kind, label: str) -> None:
    other = kind_of(obj)
    if want.test is not None and other is not None and KINDS[other] is not want:
        raise DataError(f"{label}: this is {KINDS[other].title}, not {want.title}. {want.fix}.")
    missing = [k for k in want.needs if k not in obj] if isinstance(obj, dict) else list(want.needs)
    if missing:
        raise DataError(f"{label}: the file holds {describe(obj)}, not {want.title}: it lacks "
                        f"{', '.join(missing)}. {want.fix}.")


def _unusable(path: Path) -> str | None:
    """Why ``path`` cannot be a weights file before reading it, or None."""
    if not path.exists():
        return "no such file."
    if path.is_dir():
        return "this is a folder, not a file."
    if path.stat().st_size == 0:
        return ("the file is empty (0 bytes): its writing or copying was cut off. Write or copy "
                "it again.")
    return None


def _truncated(path: Path) -> str:
    return (f"the file is truncated ({path.stat().st_size} bytes; its end is missing), e.g. a "
            "copy or download that was cut off. Copy or write it again.")


def _unreadable(path: Path, err: Exception) -> str:
    """Plain words for why ``torch.load`` failed (never PyTorch's own advice)."""
    text = str(err)
    refused = re.search(r"GLOBAL ([\w.]+)", text)
    if refused:
        return ("the file holds objects other than tensors and plain containers (here "
                f"{refused.group(1)}), which MWM refuses to unpickle because that could run "
                "code. Use a file of tensors, numbers, strings, lists and dicts (e.g. "
                "torch.save(model.state_dict(), ...)) from a source you trust.")
    with path.open("rb") as handle:
        zipped = handle.read(4) == b"PK\x03\x04"  # torch.save writes a zip archive
    if zipped and not zipfile.is_zipfile(path):
        return _truncated(path)
    if zipped:
        return "the file is a zip archive but not a readable PyTorch file (damaged, or not " \
               "written by torch.save)."
    if isinstance(err, EOFError) or "EOF" in text:
        return _truncated(path)
    return "not a PyTorch file (neither the zip archive torch.save writes nor an older torch " \
           "pickle)."


def _bad_safetensors(path: Path) -> str:
    """Plain words for why a safetensors file cannot be read (its 8-byte header length,
    then a JSON header, then the data)."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = handle.read(min(length, 100 << 20))  # safetensors caps headers at 100 MB
    if size < 8:
        return (f"the file is too short ({size} bytes) to be a safetensors file: truncated, "
                "or not one.")
    if length > 100 << 20 or header[:1] not in (b"{", b""):
        return "not a safetensors file (it does not start with a safetensors header)."
    if 8 + length > size:
        return _truncated(path)
    try:
        entries = json.loads(header)
        end = max((v["data_offsets"][1] for k, v in entries.items() if k != "__metadata__"),
                  default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return "a damaged safetensors file (its header cannot be read)."
    if 8 + length + end > size:
        return _truncated(path)
    return "a damaged safetensors file (its header does not describe its contents)."
