"""Evaluate a folder of predicted region masks against a folder of ground-truth masks.

:func:`evaluate_folders` goes through the **ground-truth** masks; each pairs with the
prediction of the same name (file stem, any extension). Both are read with
:func:`~mwm.data.io.read_mask` (its binarization rule: small label maps are non-zero,
anything else is above half its maximum).

* a missing prediction scores as an empty mask and is counted (``has_prediction`` = 0
  in ``per_image.csv``, ``n_missing`` in ``summary.json``);
* a prediction of another size than its ground truth, or an unreadable file, fails
  that image: it is recorded (``error`` column, ``failures`` list) and left out of the
  means; the other images go on;
* predictions without a ground truth are listed (``extra_predictions``), not scored.

Metrics and their empty-mask conventions are those of :mod:`mwm.metrics`. Means and
standard deviations (population, ``ddof=0``) are over the evaluated images (missing
predictions included, failed images excluded); ``null`` when no image was evaluated.

Abstention (``docs/presence.md``): ``empty_regions`` counts the evaluated images whose
ground truth is empty and how many of them got an empty prediction; with a
``presence.csv`` (given, or the one ``mwm postprocess`` copied into ``pred_dir``),
``presence`` scores its decisions against the ground truth (present = a non-empty mask):
precision, recall, balanced accuracy and the AUROC of the scores.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..config import opt
from ..errors import DataError

from ..metrics import CONVENTIONS, METRIC_NAMES, region_metrics

DEFAULT_TOLERANCE_PX = 2.0
PER_IMAGE_CSV = "per_image.csv"
SUMMARY_JSON = "summary.json"
CSV_COLUMNS = ("name", "has_prediction", *METRIC_NAMES, "gt_pixels", "pred_pixels", "error")


@dataclass(kw_only=True)
class EvaluateConfig:
    """Settings of ``mwm evaluate``."""

    pred: str = opt(help="folder of predicted masks", positional=True)
    gt: str = opt(help="folder of ground-truth masks (every one is scored)", positional=True)
    out: str | None = opt(None, "output folder (default: PRED_eval next to PRED)")
    tolerance: float = opt(DEFAULT_TOLERANCE_PX, "NSD tolerance in pixels", low=0.0)
    presence: str | None = opt(None, "presence.csv of `mwm localize --abstain`, scored against "
                               "the masks (default: the one `mwm postprocess` copied into PRED)",
                               metavar="FILE")
    quiet: bool = opt(False, "no progress bars")


def evaluate_folders(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike,
                     out_dir: str | os.PathLike, *, tolerance_px: float = DEFAULT_TOLERANCE_PX,
                     spacing: Sequence[float] = (1.0, 1.0),
                     presence: str | os.PathLike | None = None, progress: bool = True
                     ) -> dict[str, Any]:
    """Score every ground-truth mask in ``gt_dir`` against ``pred_dir``.

    Writes ``out_dir/per_image.csv`` (one row per ground-truth mask: name,
    has_prediction, each metric, gt_pixels, pred_pixels, error) and
    ``out_dir/summary.json``; returns the summary: ``n_gt``, ``n_evaluated``,
    ``n_missing``, ``n_failed``, ``failures`` (name, file, reason), ``metrics``
    (``{name: {"mean", "std"}}``), ``extra_predictions``, ``tolerance_px``, ``spacing``
    and ``conventions``, ``empty_regions`` and ``presence`` (module docstring; None
    without a presence table). When ``mwm postprocess`` or ``mwm refine`` wrote
    ``pred_dir``, only the masks its manifest lists are predictions.
    """
    from ..data.io import list_image_files
    from ..data.layouts import expand_slices, find_images
    from ..files import write_csv, write_json
    from ..progress import progress as progress_bar
    from ..metrics import check_spacing
    from ..runlog import stage_outputs

    spacing = check_spacing(spacing)
    if not math.isfinite(float(tolerance_px)) or float(tolerance_px) < 0:
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance_px}")
    gts = find_images(gt_dir)
    # an existing but empty prediction folder is allowed: every prediction is missing
    preds = {ref.name: ref for ref in expand_slices(list_image_files(pred_dir))}
    listed = stage_outputs(pred_dir, ("postprocess", "refine"))
    if listed is not None:  # the stage's own masks only: a stray file is never a prediction
        preds = {name: ref for name, ref in preds.items() if ref.path.name in listed}

    rows: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    scores: dict[str, list[float]] = {name: [] for name in METRIC_NAMES}
    n_missing = 0
    for ref in progress_bar(gts, total=len(gts), desc="evaluate", unit="mask",
                            enabled=progress):
        pred_ref = preds.get(ref.name)
        row, values, failure = _score(ref, pred_ref, tolerance_px, spacing)
        rows.append(row)
        if failure is not None:
            failures.append(failure)
            continue
        n_missing += pred_ref is None
        for name in METRIC_NAMES:
            scores[name].append(values[name])

    n_evaluated = len(gts) - len(failures)
    summary = {
        "n_gt": len(gts),
        "n_evaluated": n_evaluated,
        "n_missing": int(n_missing),
        "n_failed": len(failures),
        "metrics": {name: _mean_std(scores[name]) for name in METRIC_NAMES},
        "failures": failures,
        "extra_predictions": sorted(set(preds) - {ref.name for ref in gts}),
        "tolerance_px": float(tolerance_px),
        "spacing": list(spacing),
        "conventions": {
            **CONVENTIONS,
            "missing_prediction": "scored as an empty mask (counted in n_missing)",
            "failed_image": "unreadable file or prediction of another size than its ground "
                            "truth: listed in failures, left out of the means",
            "mean_std": "over evaluated images (missing included, failed excluded); std is "
                        "the population std (ddof=0); null when nothing was evaluated",
        },
        "pred_dir": str(pred_dir),
        "gt_dir": str(gt_dir),
        "empty_regions": empty_region_counts(rows),
        "presence": presence_summary(rows, pred_dir, presence),
    }
    out_dir = Path(out_dir)
    write_csv(out_dir / PER_IMAGE_CSV, rows, CSV_COLUMNS)
    write_json(out_dir / SUMMARY_JSON, summary)
    return summary


def _score(ref, pred_ref, tolerance_px: float, spacing) -> tuple[dict, dict | None, dict | None]:
    """(per_image.csv row, metrics, failure) of one ground-truth mask and its prediction."""
    from ..data.io import read_mask

    row: dict[str, Any] = {"name": ref.name, "has_prediction": int(pred_ref is not None)}
    failing = ref.path
    try:
        gt = read_mask(ref)
        if pred_ref is None:
            pred = np.zeros(gt.shape, dtype=bool)
        else:
            failing = pred_ref.path
            pred = read_mask(pred_ref, shape=gt.shape)
        values = region_metrics(pred, gt, tolerance_px=tolerance_px, spacing=spacing)
    except (DataError, ValueError, OSError) as err:
        reason = f"{type(err).__name__}: {err}"
        row.update({name: "" for name in METRIC_NAMES}, gt_pixels="", pred_pixels="",
                   error=reason)
        return row, None, {"name": ref.name, "file": str(failing), "reason": reason}
    row.update({name: f"{values[name]:.6f}" for name in METRIC_NAMES},
               gt_pixels=int(gt.sum()), pred_pixels=int(pred.sum()), error="")
    return row, values, None


def empty_region_counts(rows: list[dict]) -> dict[str, Any]:
    """Evaluated images with an empty ground truth, and how many got an empty prediction."""
    empty = [r for r in rows if not r["error"] and r["gt_pixels"] == 0]
    hit = sum(r["pred_pixels"] == 0 for r in empty)
    return {"n_empty_gt": len(empty), "n_empty_prediction": int(hit),
            "fraction": hit / len(empty) if empty else None}


def presence_summary(rows: list[dict], pred_dir, presence) -> dict[str, Any] | None:
    """The presence table's decisions and scores against the ground truth (a non-empty
    mask = present), over the evaluated images it lists; None without a table."""
    from .presence import listed_presence, presence_metrics, read_presence

    path = presence if presence is not None else listed_presence(pred_dir, ("postprocess",))
    if path is None:
        return None
    table = read_presence(path)
    scored = [r for r in rows if not r["error"] and r["name"] in table]
    scores = [table[r["name"]][0] for r in scored]
    decided = [table[r["name"]][1] for r in scored]
    truth = [r["gt_pixels"] > 0 for r in scored]
    n_evaluated = sum(not r["error"] for r in rows)
    return {"file": str(path), **presence_metrics(scores, decided, truth),
            "n_not_in_table": n_evaluated - len(scored)}


def _mean_std(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "std": None}
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std())}
