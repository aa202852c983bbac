"""Selectivity of regions on multi-finding data (mwm.localize.selectivity)."""

from __future__ import annotations

import csv

import cv2
import numpy as np
import pytest

from mwm.errors import DataError
from mwm.localize.selectivity import finding_selectivity, other_finding_masks

SIDE = 16


def _square(y: int, x: int, side: int = 4) -> np.ndarray:
    m = np.zeros((SIDE, SIDE), bool)
    m[y:y + side, x:x + side] = True
    return m


def _write(path, mask_hw) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), mask_hw.astype(np.uint8) * 255)
    return str(path)


def _dataset(root, images: dict[str, dict[str, np.ndarray]], anatomy: np.ndarray | None = None):
    """images: stem -> {finding: mask}; 'tumor' is the own finding (also masks/<stem>.png)."""
    rows = []
    for stem, found in images.items():
        _write(root / "masks" / f"{stem}.png", found["tumor"])
        for name in ("tumor", "hemorrhage", "calcification"):
            present = name in found
            mask = found.get(name, np.zeros((SIDE, SIDE), bool))
            _write(root / "masks" / name / f"{stem}.png", mask)
            rows.append([f"images/{stem}.png", name, "finding", int(present),
                         f"masks/{name}/{stem}.png", name])
        if anatomy is not None:
            _write(root / "masks" / "skull" / f"{stem}.png", anatomy)
            rows.append([f"images/{stem}.png", "skull", "anatomy", 1,
                         f"masks/skull/{stem}.png", "skull"])
    with open(root / "findings.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "finding", "kind", "present", "mask", "phrase"])
        w.writerows(rows)
    return {stem: root / "masks" / f"{stem}.png" for stem in images}


def test_region_on_the_named_finding_scores_one_and_on_the_other_minus_one(tmp_path):
    own, other = _square(0, 0), _square(8, 8)
    own_masks = _dataset(tmp_path / "data", {"a": {"tumor": own, "hemorrhage": other},
                                             "b": {"tumor": own, "hemorrhage": other}})
    regions = tmp_path / "regions"
    _write(regions / "a.png", own)
    _write(regions / "b.png", other)
    result = finding_selectivity(regions, tmp_path / "data", own_masks)
    assert result["n"] == 2
    assert result["dice_own"] == pytest.approx(0.5) and result["dice_other"] == pytest.approx(0.5)
    assert result["selectivity"]["mean"] == pytest.approx(0.0)
    assert result["selectivity"]["std"] == pytest.approx(1.0)


def test_images_without_another_finding_anatomy_and_the_own_finding_are_left_out(tmp_path):
    own = _square(0, 0)
    skull = np.ones((SIDE, SIDE), bool)  # anatomy covers everything: must not count
    own_masks = _dataset(tmp_path / "data", {
        "alone": {"tumor": own},
        "pair": {"tumor": own, "calcification": _square(10, 10, 2)}}, anatomy=skull)
    regions = tmp_path / "regions"
    _write(regions / "alone.png", skull)
    _write(regions / "pair.png", own | _square(10, 10, 2))
    result = finding_selectivity(regions, tmp_path / "data", own_masks)
    assert result["n"] == 1  # only "pair" has another finding; tumor's own row is not "other"
    own_dice = 2 * 16 / (20 + 16)
    other_dice = 2 * 4 / (20 + 4)
    assert result["selectivity"]["mean"] == pytest.approx(own_dice - other_dice)


def test_a_missing_region_is_empty_and_no_table_gives_none(tmp_path):
    own_masks = _dataset(tmp_path / "data", {"a": {"tumor": _square(0, 0),
                                                   "hemorrhage": _square(8, 8)}})
    result = finding_selectivity(tmp_path / "no-regions", tmp_path / "data", own_masks)
    assert result["dice_own"] == 0.0 and result["selectivity"]["mean"] == 0.0
    (tmp_path / "data" / "findings.csv").unlink()
    assert finding_selectivity(tmp_path / "no-regions", tmp_path / "data", own_masks) is None


def test_a_present_finding_without_a_mask_cell_is_an_error_naming_the_line(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "findings.csv").write_text("image,finding,kind,present,mask,phrase\n"
                                       "images/a.png,hemorrhage,finding,1,,hemorrhage\n")
    with pytest.raises(DataError, match=r"findings.csv, line 2: .*'mask'"):
        other_finding_masks(data)
