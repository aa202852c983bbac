"""Plots for reports and results (matplotlib, headless): returned as PNG bytes."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display here or on clusters
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    _pyplot().close(fig)
    return buffer.getvalue()


def metric_vs_ratio_png(results: dict, evaluation: str) -> bytes:
    """One evaluation's primary metric (mean ± std over seeds; accuracy for classification,
    DSC for segmentation) against the realized overall mask ratio.

    One point per strategy: circles masking without regions, squares localized regions,
    triangles other region sources (ground truth, saliency); a dashed line for strategies
    without pretraining.
    """
    plt = _pyplot()
    e = evaluation
    metric = (results.get("primary") or {}).get(e, "accuracy")
    task = (results.get("tasks") or {}).get(e)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for row in results["strategies"]:
        mean, std = row[f"{e}_mean"], row[f"{e}_std"]
        if math.isnan(mean):
            continue
        if not row.get("pretrains", row["masking"] != "none"):  # results of older runs
            ax.axhline(mean, color="gray", linestyle="--", label=f"{row['strategy']} (no pretraining)")
            continue
        marker = "o" if not row["regions"] else ("s" if row["regions"] == "localized" else "^")
        ax.errorbar(row["ratio_overall"], mean, yerr=std, fmt=marker, capsize=3,
                    label=row["strategy"])
    ax.set_xlabel("realized overall mask ratio")
    ax.set_ylabel(f"{e} {metric}")
    ax.set_title(f"{results['name']}: {e}" + (f" ({task})" if task else ""))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # off the points
    fig.tight_layout()
    return _png(fig)


def training_curves_png(logs: dict[str, Path]) -> bytes | None:
    """PNG bytes of loss and realized mask ratio against step, one line per run."""
    plt = _pyplot()
    series = {}
    for name, path in logs.items():
        if path.is_file():
            with path.open(newline="") as handle:
                rows = list(csv.DictReader(handle))
            if rows:
                series[name] = rows
    if not series:
        return None
    fig, (ax_loss, ax_ratio) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, rows in series.items():
        steps = [int(r["step"]) for r in rows]
        ax_loss.plot(steps, [float(r["loss"]) for r in rows], label=name)
        ax_ratio.plot(steps, [float(r["ratio_overall"]) for r in rows], label=name)
    for ax, label in ((ax_loss, "loss (normalized-pixel MSE on masked cells)"),
                      (ax_ratio, "realized overall mask ratio")):
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)
