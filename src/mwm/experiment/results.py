"""Experiment results: one row per strategy, mean ± std over seeds, as CSV, Markdown and a plot.

Files written into the run folder:

* ``cells.csv``      one row per finished cell (strategy, seed, realized ratios, time, metrics);
* ``results.csv``    one row per strategy: n seeds, realized overall mask ratio, pretraining
  seconds, and for each evaluation its task's primary metric (mean/std) and the difference
  to the reference strategy (mean of per-seed differences, over the seeds both have);
* ``results.md``     the same as a table, with the missing cells listed;
* ``results.json``   all of the above, for the report;
* ``accuracy_vs_ratio.png``  each evaluation's primary metric against the realized overall
  mask ratio (:func:`mwm.report.plots.accuracy_vs_ratio_png`).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from ..files import read_json_or_none, write_bytes, write_csv, write_json, write_text
from ..report.plots import accuracy_vs_ratio_png
from ..report.tables import results_markdown
from .config import ExperimentConfig, task_of
from .grid import CELL_FILE

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
        for item in config.evaluate:
            metrics = record["evaluations"].get(item["name"], {})
            for metric in task_of(item).metrics:
                row[f"{item['name']}_{metric}"] = metrics.get(metric)
        rows.append(row)
    return rows


def primary_metrics(config: ExperimentConfig) -> dict[str, str]:
    """Each evaluation's primary metric (what the table, the deltas and the plot show)."""
    return {item["name"]: task_of(item).primary for item in config.evaluate}


def strategy_rows(config: ExperimentConfig, cells: list[dict]) -> list[dict]:
    primary = primary_metrics(config)
    evals = list(primary)
    reference = {(c["seed"], e): c.get(f"{e}_{primary[e]}") for c in cells
                 if c["strategy"] == config.reference for e in evals}
    rows = []
    for strategy in config.strategies:
        mine = [c for c in cells if c["strategy"] == strategy.name]
        row = {"strategy": strategy.name, "masking": strategy.masking,
               "pretrains": strategy.pretrains,
               "regions": strategy.regions if strategy.reads_regions else "",
               "settings": " ".join(f"{k}={v}" for k, v in strategy.params.items()),
               "n_seeds": len(mine)}
        row["ratio_overall"], _ = mean_std([c["ratio_overall"] for c in mine])
        row["pretrain_seconds"], _ = mean_std([c["pretrain_seconds"] for c in mine])
        for e in evals:
            key = f"{e}_{primary[e]}"
            row[f"{e}_mean"], row[f"{e}_std"] = mean_std([c.get(key) for c in mine])
            diffs = [c[key] - reference[(c["seed"], e)] for c in mine
                     if reference.get((c["seed"], e)) is not None and c.get(key) is not None]
            row[f"{e}_delta"], row[f"{e}_delta_std"] = mean_std(diffs)
        rows.append(row)
    return rows


def write_results(config: ExperimentConfig, run: Path, cells: list, prepared=None) -> dict:
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
    results = {"name": config.name, "evaluations": evals, "primary": primary_metrics(config),
               "reference": config.reference,
               "strategies": per_strategy, "cells": per_cell, "missing": missing,
               "seeds": config.seeds,
               "localization_dice": (localization or {}).get("metrics", {}).get("dice", {}).get("mean")}
    write_json(run / "results.json", results)
    write_text(run / "results.md", results_markdown(results))
    if per_cell:
        write_bytes(run / "accuracy_vs_ratio.png", accuracy_vs_ratio_png(results))
    return results
