"""Run manifests: what was run, with which settings and software, and when.

Every command writes ``run_manifest.json`` into its output folder when it starts
(status ``running``) and rewrites it when it ends (``ok`` or ``failed``), so a folder
always says how it was made.
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
from .files import write_json

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
