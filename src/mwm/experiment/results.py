"""Experiment results: per strategy and evaluation, every metric's mean ± std over seeds and
its paired difference to each reference, with the difference's 95% confidence interval, as
CSV, Markdown, JSON and one plot per evaluation.

Files written into the run folder:

* ``cells.csv``      one row per finished cell (strategy, seed, realized ratios, time, and
  every metric of every evaluation as ``<evaluation>_<metric>``);
* ``results.csv``    one row per strategy: n seeds, realized overall mask ratio, pretraining
  seconds; per evaluation its primary metric (``<evaluation>_mean/_std/_delta/_delta_std``)
  and, for every metric the task reports, ``<evaluation>_<metric>_mean``, ``_std``, ``_n``
  (seeds with a finite value), ``_delta``, ``_delta_std``, ``_delta_ci`` (the half-width
  of the Δ's 95% CI; empty with fewer than two paired seeds) and ``_n_paired``, all
  against the (first) reference; with several references also
  ``<evaluation>_<metric>_vs_<reference>_delta`` (``_delta_std``, ``_delta_ci``,
  ``_n_paired``) for each of them; with a matched-ratio strategy, ``matched``,
  ``matched_ratio`` and ``matched_grid_ratio``;
* ``results.md``     an overview table of the primaries, the pre-registered hypotheses'
  verdicts (:mod:`mwm.experiment.hypotheses`) when the file names any, then one table per evaluation
  with every metric and its Δ (and CI, with two seeds or more), one Δ table per further
  reference, and the missing cells;
* ``results.json``   all of the above (each strategy row's ``evaluations`` holds the
  per-metric statistics, ``vs`` the Δ against every reference), for the report;
* ``plots/<evaluation>.png``  the evaluation's primary metric against the realized overall
  mask ratio (:func:`mwm.report.plots.metric_vs_ratio_png`).

A missing or non-finite value (a task that did not report the metric, an HD95 with no
finite distance) is left out of the means; a metric with no value at all is ``None`` in
``results.json``, empty in ``results.csv`` and ``–`` in the tables. Spreads are sample
standard deviations (ddof 1, :mod:`mwm.experiment.stats`), the CI Student's t.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..files import read_json_or_none, write_bytes, write_csv, write_json, write_text
from ..report.plots import metric_vs_ratio_png
from ..report.tables import results_markdown
from .config import ExperimentConfig, task_of
from .grid import CELL_FILE, cell_fingerprint
from .hypotheses import judge_hypotheses
from .stats import mean_std, paired_summary
from .stats import finite as _finite

__all__ = ["cell_rows", "csv_row", "mean_std", "metric_stats", "strategy_rows", "write_results"]

PLOTS = "plots"
PAIRED = ("delta", "delta_std", "delta_ci", "n_paired")
STATS = ("mean", "std", "n", *PAIRED)


def _or_none(value: float) -> float | None:
    return None if math.isnan(value) else value


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
    """Each evaluation's primary metric (what the overview, the old columns and the plots show)."""
    return {item["name"]: task_of(item).primary for item in config.evaluate}


def paired_stats(mine: list[dict], reference: dict[int, float], key: str) -> dict:
    """Mean ± std of the per-seed differences of ``key`` to the reference's same seed, the
    95% CI half-width of that mean (None with fewer than two pairs) and the pair count."""
    return paired_summary([c[key] - reference[c["seed"]] for c in mine
                           if _finite(c.get(key)) and _finite(reference.get(c["seed"]))])


def metric_stats(mine: list[dict], references: dict[str, dict[int, float]], key: str) -> dict:
    """Mean ± std over seeds of one metric (``key`` of the cell rows), its paired Δ to the
    first reference (:func:`paired_stats`) and, under ``vs``, to every reference (by name);
    ``None`` where there is no value."""
    values = [c.get(key) for c in mine]
    mean, std = mean_std(values)
    vs = {name: paired_stats(mine, seeds, key) for name, seeds in references.items()}
    first = next(iter(vs.values())) if vs else paired_stats(mine, {}, key)
    stats = {"mean": _or_none(mean), "std": _or_none(std), "n": sum(map(_finite, values)), **first}
    if vs:
        stats["vs"] = vs
    return stats


def _settings(strategy) -> str:
    parts = []
    for key, value in strategy.params.items():
        if key == "ratio" and strategy.matched is not None:
            parts.append(f"ratio={value:.4f} (matched to {strategy.match})")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def strategy_rows(config: ExperimentConfig, cells: list[dict]) -> list[dict]:
    """One row per strategy; ``row["evaluations"][evaluation][metric]`` holds
    :func:`metric_stats`, and ``<evaluation>_mean`` etc. repeat the primary's (NaN when
    missing), the keys results files of earlier versions had."""
    primary = primary_metrics(config)
    metrics = {item["name"]: task_of(item).metrics for item in config.evaluate}
    matching = any(s.match is not None for s in config.strategies)
    rows = []
    for strategy in config.strategies:
        mine = [c for c in cells if c["strategy"] == strategy.name]
        row = {"strategy": strategy.name, "masking": strategy.masking,
               "pretrains": strategy.pretrains,
               "regions": strategy.regions if strategy.reads_regions else "",
               "settings": _settings(strategy), "n_seeds": len(mine)}
        if matching:
            found = strategy.matched or {}
            row.update(matched=strategy.match or "", matched_ratio=found.get("ratio"),
                       matched_grid_ratio=found.get("grid_ratio"))
        row["ratio_overall"], _ = mean_std([c["ratio_overall"] for c in mine])
        row["pretrain_seconds"], _ = mean_std([c["pretrain_seconds"] for c in mine])
        row["evaluations"] = {}
        for e, names in metrics.items():
            stats = {}
            for metric in names:
                key = f"{e}_{metric}"
                references = {name: {c["seed"]: c.get(key) for c in cells if c["strategy"] == name}
                              for name in config.references}
                stats[metric] = metric_stats(mine, references, key)
            row["evaluations"][e] = stats
            first = stats[primary[e]]
            for suffix, stat in (("mean", "mean"), ("std", "std"), ("delta", "delta"),
                                 ("delta_std", "delta_std")):
                row[f"{e}_{suffix}"] = float("nan") if first[stat] is None else first[stat]
        rows.append(row)
    return rows


def csv_row(row: dict) -> dict:
    """A strategy row with its per-metric statistics as flat columns (with several
    references, also each one's Δ as ``<evaluation>_<metric>_vs_<reference>_<stat>``)."""
    flat = {k: v for k, v in row.items() if k != "evaluations"}
    for e, stats in row["evaluations"].items():
        for metric, values in stats.items():
            flat.update({f"{e}_{metric}_{stat}": values[stat] for stat in STATS})
            vs = values.get("vs") or {}
            if len(vs) > 1:
                for name, paired in vs.items():
                    flat.update({f"{e}_{metric}_vs_{name}_{stat}": paired[stat] for stat in PAIRED})
    return flat


def finished_records(config: ExperimentConfig, run: Path, cells: list) -> list[dict]:
    """The ``cell.json`` of every cell finished with the current settings (a cell.json left
    by other settings, whose shard has not rerun it yet, counts as missing)."""
    records = []
    for cell in cells:
        record = read_json_or_none(cell.folder(run) / CELL_FILE)
        if record and record.get("fingerprint") == cell_fingerprint(config, cell):
            records.append(record)
    return records


def write_results(config: ExperimentConfig, run: Path, cells: list, prepared=None) -> dict:
    records = finished_records(config, run, cells)
    done = {r["cell"] for r in records}
    missing = [c.key for c in cells if c.key not in done]
    per_cell = cell_rows(config, records)
    per_strategy = strategy_rows(config, per_cell)
    evals = [item["name"] for item in config.evaluate]
    if per_cell:
        write_csv(run / "cells.csv", per_cell, list(per_cell[0]))
    flat = [csv_row(row) for row in per_strategy]
    write_csv(run / "results.csv", flat, list(flat[0]))
    localization = getattr(prepared, "localization", None)
    results = {"name": config.name, "evaluations": evals, "primary": primary_metrics(config),
               "tasks": {item["name"]: task_of(item).name for item in config.evaluate},
               "metrics": {item["name"]: list(task_of(item).metrics) for item in config.evaluate},
               "reference": config.reference, "references": list(config.references),
               "matched": {s.name: s.matched for s in config.strategies if s.matched},
               "strategies": per_strategy, "cells": per_cell, "missing": missing,
               "hypotheses": judge_hypotheses(config.hypotheses, per_cell),
               "seeds": config.seeds,
               "plots": {e: f"{PLOTS}/{e}.png" for e in evals} if per_cell else {},
               "localization_dice": (localization or {}).get("metrics", {}).get("dice", {}).get("mean"),
               "localization_selectivity": (localization or {}).get("selectivity")}
    write_json(run / "results.json", results)
    write_text(run / "results.md", results_markdown(results))
    _write_plots(run / PLOTS, results)
    return results


def _write_plots(folder: Path, results: dict) -> None:
    """One plot per evaluation and the pretraining loss curves; plots of evaluations the file
    no longer has are removed."""
    from ..report.curves import PLOT_NAME, write_pretrain_curves

    for e, path in results["plots"].items():
        write_bytes(folder.parent / path, metric_vs_ratio_png(results, e))
    write_pretrain_curves(folder.parent)  # the loss per epoch: has pretraining flattened?
    for old in folder.glob("*.png") if folder.is_dir() else ():
        if old.stem not in results["plots"] and old.stem != PLOT_NAME:
            old.unlink()
