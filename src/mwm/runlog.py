"""Run manifests (what was run, with which settings and software, and when) and the
output-folder rule they make possible.

Every command that writes a folder writes ``run_manifest.json`` into it when it starts
(status ``running``) and rewrites it when it ends (``ok`` or ``failed``), so a folder
always says how it was made. The manifest also lists the files a stage wrote for the next
stage (``results.outputs``), so that a stage reading another's folder reads those files
only (:func:`stage_outputs`) and a stray file there is never taken for an input.

**The output-folder rule** (:func:`claim_folder`): ``--out`` must be new, empty, or a
folder this same command wrote before (its manifest says so), where the command's own
resume / skip rules apply. Anything else (a folder of the user's own files, another
command's folder, a file) is refused with exit status 2, naming the folder;
``--overwrite`` allows writing into it (nothing there is deleted).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import __version__
from .errors import DataError
from .files import read_json_or_none, write_json

MANIFEST_NAME = "run_manifest.json"
TRACKED_PACKAGES = ("torch", "torchvision", "timm", "open_clip_torch", "transformers", "numpy",
                    "scipy", "opencv-python-headless", "pillow", "pydicom", "nibabel",
                    "pycocotools", "safetensors")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(path: Path | None = None) -> str | None:
    """The commit of the git checkout holding the mwm sources, if there is one."""
    where = path or Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


class RunManifest:
    """Context manager writing ``run_manifest.json`` at the start and end of a command."""

    def __init__(self, out_dir: str | Path, command: str, config: dict[str, Any],
                 seed: int | None = None):
        self.path = Path(out_dir) / MANIFEST_NAME
        self.record: dict[str, Any] = {
            "command": command,
            "argv": sys.argv,
            "config": config,
            "seed": seed,
            "mwm_version": __version__,
            "git_commit": git_commit(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "packages": package_versions(),
            "start_time": _now(),
            "end_time": None,
            "seconds": None,
            "status": "running",
            "load_average": _load_average(),
        }
        self._t0 = 0.0

    def __enter__(self) -> "RunManifest":
        self._t0 = time.perf_counter()
        write_json(self.path, self.record)
        return self

    def add(self, **results: Any) -> None:
        """Attach results (counts, metrics, output paths) to the manifest."""
        self.record.setdefault("results", {}).update(results)

    def __exit__(self, exc_type, exc, tb) -> None:
        self.record["end_time"] = _now()
        self.record["load_average_end"] = _load_average()
        self.record["seconds"] = round(time.perf_counter() - self._t0, 3)
        if exc is None and self.record["status"] == "running":
            self.record["status"] = "ok"
        elif exc is not None:
            self.record["status"] = "failed"
            self.record["error"] = f"{type(exc).__name__}: {exc}"
        write_json(self.path, self.record)

    def mark_failed(self, message: str) -> None:
        self.record["status"] = "failed"
        self.record["error"] = message


def _load_average() -> float | None:
    from .runtime import load_average

    return load_average()


# --------------------------------------------------------------------------- the output rule

def previous_run(folder: str | Path) -> dict | None:
    """The manifest in ``folder``, or None when there is none (or it is unreadable)."""
    record = read_json_or_none(Path(folder) / MANIFEST_NAME)
    return record if isinstance(record, dict) and "command" in record else None


def _visible_entries(folder: Path) -> list[str]:
    """The names in ``folder``, without hidden ones (``.DS_Store``, editor and atomic temp files)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def holds_only_shards(out: str | Path, command: str) -> bool:
    """True when ``out`` holds nothing but ``shards/<k>/`` folders, each empty or with a
    ``mwm <command>`` manifest: the other shards of a sharded run got there before the main
    one (two shards started at once), so the main shard claims the folder as new."""
    out = Path(out)
    shards = out / "shards"
    if not out.is_dir() or _visible_entries(out) != ["shards"] or not shards.is_dir():
        return False
    for name in _visible_entries(shards):
        folder = shards / name
        if not (folder.is_dir() and name.isdigit()):
            return False
        record = previous_run(folder)
        if _visible_entries(folder) and (record is None or record["command"] != command):
            return False
    return True


def claim_folder(out: str | Path, command: str, *, overwrite: bool = False) -> dict | None:
    """Apply the output-folder rule to ``out`` for ``mwm <command>`` (module docstring).

    Returns the manifest of this command's earlier run in ``out`` (the caller applies its
    resume / skip rules to it), or None for a new or empty folder (or ``--overwrite``
    into a foreign one). Raises :class:`DataError` otherwise.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; `mwm {command}` writes a folder. Give a new "
                        "or empty folder.")
    entries = _visible_entries(out) if out.is_dir() else []
    if not entries:
        return None
    previous = previous_run(out)
    if previous is not None and previous["command"] == command:
        return previous
    if overwrite:
        return None
    maker = (f"`mwm {previous['command']}`" if previous is not None
             else "no MWM command (it has no run_manifest.json)")
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    raise DataError(f"--out {out} is not empty and was written by {maker}: it holds {shown}. "
                    f"`mwm {command}` writes only into a new or empty folder, or one it wrote "
                    "before, so that outputs never mix with other files. Choose another "
                    "folder, or pass --overwrite to write into this one (nothing there is "
                    "deleted; files with the names it writes are replaced).")


def refuse_finished_run(out: str | Path, command: str, checkpoint: str, resume: object,
                        overwrite: bool) -> None:
    """A training folder holding ``checkpoint`` is continued only on request: without
    ``--resume`` it is refused (starting over would replace the checkpoint and the log)."""
    path = Path(out) / checkpoint
    if resume or overwrite or not path.is_file():
        return
    raise DataError(f"--out {out} already holds a `mwm {command}` run ({path}). Continue it "
                    "with --resume auto (same settings), choose another folder, or pass "
                    "--overwrite to start again there (its checkpoint and log are replaced).")


def check_out_file(path: str | Path, command: str, ours: bool, *, overwrite: bool) -> None:
    """The rule for commands whose ``--out`` is one file: a new file, or one this command
    wrote before (``ours``); anything else needs ``--overwrite``."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"--out {path} is a folder; `mwm {command}` writes one file: give a "
                        "file name.")
    if path.exists() and not ours and not overwrite:
        raise DataError(f"--out {path} exists and was not written by `mwm {command}`; choose "
                        "another name, or pass --overwrite to replace it.")


def stage_outputs(folder: str | Path, commands: tuple[str, ...]) -> set[str] | None:
    """The file names an earlier stage (one of ``commands``) listed as its outputs in
    ``folder``'s manifest; None when the folder has no such listing (a folder of the
    user's own files, or one written before MWM listed outputs): then all are read."""
    previous = previous_run(folder)
    if previous is None or previous["command"] not in commands:
        return None
    outputs = (previous.get("results") or {}).get("outputs")
    return set(outputs) if isinstance(outputs, list) else None
