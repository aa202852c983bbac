"""Experiment results: one row per strategy, mean ± std over seeds, as CSV, Markdown and a plot.

Files written into the run folder:

* ``cells.csv``      one row per finished cell (strategy, seed, realized ratios, time, metrics);
* ``results.csv``    one row per strategy: n seeds, realized overall mask ratio, pretraining
  seconds, and for each evaluation the accuracy mean/std and the difference to the
  reference strategy (mean of per-seed differences, over the seeds both have);
* ``results.md``     the same as a table, with the missing cells listed;
* ``results.json``   all of the above, for the report;
* ``accuracy_vs_ratio.png``  downstream accuracy against the realized overall mask ratio
  (:func:`mwm.report.plots.accuracy_vs_ratio_png`).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from ..files import read_json_or_none, write_bytes, write_csv, write_json, write_text
from ..report.plots import accuracy_vs_ratio_png
from .config import ExperimentConfig

CELL_FIELDS = ("strategy", "masking", "seed", "ratio_overall", "ratio_salient", "ratio_background",
               "pretrain_seconds", "final_loss")


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def cell_rows(config: ExperimentConfig, records: list[dict]) -> list[dict]:
    rows = []
    for record in records:
        pre = record.get("pretrain") or {}
        row = {"strategy": record["strategy"], "masking": record["masking"], "seed": record["seed"],
               "ratio_overall": pre.get("ratio_overall"), "ratio_salient": pre.get("ratio_salient"),
               "ratio_background": pre.get("ratio_background"),
               "pretrain_seconds": pre.get("seconds"), "final_loss": pre.get("final_loss")}
        for name, metrics in record["evaluations"].items():
            row[f"{name}_accuracy"] = metrics["accuracy"]
            row[f"{name}_balanced_accuracy"] = metrics.get("balanced_accuracy")
        rows.append(row)
    return rows


def strategy_rows(config: ExperimentConfig, cells: list[dict]) -> list[dict]:
    evals = [item["name"] for item in config.evaluate]
    reference = {(c["seed"], e): c.get(f"{e}_accuracy") for c in cells
                 if c["strategy"] == config.reference for e in evals}
    rows = []
    for strategy in config.strategies:
        mine = [c for c in cells if c["strategy"] == strategy.name]
        row = {"strategy": strategy.name, "masking": strategy.masking, "pretrains": strategy.pretrains,
               "regions": strategy.regions if strategy.reads_regions else "",
               "settings": " ".join(f"{k}={v}" for k, v in strategy.params.items()),
               "n_seeds": len(mine)}
        row["ratio_overall"], _ = mean_std([c["ratio_overall"] for c in mine])
        row["pretrain_seconds"], _ = mean_std([c["pretrain_seconds"] for c in mine])
        for e in evals:
            row[f"{e}_mean"], row[f"{e}_std"] = mean_std([c.get(f"{e}_accuracy") for c in mine])
            diffs = [c[f"{e}_accuracy"] - reference[(c["seed"], e)] for c in mine
                     if reference.get((c["seed"], e)) is not None]
            row[f"{e}_delta"], row[f"{e}_delta_std"] = mean_std(diffs)
        rows.append(row)
    return rows


def write_results(config: ExperimentConfig, run: Path, cells: list, prepared=None) -> dict:
    from .run import CELL_FILE

    records = [r for r in (read_json_or_none(c.folder(run) / CELL_FILE) for c in cells) if r]
    done = {r["cell"] for r in records}
    missing = [c.key for c in cells if c.key not in done]
    per_cell = cell_rows(config, records)
    per_strategy = strategy_rows(config, per_cell)
    evals = [item["name"] for item in config.evaluate]
    if per_cell:
        write_csv(run / "cells.csv", per_cell, list(per_cell[0]))
    write_csv(run / "results.csv", per_strategy, list(per_strategy[0]))
    localization = getattr(prepared, "localization", None)
    results = {"name": config.name, "evaluations": evals, "reference": config.reference,
               "strategies": per_strategy, "cells": per_cell, "missing": missing,
               "seeds": config.seeds,
               "localization_dice": (localization or {}).get("metrics", {}).get("dice", {}).get("mean")}
    write_json(run / "results.json", results)
    write_text(run / "results.md", results_markdown(results))
    if per_cell:
        write_bytes(run / "accuracy_vs_ratio.png", accuracy_vs_ratio_png(results))
    return results


def _pm(mean: float, std: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _signed(mean: float, std: float) -> str:
    return "–" if math.isnan(mean) else f"{mean:+.3f} ± {std:.3f}"


def _number(value: float, digits: int) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def results_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the strategy table as text cells, for Markdown and the report."""
    evals, reference = results["evaluations"], results["reference"]
    header = ["strategy", "masking", "regions", "settings", "seeds", "realized mask ratio",
              "pretrain s"]
    for e in evals:
        header += [f"{e} accuracy"] + ([f"Δ vs {reference}"] if reference else [])
    rows = []
    for row in results["strategies"]:
        cells = [row["strategy"], row["masking"], row["regions"], row["settings"],
                 str(row["n_seeds"]), _number(row["ratio_overall"], 3),
                 _number(row["pretrain_seconds"], 0)]
        for e in evals:
            cells.append(_pm(row[f"{e}_mean"], row[f"{e}_std"]))
            if reference:
                cells.append(_signed(row[f"{e}_delta"], row[f"{e}_delta_std"]))
        rows.append(cells)
    return header, rows


def results_notes(results: dict) -> list[str]:
    notes = [f"Accuracy: mean ± std over seeds {results['seeds']}, last epoch on the evaluation "
             "split (no model selection on it). Δ: mean ± std of per-seed differences to the "
             "reference (same seed = same initialization and data order)."]
    if results.get("localization_dice") is not None:
        notes.append(f"Localized regions: mean DSC {results['localization_dice']:.3f} against the "
                     "masks on the test split.")
    if results["missing"]:
        notes.append(f"Missing cells ({len(results['missing'])}): " + ", ".join(results["missing"]))
    return notes


def results_markdown(results: dict) -> str:
    header, rows = results_table(results)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n\n" + "\n\n".join(results_notes(results)) + "\n"
