"""The loss and the metrics of ``mwm segment``: cross-entropy + soft Dice for training;
per image and foreground class DSC, NSD (2 px) and HD95 (:mod:`mwm.metrics`, with
``mwm evaluate``'s empty conventions), and their per-class and macro aggregates."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from ..metrics import dice, hausdorff95, nsd

__all__ = ["NSD_TOLERANCE", "aggregate", "class_aggregate", "dice_ce_loss", "image_metrics"]

NSD_TOLERANCE = 2.0


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + (1 - soft Dice), the Dice averaged over the foreground classes."""
    ce = F.cross_entropy(logits, target)
    probs = torch.softmax(logits, dim=1)[:, 1:]
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].to(probs.dtype)
    inter = (probs * onehot).sum(dim=(0, 2, 3))
    total = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    soft_dice = (2 * inter + 1.0) / (total + 1.0)
    return ce + (1.0 - soft_dice.mean())


def image_metrics(pred: np.ndarray, truth: np.ndarray, classes: list[str]) -> list[dict]:
    """One row per foreground class of one image: DSC, NSD and HD95 of ``pred == c`` vs
    ``truth == c`` (empty conventions of :mod:`mwm.metrics`); ``present``: the truth
    holds the class."""
    rows = []
    for c, name in enumerate(classes[1:], start=1):
        p, t = pred == c, truth == c
        rows.append({"class": name, "present": bool(t.any()), "dice": dice(p, t),
                     "nsd": nsd(p, t, NSD_TOLERANCE), "hd95": hausdorff95(p, t)})
    return rows


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def class_aggregate(rows: list[dict]) -> dict:
    """One class over images: means of DSC and NSD, HD95 over its finite values,
    ``dice_present`` over the images whose truth holds the class."""
    finite = [r["hd95"] for r in rows if np.isfinite(r["hd95"])]
    present = [r["dice"] for r in rows if r["present"]]
    return {"n": len(rows), "dice": _mean(r["dice"] for r in rows),
            "dice_present": _mean(present), "n_present": len(present),
            "nsd": _mean(r["nsd"] for r in rows), "hd95": _mean(finite),
            "hd95_infinite": len(rows) - len(finite)}


def aggregate(rows: list[dict]) -> dict:
    """``per_class`` aggregates (:func:`class_aggregate`) and their macro means over the
    classes (counts summed); with one class, that class's figures."""
    by_class: dict[str, list[dict]] = {}
    for row in rows:
        by_class.setdefault(row["class"], []).append(row)
    per_class = {name: class_aggregate(group) for name, group in by_class.items()}
    figures = per_class.values()
    return {"n": max((c["n"] for c in figures), default=0),
            **{k: _mean(c[k] for c in figures) for k in ("dice", "dice_present", "nsd", "hd95")},
            "n_present": sum(c["n_present"] for c in figures),
            "hd95_infinite": sum(c["hd95_infinite"] for c in figures),
            "per_class": per_class}
