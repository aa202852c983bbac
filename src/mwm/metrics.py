"""Segmentation metrics for bool region masks ``(H, W)``: one home for every stage.

Overlap metrics, from the pixel counts TP = |P ∩ G|, FP = |P \\ G|, FN = |G \\ P|:

* :func:`dice` = 2TP / (2TP + FP + FN);
* :func:`iou` = TP / (TP + FP + FN);
* :func:`precision` ("coverage": how much of the prediction is lesion) = TP / (TP + FP);
* :func:`recall` (how much of the lesion is predicted) = TP / (TP + FN).

Boundary metrics (:func:`nsd`, :func:`hausdorff95`) use the MONAI definition of the
boundary (``compute_surface_dice`` with ``use_subvoxels=False``): the mask minus its
binary erosion by the 3x3 cross, with everything outside the image counted as
background (so mask pixels on the image border are boundary pixels). Distances are
Euclidean distances between boundary pixel centres, scaled by ``spacing = (row, column)``
(pixels by default), computed exactly with ``scipy.ndimage.distance_transform_edt``.

* :func:`nsd` — normalized surface Dice: the fraction of boundary pixels of both masks
  that lie within ``tolerance`` (``<=``, in the units of ``spacing``) of the other
  mask's boundary;
* :func:`hausdorff95` — the larger of the two directed 95th-percentile boundary
  distances (linear interpolation between ranks, as numpy and MONAI).

**Empty masks** (no NaN is ever returned):

* both empty → dice, iou, nsd, precision, recall = 1 (a correct "nothing here");
  hausdorff95 = 0;
* exactly one empty → dice, iou, nsd, precision, recall = 0; hausdorff95 = inf.

Box metrics (:func:`region_metrics`) compare the prediction's **box region** — the union
of the tight bounding boxes of its 8-connected components (:func:`box_region`) — with
the ground-truth mask itself: ``box_precision`` is how much of the box region is lesion,
``box_recall`` how much of the lesion the box region covers.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .regions import as_mask, boxes_to_mask, component_boxes

METRIC_NAMES = ("dice", "nsd", "precision", "recall", "iou",
                "box_dice", "box_iou", "box_precision", "box_recall")

CONVENTIONS = {
    "empty_empty": "prediction and ground truth both empty: dice = iou = nsd = precision = "
                   "recall = 1 (hausdorff95 = 0)",
    "one_empty": "exactly one of prediction and ground truth empty: dice = iou = nsd = "
                 "precision = recall = 0 (hausdorff95 = inf)",
    "boundary": "mask minus its erosion by the 3x3 cross, outside of the image = background "
                "(MONAI compute_surface_dice, use_subvoxels=False)",
    "nsd": "fraction of boundary pixels of both masks within the tolerance (<=) of the other "
           "mask's boundary; Euclidean distances scaled by spacing (row, column)",
    "box_region": "union of the tight bounding boxes of the prediction's 8-connected "
                  "components; box_* metrics compare it with the ground-truth mask",
}


# --------------------------------------------------------------------------- helpers

def _pair(pred: Any, gt: Any) -> tuple[np.ndarray, np.ndarray]:
    p, g = as_mask(pred, "pred"), as_mask(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred has shape {p.shape} but gt has shape {g.shape}; "
                         "masks must have the same size")
    return p, g


def confusion(pred: Any, gt: Any) -> tuple[int, int, int]:
    """Pixel counts (TP, FP, FN)."""
    p, g = _pair(pred, gt)
    tp = int(np.count_nonzero(p & g))
    return tp, int(np.count_nonzero(p)) - tp, int(np.count_nonzero(g)) - tp


def _dice(tp: int, fp: int, fn: int) -> float:
    denom = 2 * tp + fp + fn
    return 1.0 if denom == 0 else 2.0 * tp / denom


def _iou(tp: int, fp: int, fn: int) -> float:
    denom = tp + fp + fn
    return 1.0 if denom == 0 else tp / denom


def _precision(tp: int, fp: int, fn: int) -> float:
    if tp + fp == 0:  # empty prediction: right only if there is nothing to find
        return 1.0 if fn == 0 else 0.0
    return tp / (tp + fp)


def _recall(tp: int, fp: int, fn: int) -> float:
    if tp + fn == 0:  # empty ground truth: right only if nothing was predicted
        return 1.0 if fp == 0 else 0.0
    return tp / (tp + fn)


# --------------------------------------------------------------------------- overlap

def dice(pred: Any, gt: Any) -> float:
    """Dice coefficient 2|P∩G| / (|P| + |G|); both empty → 1."""
    return _dice(*confusion(pred, gt))


def iou(pred: Any, gt: Any) -> float:
    """Intersection over union |P∩G| / |P∪G|; both empty → 1."""
    return _iou(*confusion(pred, gt))


def precision(pred: Any, gt: Any) -> float:
    """TP / (TP + FP), the share of the prediction that is lesion; both empty → 1."""
    return _precision(*confusion(pred, gt))


def recall(pred: Any, gt: Any) -> float:
    """TP / (TP + FN), the share of the lesion that is predicted; both empty → 1."""
    return _recall(*confusion(pred, gt))


# --------------------------------------------------------------------------- boundary

def boundary(mask: Any) -> np.ndarray:
    """Boundary pixels: the mask minus its erosion by the 3x3 cross (outside = background)."""
    from scipy import ndimage

    m = as_mask(mask)
    if not m.any():
        return np.zeros(m.shape, dtype=bool)
    cross = ndimage.generate_binary_structure(2, 1)
    return m & ~ndimage.binary_erosion(m, structure=cross, border_value=0)


def surface_distances(pred: Any, gt: Any, spacing: Sequence[float] = (1.0, 1.0)
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Distances pred boundary → gt boundary and gt boundary → pred boundary.

    Each array holds one distance per boundary pixel (raster order); a mask whose
    counterpart is empty gets ``inf`` distances.
    """
    p, g = _pair(pred, gt)
    spacing = check_spacing(spacing)
    bp, bg = boundary(p), boundary(g)
    if not bp.any() or not bg.any():
        return (np.full(int(bp.sum()), np.inf), np.full(int(bg.sum()), np.inf))
    # Nearest boundary points all lie inside the bounding box of both boundaries, so the
    # distance transform can run on that crop only: exact, and fast for small lesions.
    rows, cols = np.nonzero(bp | bg)
    crop = np.s_[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    bp, bg = bp[crop], bg[crop]
    from scipy import ndimage

    to_gt = ndimage.distance_transform_edt(~bg, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~bp, sampling=spacing)
    return to_gt[bp], to_pred[bg]


def nsd(pred: Any, gt: Any, tolerance_px: float = 2.0,
        spacing: Sequence[float] = (1.0, 1.0)) -> float:
    """Normalized surface Dice at ``tolerance_px`` (units of ``spacing``; pixels by default).

    Both empty → 1; exactly one empty → 0.
    """
    tolerance = float(tolerance_px)
    if not np.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"NSD tolerance must be a finite number >= 0, got {tolerance_px}")
    p, g = _pair(pred, gt)
    has_p, has_g = bool(p.any()), bool(g.any())
    if not has_p and not has_g:
        return 1.0
    if has_p != has_g:
        return 0.0
    d_pg, d_gp = surface_distances(p, g, spacing)
    correct = np.count_nonzero(d_pg <= tolerance) + np.count_nonzero(d_gp <= tolerance)
    return float(correct / (d_pg.size + d_gp.size))


def hausdorff95(pred: Any, gt: Any, spacing: Sequence[float] = (1.0, 1.0),
                percentile: float = 95.0) -> float:
    """95th-percentile symmetric Hausdorff distance between the boundaries.

    Both empty → 0; exactly one empty → inf.
    """
    p, g = _pair(pred, gt)
    has_p, has_g = bool(p.any()), bool(g.any())
    if not has_p and not has_g:
        return 0.0
    if has_p != has_g:
        return float("inf")
    d_pg, d_gp = surface_distances(p, g, spacing)
    return float(max(np.percentile(d_pg, percentile), np.percentile(d_gp, percentile)))


def check_spacing(spacing: Sequence[float]) -> tuple[float, float]:
    values = tuple(float(s) for s in spacing)
    if len(values) != 2 or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing must be two positive numbers (row, column), got {spacing!r}")
    return values  # type: ignore[return-value]


# --------------------------------------------------------------------------- regions

def box_region(mask: Any, connectivity: int = 8) -> np.ndarray:
    """Union of the tight bounding boxes of the mask's connected components."""
    m = as_mask(mask)
    return boxes_to_mask(component_boxes(m, connectivity), m.shape)


def region_metrics(pred: Any, gt: Any, *, tolerance_px: float = 2.0,
                   spacing: Sequence[float] = (1.0, 1.0),
                   include_hd95: bool = False) -> dict[str, float]:
    """All region metrics of ``pred`` against ``gt`` (keys :data:`METRIC_NAMES`).

    ``box_*`` compare the box region of ``pred`` (:func:`box_region`) with ``gt``.
    ``include_hd95`` adds ``hausdorff95`` (inf when exactly one mask is empty).
    """
    p, g = _pair(pred, gt)
    counts = confusion(p, g)
    box_counts = confusion(box_region(p), g)
    out = {
        "dice": _dice(*counts),
        "nsd": nsd(p, g, tolerance_px, spacing),
        "precision": _precision(*counts),
        "recall": _recall(*counts),
        "iou": _iou(*counts),
        "box_dice": _dice(*box_counts),
        "box_iou": _iou(*box_counts),
        "box_precision": _precision(*box_counts),
        "box_recall": _recall(*box_counts),
    }
    if include_hd95:
        out["hausdorff95"] = hausdorff95(p, g, spacing)
    return out


# --------------------------------------------------------------------------- scores

def binary_auroc(scores_n, positive_n) -> float:
    """Exact AUROC = P(score of a positive > score of a negative) + ½ P(tie).

    Mann–Whitney U from average ranks; raises ValueError without both positives and negatives.
    """
    from scipy.stats import rankdata

    scores = np.asarray(scores_n, dtype=np.float64).ravel()
    positive = np.asarray(positive_n, dtype=bool).ravel()
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs at least one positive and one negative")
    ranks = rankdata(scores, method="average")
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))
