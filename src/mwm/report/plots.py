"""Plots for reports and results (matplotlib, headless): returned as PNG bytes."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .curves import StrategyCurve


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


def pretrain_loss_png(curves: list[StrategyCurve]) -> bytes:
    """Epoch-mean pretraining loss against epoch, one line per strategy (mean over seeds,
    a band from the seeds' min to max); right: each mean curve scaled to its own range,
    where the least-squares line through the last quarter (dotted, black) drops by the
    flatness (:mod:`mwm.report.curves`)."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, (ax_loss, ax_scaled) = plt.subplots(1, 2, figsize=(12, 4.4))
    for c in curves:
        (line,) = ax_loss.plot(c.epochs, c.mean, marker="." if len(c.epochs) < 30 else None,
                               label=_curve_label(c))
        if len(c.seeds) > 1:
            ax_loss.fill_between(c.epochs, c.low, c.high, color=line.get_color(), alpha=0.18,
                                 linewidth=0)
        low = min(c.mean, default=0.0)
        spread = (max(c.mean, default=0.0) - low) or 1.0  # a constant curve stays at 0
        ax_scaled.plot(c.epochs, [(v - low) / spread for v in c.mean], color=line.get_color())
        if c.flatness.fit is not None:
            slope, intercept = c.flatness.fit
            tail_x = list(c.flatness.tail)
            ax_scaled.plot(tail_x, [(slope * x + intercept - low) / spread for x in tail_x],
                           linestyle=":", color="black", linewidth=1.6)
    ax_loss.set_ylabel("loss (epoch mean of logged steps)")
    ax_loss.set_title("pretraining loss (its value depends on the masking)", fontsize=9)
    ax_scaled.set_ylabel("(loss − min) / (max − min)")
    ax_scaled.set_title("scaled to each curve's range; dotted: the last quarter's fit",
                        fontsize=9)
    for ax in (ax_loss, ax_scaled):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if ax_loss.get_legend_handles_labels()[0]:
        ax_scaled.legend(*ax_loss.get_legend_handles_labels(), fontsize=7, loc="upper left",
                         bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    return _png(fig)


def _curve_label(c: StrategyCurve) -> str:
    seeds = f"{len(c.seeds)} seed{'s' if len(c.seeds) != 1 else ''}"
    value = c.flatness.value
    return f"{c.strategy} ({seeds}, " + (f"flatness {value:+.3f})" if value is not None
                                         else "too short)")
