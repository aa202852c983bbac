"""Keeping a phantom folder equal to its manifests: stale files of an earlier run removed,
class folders (re)made as hard links.

Only generator-named files (``<modality>_NNNNN.png``) are ever removed, so a user's own
files in the folder are left alone.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mwm.files import atomic_path, safe_child, write_bytes

from .findings import FINDING_CAPTIONS_FILE, FINDINGS, FINDINGS_FILE, finding_names


def clean_up(out: Path, records: list[dict], class_folders: bool, stem_re: re.Pattern,
             multi_modality: str | None = None) -> None:
    """Remove images of an earlier, larger run and finding files this run does not write
    (``multi_modality``: the modality of a multi-finding run); (re)make or remove the class
    folders. ``stem_re`` matches the generator's file names."""
    keep_names = {f"{r['stem']}.png" for r in records}
    _remove_stale(out / "images", keep_names, stem_re)
    _remove_stale(out / "masks", keep_names, stem_re)
    current = set(finding_names(multi_modality)) if multi_modality else set()
    for name in sorted({f.name for defs in FINDINGS.values() for f in defs}):
        folder = out / "masks" / name
        _remove_stale(folder, keep_names if name in current else set(), stem_re)
        if name not in current and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    if not multi_modality:
        for name in (FINDINGS_FILE, FINDING_CAPTIONS_FILE):
            (out / name).unlink(missing_ok=True)
    if class_folders:
        wanted = {(r["split"], r["label"], r["stem"] + ".png") for r in records}
        _remove_stale_classes(out / "classes", wanted, stem_re)
        for r in records:
            src = out / "images" / f"{r['stem']}.png"
            dst = safe_child(out, f"classes/{r['split']}/{r['label']}/{r['stem']}.png")
            link_or_copy(src, dst)
    elif (out / "classes").is_dir():
        _remove_stale_classes(out / "classes", set(), stem_re)


def _remove_stale(folder: Path, keep: set[str], stem_re: re.Pattern) -> None:
    if not folder.is_dir():
        return
    for entry in os.scandir(folder):
        if entry.is_file() and stem_re.match(entry.name) and entry.name not in keep:
            os.unlink(entry.path)


def _remove_stale_classes(root: Path, keep: set[tuple[str, str, str]],
                          stem_re: re.Pattern) -> None:
    if not root.is_dir():
        return
    for split_dir in root.iterdir():
        if not split_dir.is_dir():
            continue
        for class_dir in split_dir.iterdir():
            if not class_dir.is_dir():
                continue
            for entry in os.scandir(class_dir):
                if (entry.is_file() and stem_re.match(entry.name)
                        and (split_dir.name, class_dir.name, entry.name) not in keep):
                    os.unlink(entry.path)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` atomically (copy where links are not possible)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        if dst.exists() and os.path.samefile(src, dst):
            return
    except OSError:
        pass
    try:
        with atomic_path(dst) as tmp:
            tmp.unlink()
            os.link(src, tmp)
    except OSError:
        write_bytes(dst, src.read_bytes())
