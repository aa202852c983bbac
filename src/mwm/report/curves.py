"""Pretraining loss curves of a run folder, and whether each has flattened.

Reads every cell's ``cells/<strategy>/seed<k>/pretrain/train_log.csv`` (one row per logged
optimizer step: ``step, epoch, loss, ...``; ``epoch`` is 0-based there) and reduces it to
one value per epoch: the **mean loss of the epoch's logged steps** (epochs are numbered
from 1 here, as the progress bar prints them; an epoch without a logged step is absent).

**Flatness** of a curve ``L`` over epochs ``x`` (``E`` epochs with a value):

* the tail is the last ``n = max(3, ceil(E / 4))`` epochs (the last quarter, and at least
  three points so that the line is a fit, not two noisy end points);
* ``b`` is the slope of the least-squares line through the tail's ``(x, L)``;
* ``flatness = -b * (x_last - x_first_of_tail) / (max L - min L)``: how much the fitted
  line still drops across the tail, as a fraction of the whole curve's range (0 when the
  curve is constant). Positive = still falling, negative = rising;
* **flat** when ``|flatness| <= FLAT_THRESHOLD`` (0.05: the last quarter moves less than
  5% of the curve's range), **falling** above, **rising** below ``-FLAT_THRESHOLD``, and
  **too short** under ``MIN_EPOCHS`` epochs (the tail would be more than half the curve).

A strategy's curve is the mean over its seeds at the epochs every seed has (min and max
as a band); its status is the flatness of that mean curve. The loss of masked image
modeling is measured on the masked cells only and depends on how many and which cells are
masked, so these curves judge convergence per strategy, never one strategy against another.
A cosine schedule makes the learning rate small in the last quarter, which flattens any
curve somewhat: "flat" says the loss stopped moving under this schedule; whether a longer
one would end lower is a question for a run with more epochs.

``write_pretrain_curves(run_dir)`` writes ``plots/pretrain_loss.png`` (the plot) and
``plots/pretrain_loss.csv`` (every cell's epoch means, to check the numbers); the HTML
report calls it and shows the plot with :func:`flatness_table`.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..files import read_json_or_none, write_bytes, write_csv

FLAT_THRESHOLD = 0.05
TAIL_FRACTION = 0.25
MIN_TAIL = 3
MIN_EPOCHS = 2 * MIN_TAIL
LOG_NAME = "train_log.csv"  # the pretraining's log (mwm.pretrain.train.LOG_NAME; a floor up)
PLOT_NAME = "pretrain_loss"  # plots/<PLOT_NAME>.png and .csv
CSV_FIELDS = ("strategy", "seed", "epoch", "loss", "logged_steps")


@dataclass
class Curve:
    """Epoch means of one pretraining log: ``epochs`` (1-based), ``loss``, and how many
    logged steps each mean averages (``steps``)."""

    epochs: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)


@dataclass
class Flatness:
    """``value`` (None when too short), ``status`` (flat, falling, rising, too short) and
    the tail's fitted line (``tail``: first and last epoch, ``fit``: slope, intercept)."""

    value: float | None
    status: str
    tail: tuple[int, int] | None = None
    fit: tuple[float, float] | None = None

    @property
    def flat(self) -> bool:
        return self.status == "flat"


@dataclass
class StrategyCurve:
    """One strategy: its seeds' curves, the mean curve over the common epochs with its
    min/max band, and the flatness of the mean curve and of each seed."""

    strategy: str
    seeds: dict[int, Curve]
    epochs: list[int]
    mean: list[float]
    low: list[float]
    high: list[float]
    flatness: Flatness
    seed_flatness: dict[int, Flatness]


def epoch_curve(log: Path) -> Curve:
    """The epoch-mean loss of one ``train_log.csv``; rows without a finite loss or an epoch
    (a restart leaves empty fields) are skipped."""
    sums: dict[int, list[float]] = {}
    with log.open(newline="") as handle:
        for row in csv.DictReader(handle):
            try:
                epoch, loss = int(row.get("epoch") or ""), float(row.get("loss") or "")
            except ValueError:
                continue
            if math.isfinite(loss):
                sums.setdefault(epoch + 1, []).append(loss)
    epochs = sorted(sums)
    return Curve(epochs, [float(np.mean(sums[e])) for e in epochs], [len(sums[e]) for e in epochs])


def flatness(epochs: list[int], loss: list[float], threshold: float = FLAT_THRESHOLD) -> Flatness:
    """The flatness of a curve (see the module's docstring for the definition)."""
    if len(epochs) < MIN_EPOCHS:
        return Flatness(None, "too short")
    n = max(MIN_TAIL, math.ceil(len(epochs) * TAIL_FRACTION))
    x_n = np.asarray(epochs[-n:], dtype=np.float64)
    y_n = np.asarray(loss[-n:], dtype=np.float64)
    dx_n = x_n - x_n.mean()
    slope = float((dx_n * (y_n - y_n.mean())).sum() / (dx_n * dx_n).sum())
    intercept = float(y_n.mean() - slope * x_n.mean())
    spread = max(loss) - min(loss)
    value = 0.0 if spread == 0 else -slope * float(x_n[-1] - x_n[0]) / spread
    status = "flat" if abs(value) <= threshold else ("falling" if value > 0 else "rising")
    return Flatness(value, status, (int(x_n[0]), int(x_n[-1])), (slope, intercept))


def strategy_curve(strategy: str, seeds: dict[int, Curve]) -> StrategyCurve:
    """Mean, min and max over the seeds at the epochs every seed has (a seed still running
    shortens the strategy's curve rather than mixing seed counts along it)."""
    common = sorted(set.intersection(*(set(c.epochs) for c in seeds.values())))
    by_epoch = [dict(zip(c.epochs, c.loss)) for c in seeds.values()]
    stack_se = np.array([[losses[e] for e in common] for losses in by_epoch],
                        dtype=np.float64).reshape(len(seeds), len(common))
    mean = stack_se.mean(axis=0).tolist()
    return StrategyCurve(strategy, seeds, common, mean, stack_se.min(axis=0).tolist(),
                         stack_se.max(axis=0).tolist(), flatness(common, mean),
                         {s: flatness(c.epochs, c.loss) for s, c in seeds.items()})


def pretrain_curves(run_dir: str | Path) -> list[StrategyCurve]:
    """Every strategy with at least one logged pretraining step, in the results' order
    (``results.json``) when there is one, else by name. With a ``results.json`` only its
    finished cells count: a folder left by other settings (another seed list, a copied
    run's cells not yet redone) is never mixed into the curves."""
    run_dir = Path(run_dir)
    results = read_json_or_none(run_dir / "results.json") or {}
    finished = ({(row.get("strategy"), int(row.get("seed", -1))) for row in results["cells"]}
                if isinstance(results.get("cells"), list) else None)
    found: dict[str, dict[int, Curve]] = {}
    for log in sorted((run_dir / "cells").glob(f"*/seed*/pretrain/{LOG_NAME}")):
        seed_dir = log.parent.parent
        try:
            seed = int(seed_dir.name.removeprefix("seed"))
        except ValueError:
            continue
        if finished is not None and (seed_dir.parent.name, seed) not in finished:
            continue
        curve = epoch_curve(log)
        if curve.epochs:
            found.setdefault(seed_dir.parent.name, {})[seed] = curve
    order = [row.get("strategy") for row in results.get("strategies") or []]
    names = [s for s in order if s in found] + sorted(s for s in found if s not in order)
    return [strategy_curve(s, dict(sorted(found[s].items()))) for s in names]


def _format(value: float | None) -> str:
    return "–" if value is None else f"{value:+.3f}"


def flatness_table(curves: list[StrategyCurve],
                   threshold: float = FLAT_THRESHOLD) -> tuple[list[str], list[list[str]]]:
    """(header, rows): per strategy its seeds, epochs, the tail, the flatness of the mean
    curve, how many seeds are flat on their own, and the status (upper case when not flat)."""
    header = ["strategy", "seeds", "epochs", "tail (epochs)", "flatness", "seeds flat", "status"]
    rows = []
    for c in curves:
        tail = c.flatness.tail
        flat_seeds = sum(f.flat for f in c.seed_flatness.values())
        status = c.flatness.status if c.flatness.flat else f"NOT FLAT: {c.flatness.status}"
        rows.append([c.strategy, str(len(c.seeds)), str(len(c.epochs)),
                     f"{tail[0]}–{tail[1]}" if tail else "–", _format(c.flatness.value),
                     f"{flat_seeds} of {len(c.seeds)}", status])
    return header, rows


def curve_rows(curves: list[StrategyCurve]) -> list[dict]:
    """One row per strategy, seed and epoch (the ``plots/pretrain_loss.csv`` rows)."""
    return [{"strategy": c.strategy, "seed": seed, "epoch": e, "loss": f"{loss:.6f}",
             "logged_steps": n}
            for c in curves for seed, curve in c.seeds.items()
            for e, loss, n in zip(curve.epochs, curve.loss, curve.steps)]


def write_pretrain_curves(run_dir: str | Path) -> Path | None:
    """Write ``plots/pretrain_loss.png`` and ``plots/pretrain_loss.csv``; return the PNG's
    path, or None when no cell has logged a pretraining step."""
    from .plots import pretrain_loss_png

    curves = pretrain_curves(run_dir)
    if not curves:
        return None
    png = Path(run_dir) / "plots" / f"{PLOT_NAME}.png"
    write_bytes(png, pretrain_loss_png(curves))
    write_csv(png.with_suffix(".csv"), curve_rows(curves), CSV_FIELDS)
    return png
