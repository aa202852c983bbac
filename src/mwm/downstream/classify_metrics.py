"""Classification metrics: accuracy, balanced accuracy, macro-F1, one-vs-rest AUROC.

All metrics take the softmax probabilities ``probs_nk`` over the K classes and integer
labels ``labels_n`` in ``[0, K)``; the prediction is the arg-max (first class on ties).

* **accuracy** — fraction of correct predictions;
* **balanced accuracy** — mean per-class recall over the classes present in the labels;
* **macro-F1** — mean F1 over the classes present in the labels *or* predicted (a class
  never present and never predicted is skipped; one predicted but absent scores 0);
* **AUROC** — one-vs-rest for every class present in the labels with at least one
  negative: the Mann–Whitney statistic on the class's probability column, computed
  exactly from average ranks (ties count one half). Classes that cannot be scored are
  listed in ``auroc_skipped``; ``auroc`` is the unweighted mean of the rest (``None``
  if none can be scored);
* **confusion matrix** — rows = true class, columns = predicted class.

:func:`write_predictions` keeps the per-image outcome (``predictions.csv``: split, image,
label, predicted, correct), from which a paired comparison of two encoders on the same
images gets its sampling error over images (``benchmarks/power.py``).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from ..metrics import binary_auroc  # one home: mwm.metrics

__all__ = ["binary_auroc", "confusion_matrix", "classification_metrics",
           "write_confusion_csv", "write_confusion_png", "write_predictions"]

PREDICTIONS_FILE = "predictions.csv"
PREDICTION_FIELDS = ("split", "image", "label", "predicted", "correct")


def confusion_matrix(labels_n, preds_n, k: int) -> np.ndarray:
    """(K, K) int64 counts, rows = true class, columns = predicted class."""
    labels = np.asarray(labels_n, dtype=np.int64).ravel()
    preds = np.asarray(preds_n, dtype=np.int64).ravel()
    return np.bincount(labels * k + preds, minlength=k * k).reshape(k, k)


def classification_metrics(probs_nk, labels_n, class_names: Sequence[str]) -> dict:
    """All metrics of the module docstring, plus per-class recall/precision/F1/AUROC."""
    probs = np.asarray(probs_nk, dtype=np.float64)
    labels = np.asarray(labels_n, dtype=np.int64).ravel()
    k = len(class_names)
    if probs.ndim != 2 or probs.shape != (labels.size, k):
        raise ValueError(f"probs must be (N, {k}) for N={labels.size} labels, got {probs.shape}")
    if labels.size == 0:
        raise ValueError("no samples to evaluate")
    if labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"labels must lie in [0, {k})")
    preds = probs.argmax(axis=1)
    cm = confusion_matrix(labels, preds, k)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    tp = np.diag(cm).astype(np.float64)
    per_class = {}
    recalls, f1s, aurocs, skipped = [], [], [], []
    for c, name in enumerate(class_names):
        recall = tp[c] / support[c] if support[c] else None
        precision = tp[c] / predicted[c] if predicted[c] else (0.0 if support[c] else None)
        if support[c] or predicted[c]:
            denom = support[c] + predicted[c]
            f1 = 2.0 * tp[c] / denom
            f1s.append(f1)
        else:
            f1 = None
        if recall is not None:
            recalls.append(recall)
        positive = labels == c
        if 0 < positive.sum() < labels.size:
            auc = binary_auroc(probs[:, c], positive)
            aurocs.append(auc)
        else:
            auc = None
            skipped.append(str(name))
        per_class[str(name)] = {"support": int(support[c]), "recall": recall,
                                "precision": precision, "f1": f1, "auroc": auc}
    return {
        "n": int(labels.size),
        "accuracy": float(tp.sum() / labels.size),
        "balanced_accuracy": float(np.mean(recalls)),
        "macro_f1": float(np.mean(f1s)) if f1s else 0.0,
        "auroc": float(np.mean(aurocs)) if aurocs else None,
        "auroc_skipped": skipped,
        "per_class": per_class,
        "classes": [str(c) for c in class_names],
        "confusion_matrix": cm.tolist(),
    }


def write_predictions(path: str | os.PathLike, names: Sequence[str], probs_nk, labels_n,
                      class_names: Sequence[str], split: str) -> None:
    """One row per image (atomic write): its name, true and predicted class (the arg-max,
    as :func:`classification_metrics` decides it) and ``correct`` (1 or 0)."""
    from ..files import write_csv

    preds = np.asarray(probs_nk, dtype=np.float64).argmax(axis=1)
    labels = np.asarray(labels_n, dtype=np.int64).ravel()
    if not len(names) == preds.size == labels.size:
        raise ValueError(f"{len(names)} names for {preds.size} predictions and "
                         f"{labels.size} labels")
    rows = [{"split": split, "image": name, "label": str(class_names[y]),
             "predicted": str(class_names[p]), "correct": int(p == y)}
            for name, y, p in zip(names, labels.tolist(), preds.tolist())]
    write_csv(path, rows, PREDICTION_FIELDS)


def write_confusion_csv(path: str | os.PathLike, cm, class_names: Sequence[str]) -> None:
    """``true\\predicted`` header row, then one row per true class (atomic write)."""
    from ..files import write_csv

    names = [str(c) for c in class_names]
    cm = np.asarray(cm)
    rows = [{"true\\predicted": name, **{p: int(cm[i, j]) for j, p in enumerate(names)}}
            for i, name in enumerate(names)]
    write_csv(path, rows, ["true\\predicted", *names])


def write_confusion_png(path: str | os.PathLike, cm, class_names: Sequence[str],
                        title: str = "") -> None:
    """A row-normalized confusion matrix heat map with counts, drawn with OpenCV."""
    import cv2

    from ..files import write_png

    cm = np.asarray(cm, dtype=np.int64)
    k = cm.shape[0]
    names = [str(c)[:14] for c in class_names]
    cell, font, scale = 64, cv2.FONT_HERSHEY_SIMPLEX, 0.42
    label_w = max(80, max(cv2.getTextSize(n, font, scale, 1)[0][0] for n in names) + 16)
    top = 56 + label_w  # room for the title and the rotated column labels
    width, height = label_w + k * cell + 12, top + k * cell + 28
    image = np.full((height, width, 3), 255, np.uint8)
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, np.maximum(rows, 1), dtype=np.float64)
    colors = cv2.applyColorMap(np.round(frac * 255).astype(np.uint8), cv2.COLORMAP_VIRIDIS)
    for i in range(k):
        for j in range(k):
            y0, x0 = top + i * cell, label_w + j * cell
            bgr = colors[i, j].tolist()
            image[y0:y0 + cell, x0:x0 + cell] = bgr[::-1]
            text = str(cm[i, j])
            (tw, th), _ = cv2.getTextSize(text, font, 0.5, 1)
            ink = (0, 0, 0) if frac[i, j] > 0.6 else (255, 255, 255)
            cv2.putText(image, text, (x0 + (cell - tw) // 2, y0 + (cell + th) // 2), font, 0.5,
                        ink, 1, cv2.LINE_AA)
        cv2.putText(image, names[i], (6, top + i * cell + cell // 2 + 4), font, scale,
                    (0, 0, 0), 1, cv2.LINE_AA)
    # column labels, written horizontally on a strip then rotated to read bottom-up
    strip = np.full((cell * k, label_w, 3), 255, np.uint8)
    for j in range(k):
        cv2.putText(strip, names[j], (6, j * cell + cell // 2 + 4), font, scale, (0, 0, 0), 1,
                    cv2.LINE_AA)
    rotated = cv2.rotate(strip, cv2.ROTATE_90_COUNTERCLOCKWISE)  # (label_w, cell*k)
    image[top - label_w:top, label_w:label_w + k * cell] = rotated
    cv2.putText(image, title or "confusion matrix (rows: true)", (6, 22), font, 0.5, (0, 0, 0), 1,
                cv2.LINE_AA)
    cv2.putText(image, "predicted", (label_w, 44), font, 0.45, (80, 80, 80), 1, cv2.LINE_AA)
    cv2.putText(image, "rows: true class, colour: row fraction", (6, height - 10), font, 0.4,
                (80, 80, 80), 1, cv2.LINE_AA)
    write_png(path, image, text={"Software": "mwm", "Description": "confusion matrix"})
