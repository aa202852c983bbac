"""Power calculation from a finished (pilot) experiment: how many seeds and how many
evaluation images make the 95% CI of every paired difference at most ``half_width`` wide
on each side (``benchmarks/power.py`` prints and writes it).

Two sources of error, each sized on its own:

* **seeds**: the per-seed paired differences ``d_s = metric(strategy, s) - metric(reference, s)``
  (``cells.csv``) have a sample sd (ddof 1); ``n`` seeds give the half-width
  ``t(0.975, n - 1) * sd / sqrt(n)`` (:mod:`mwm.experiment.stats`), and the plan is the
  smallest ``n >= 2`` that reaches the target. This is the interval the results report.
* **evaluation images**: both strategies of a seed are scored on the same images, so the
  difference has a per-image form ``u_i`` whose mean is the metric's difference:
  accuracy ``u_i = correct_A - correct_B`` (``predictions.csv``); balanced accuracy the same
  weighted by ``1 / (K * p_c)`` (K classes present, ``p_c`` the image's class share), which
  makes their mean the difference of mean per-class recalls; DSC and NSD the image's mean
  over classes (``per_image.csv`` of the segmentation tasks, the evaluation split). Its
  sampling error over images is ``SE = sd(u) / sqrt(M)`` (sd pooled over seeds as the root
  mean variance), and the plan is the smallest ``M`` with ``t(0.975, M - 1) * sd(u) / sqrt(M)``
  at the target, the same class shares assumed. Metrics without a per-image form (macro-F1,
  AUROC, HD95) get no image plan.

Both errors add (in quadrature) when the conclusion is meant for new images as well as new
seeds, so the report also gives the plan with each held at ``half_width / sqrt(2)``. The
pilot's seed sd includes its own evaluation-image noise, so the seed plan is conservative
when the main run uses more images.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from ..files import read_json_or_none
from .stats import finite, half_width, mean_std, n_for_half_width

PREDICTIONS = "predictions.csv"   # classification tasks (mwm.downstream.classify_metrics)
PER_IMAGE = "per_image.csv"       # segmentation tasks (mwm.downstream.segment)
PER_IMAGE_METRICS = {"accuracy": PREDICTIONS, "balanced_accuracy": PREDICTIONS,
                     "dice": PER_IMAGE, "nsd": PER_IMAGE}


@dataclass
class Pilot:
    """What a finished run folder holds for the calculation."""

    run: Path
    results: dict
    cells: list[dict]       # cells.csv rows, numbers parsed

    @property
    def references(self) -> list[str]:
        found = self.results.get("references")
        if found is not None:
            return list(found)
        return [self.results["reference"]] if self.results.get("reference") else []


def load_pilot(run: str | Path) -> Pilot:
    run = Path(run)
    results = read_json_or_none(run / "results.json")
    if results is None:
        raise DataError(f"{run / 'results.json'} is missing or unreadable: give the folder of a "
                        "finished `mwm experiment` run (its --out).")
    if not (run / "cells.csv").is_file():
        raise DataError(f"{run / 'cells.csv'} is missing: the run has no finished cell yet.")
    with (run / "cells.csv").open(newline="") as handle:
        cells = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(handle)]
    return Pilot(run, results, cells)


def _number(text: str):
    try:
        return float(text)
    except (TypeError, ValueError):
        return text


def chosen_metrics(pilot: Pilot, requested: list[str] | None) -> list[tuple[str, str]]:
    """(evaluation, metric) pairs: ``EVAL:METRIC`` or ``METRIC`` (every evaluation that
    reports it); by default each evaluation's primary metric."""
    metrics = metrics_of(pilot)
    if not requested:
        primary = pilot.results.get("primary") or {e: "accuracy" for e in metrics}
        return [(e, m) for e, m in primary.items() if m in metrics.get(e, [])]
    pairs = []
    for item in requested:
        evaluation, _, metric = item.rpartition(":")
        found = [(e, metric) for e in pilot.results["evaluations"]
                 if (not evaluation or e == evaluation) and metric in metrics.get(e, [])]
        if not found:
            raise DataError(f"--metric {item}: no evaluation of {pilot.run} reports it; "
                            f"reported: {metrics}.")
        pairs += [p for p in found if p not in pairs]
    return pairs


def metrics_of(pilot: Pilot) -> dict[str, list[str]]:
    """Each evaluation's metrics: the results file's, else (files of earlier versions) the
    ``<evaluation>_<metric>`` columns of cells.csv."""
    if pilot.results.get("metrics"):
        return pilot.results["metrics"]
    columns = list(pilot.cells[0]) if pilot.cells else []
    return {e: [c[len(e) + 1:] for c in columns if c.startswith(f"{e}_")]
            for e in pilot.results["evaluations"]}


def seed_differences(pilot: Pilot, evaluation: str, metric: str, strategy: str,
                     reference: str) -> dict[int, float]:
    """{seed: strategy − reference} over the seeds both have a finite value for."""
    key = f"{evaluation}_{metric}"
    values = {name: {int(c["seed"]): c.get(key) for c in pilot.cells if c["strategy"] == name}
              for name in (strategy, reference)}
    return {s: v - values[reference][s] for s, v in values[strategy].items()
            if finite(v) and finite(values[reference].get(s))}


# --------------------------------------------------------------------------- per image

def image_scores(folder: Path, metric: str) -> dict[str, tuple[str | None, float]] | None:
    """{image: (label, value)} of one evaluation folder (None without a per-image file)."""
    kind = PER_IMAGE_METRICS.get(metric)
    path = folder / kind if kind else None
    if path is None or not path.is_file():
        return None
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if kind == PREDICTIONS:
        return {r["image"]: (r["label"], float(r["correct"])) for r in rows}
    split = _eval_split(folder, rows)
    by_image: dict[str, list[float]] = {}
    for row in rows:
        if row["split"] == split:
            by_image.setdefault(row["image"], []).append(_float(row[metric]))
    return {image: (None, math.fsum(v) / len(v)) for image, v in by_image.items()
            if all(finite(x) for x in v)}


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


def _eval_split(folder: Path, rows: list[dict]) -> str:
    """The split the evaluation's metrics came from (its record; else val, else test)."""
    record = read_json_or_none(folder / "evaluation.json") or {}
    split = (record.get("metrics") or {}).get("split")
    if split:
        return split
    return "val" if any(r["split"] == "val" for r in rows) else "test"


def image_differences(mine: dict, theirs: dict, metric: str) -> list[float]:
    """``u_i`` of the module docstring on the images both were scored on."""
    images = sorted(set(mine) & set(theirs))
    diffs = [mine[i][1] - theirs[i][1] for i in images]
    if metric != "balanced_accuracy" or not images:
        return diffs
    counts: dict[str, int] = {}
    for image in images:
        counts[mine[image][0]] = counts.get(mine[image][0], 0) + 1
    classes, total = len(counts), len(images)
    return [d * total / (classes * counts[mine[i][0]]) for d, i in zip(diffs, images)]


def image_spread(pilot: Pilot, evaluation: str, metric: str, strategy: str, reference: str,
                 seeds) -> tuple[float | None, int]:
    """(sd of ``u_i`` pooled over seeds, images per seed) — (None, 0) without files."""
    variances, sizes = [], []
    for seed in seeds:
        pair = [image_scores(pilot.run / "cells" / name / f"seed{seed}" / f"eval_{evaluation}",
                             metric) for name in (strategy, reference)]
        if pair[0] is None or pair[1] is None:
            continue
        diffs = image_differences(pair[0], pair[1], metric)
        if len(diffs) >= 2:
            variances.append(mean_std(diffs)[1] ** 2)
            sizes.append(len(diffs))
    if not variances:
        return None, 0
    return math.sqrt(math.fsum(variances) / len(variances)), round(math.fsum(sizes) / len(sizes))


# --------------------------------------------------------------------------- the plan

def comparison(pilot: Pilot, evaluation: str, metric: str, strategy: str, reference: str,
               target: float) -> dict:
    """One strategy against one reference: the seed and the image components and plans."""
    diffs = seed_differences(pilot, evaluation, metric, strategy, reference)
    delta, sd = mean_std(list(diffs.values()))
    sd = sd if len(diffs) >= 2 else None
    sd_image, images = image_spread(pilot, evaluation, metric, strategy, reference, sorted(diffs))
    split = target / math.sqrt(2)
    return {"evaluation": evaluation, "metric": metric, "strategy": strategy,
            "reference": reference, "pairs": len(diffs),
            "delta": delta if diffs else None, "sd_seeds": sd,
            "half_width_now": half_width(sd, len(diffs)) if sd is not None else None,
            "seeds_needed": n_for_half_width(sd, target) if sd is not None else None,
            "images": images, "sd_image": sd_image,
            "se_images": sd_image / math.sqrt(images) if sd_image is not None else None,
            "images_needed": n_for_half_width(sd_image, target) if sd_image is not None else None,
            "seeds_needed_split": n_for_half_width(sd, split) if sd is not None else None,
            "images_needed_split": (n_for_half_width(sd_image, split)
                                    if sd_image is not None else None)}


def power_analysis(run: str | Path, *, target: float = 0.02, metrics: list[str] | None = None,
                   references: list[str] | None = None) -> dict:
    """Every strategy against every reference, for each chosen (evaluation, metric)."""
    if not target > 0:
        raise DataError(f"--half-width {target}: must be positive.")
    pilot = load_pilot(run)
    names = [row["strategy"] for row in pilot.results["strategies"]]
    references = references or pilot.references
    unknown = [r for r in references if r not in names]
    if not references or unknown:
        raise DataError(f"{pilot.run}: name the reference(s) to compare against with --reference "
                        f"(strategies: {names}); " + (f"unknown: {unknown}." if unknown else
                                                      "the run has none."))
    rows = [comparison(pilot, e, m, s, r, target)
            for e, m in chosen_metrics(pilot, metrics) for r in references
            for s in names if s != r]
    return {"run": str(pilot.run), "name": pilot.results.get("name"), "target": target,
            "seeds": pilot.results.get("seeds"), "references": references,
            "comparisons": rows, "design": _design(rows)}


def _design(rows: list[dict]) -> dict:
    """Per (evaluation, metric): the largest plan over its comparisons, and which one."""
    design = {}
    for row in rows:
        entry = design.setdefault(f"{row['evaluation']}:{row['metric']}", {})
        for key in ("seeds_needed", "images_needed", "seeds_needed_split", "images_needed_split"):
            if row[key] is not None and row[key] > entry.get(key, (0, ""))[0]:
                entry[key] = (row[key], f"{row['strategy']} vs {row['reference']}")
    return design


# --------------------------------------------------------------------------- the report

def _cell(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    return str(value) if isinstance(value, int) else f"{value:.{digits}f}"


def _signed(value) -> str:
    return "–" if value is None else f"{value:+.4f}"


COLUMNS = ("strategy", "vs", "paired seeds", "Δ", "sd over seeds", "95% half-width now",
           "seeds needed", "images per seed", "sd per image", "SE over images", "images needed")


def power_markdown(analysis: dict) -> str:
    """The report: the method, one table per (evaluation, metric), the plan."""
    h = analysis["target"]
    lines = [f"# Power calculation from the run `{analysis['name']}`", "",
             (f"Target: the 95% confidence interval of every paired difference (strategy − "
              f"reference, same seed) has a half-width of at most {h:g}. The run's seeds: "
              f"{analysis['seeds']}; references: {', '.join(analysis['references'])}."), "",
             ("* **seeds needed**: the smallest n ≥ 2 with t(0.975, n − 1) · sd / √n ≤ "
              f"{h:g}, sd the sample sd (ddof 1) of the run's per-seed differences "
              "(– with fewer than two paired seeds);"),
             ("* **images needed**: the smallest M with t(0.975, M − 1) · sd(u) / √M ≤ "
              f"{h:g}, u the per-image difference on the same evaluation images "
              "(accuracy: correct − correct; balanced accuracy: the same weighted by 1 / (K · "
              "class share); DSC / NSD: the image's mean over classes), its sd pooled over "
              "seeds; SE over images = sd(u) / √(images per seed); – where the metric has no "
              "per-image form or the cells wrote no per-image file;"),
             (f"* **both at once** (errors over seeds and over images added in quadrature): "
              f"each held at {h:g} / √2 = {h / math.sqrt(2):.4f}."), ""]
    groups: dict[str, list[dict]] = {}
    for row in analysis["comparisons"]:
        groups.setdefault(f"{row['evaluation']}:{row['metric']}", []).append(row)
    for key, rows in groups.items():
        evaluation, metric = key.split(":", 1)
        lines += [f"## {evaluation}: {metric}", "", "| " + " | ".join(COLUMNS) + " |",
                  "|" + "---|" * len(COLUMNS)]
        for r in rows:
            cells = [r["strategy"], r["reference"], str(r["pairs"]), _signed(r["delta"]),
                     _cell(r["sd_seeds"]), _cell(r["half_width_now"]), _cell(r["seeds_needed"]),
                     _cell(r["images"] or None), _cell(r["sd_image"]), _cell(r["se_images"]),
                     _cell(r["images_needed"])]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", *_plan_lines(analysis["design"].get(key, {})), ""]
    return "\n".join(lines)


def _plan_lines(design: dict) -> list[str]:
    def say(key: str, what: str) -> str:
        if key not in design:
            return f"{what}: – (no comparison could be sized)"
        value, where = design[key]
        return f"{what}: **{value}** (set by {where})"

    return [f"Plan: {say('seeds_needed', 'seeds')}; {say('images_needed', 'evaluation images')}.",
            (f"Both at once: {say('seeds_needed_split', 'seeds')}; "
             f"{say('images_needed_split', 'evaluation images')}.")]
