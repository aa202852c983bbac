"""The experiment's results as text tables, from the results dict (``results.json``).

Shared by ``results.md`` (written by the experiment) and the HTML report (which reads the
results file only, never the runner).
"""

from __future__ import annotations

import math


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
    primary = results.get("primary") or {}
    for e in evals:
        header += [f"{e} {primary.get(e, 'accuracy')}"] + ([f"Δ vs {reference}"] if reference else [])
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
    metrics = sorted(set((results.get("primary") or {}).values()) or {"accuracy"})
    named = ", ".join(metrics)
    notes = [f"{named[0].upper() + named[1:]}: mean ± std over seeds {results['seeds']}, last "
             "epoch on the evaluation split (no model selection on it). Δ: mean ± std of per-seed "
             "differences to the reference (same seed = same initialization and data order)."]
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
