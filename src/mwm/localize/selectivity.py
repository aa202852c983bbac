"""Selectivity: does a region cover the finding its prompt names, or the image's others?

On a dataset whose ``findings.csv`` lists several findings per image (multi-finding
phantoms, ``docs/phantoms.md``), a region localized for one prompt is scored twice: DSC
against the image's own mask (the truth ``mwm evaluate`` uses) and DSC against the union
of the image's *other* present findings (rows of kind ``finding``, their masks minus the
own mask's pixels; a finding whose mask is the own mask is the same finding and left
out). Selectivity is the first minus the second, over the images that have at least one
other finding: +1 when the region is exactly the named finding, 0 when it cannot tell
them apart, negative when it prefers the other findings. Anatomy rows (kind
``anatomy``: skull, ventricles) are not findings and never count as "other".

This is the figure ``benchmarks/bench_localization.py --findings multi`` reports per
prompt; :func:`finding_selectivity` computes it for the regions of one prompt per image,
as ``mwm experiment`` and ``mwm demo`` localize them.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..data.findings import FINDINGS_FILE
from ..errors import DataError
from ..metrics import dice

_PRESENT = ("1", "true", "yes")
#: what ``mwm experiment`` writes into ``RUN/localization/`` (null without findings)
SELECTIVITY_JSON = "selectivity.json"


def other_finding_masks(data: str | Path) -> dict[str, list[Path]] | None:
    """Image stem → mask files of its present findings (kind ``finding``), from
    ``data/findings.csv``; None when the dataset has no such table."""
    table = Path(data) / FINDINGS_FILE
    if not table.is_file():
        return None
    masks: dict[str, list[Path]] = {}
    with open(table, newline="") as fh:
        for line, row in enumerate(csv.DictReader(fh), start=2):
            if (row.get("kind") or "finding").strip() != "finding":
                continue
            if (row.get("present") or "").strip().lower() not in _PRESENT:
                continue
            mask = (row.get("mask") or "").strip()
            if not mask:
                raise DataError(f"{table}, line {line}: a present finding has no 'mask' "
                                "cell; selectivity needs every present finding's mask.")
            masks.setdefault(Path(row["image"]).stem, []).append(Path(data) / mask)
    return masks


def _other_union(own_hw: np.ndarray, files: Iterable[Path]) -> np.ndarray:
    """The union of the other findings' masks, without the own mask's pixels; a mask equal
    to the own one is the same finding (e.g. masks/tumor/ of a brain-MRI phantom)."""
    from ..data.io import read_mask

    other_hw = np.zeros_like(own_hw)
    for path in files:
        m_hw = read_mask(path, own_hw.shape)
        if not np.array_equal(m_hw, own_hw):
            other_hw |= m_hw
    return other_hw & ~own_hw


def finding_selectivity(regions: str | Path, data: str | Path,
                        own_masks: dict[str, Path]) -> dict | None:
    """Selectivity of the region masks in ``regions`` (``<stem>.png``; a missing one is
    empty) on the images ``own_masks`` names (stem → own mask file).

    Returns ``{"n", "dice_own", "dice_other", "selectivity": {"mean", "std"}}`` over the
    images with another finding, or None when the dataset lists no findings or no image
    has another one.
    """
    from ..data.io import read_mask

    others = other_finding_masks(data)
    if others is None:
        return None
    own, other = [], []
    for stem, own_path in sorted(own_masks.items()):
        own_hw = read_mask(own_path)
        other_hw = _other_union(own_hw, others.get(stem, ()))
        if not other_hw.any():
            continue
        pred = Path(regions) / f"{stem}.png"
        pred_hw = read_mask(pred, own_hw.shape) if pred.is_file() else np.zeros_like(own_hw)
        own.append(dice(pred_hw, own_hw))
        other.append(dice(pred_hw, other_hw))
    if not own:
        return None
    diff = np.asarray(own) - np.asarray(other)
    return {"n": len(own), "dice_own": float(np.mean(own)), "dice_other": float(np.mean(other)),
            "selectivity": {"mean": float(diff.mean()), "std": float(diff.std())}}
