"""The experiment's results as text tables, from the results dict (``results.json``).

Shared by ``results.md`` (written by the experiment) and the HTML report (which reads the
results file only, never the runner): an overview of each evaluation's primary metric,
then one table per evaluation with every metric its task reports and their Δ.
A missing value (None or NaN) prints as "–".
"""

from __future__ import annotations

import math

MISSING = "–"


def _absent(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _pm(mean, std, digits: int = 3) -> str:
    if _absent(mean):
        return MISSING
    return f"{mean:.{digits}f}" + ("" if _absent(std) else f" ± {std:.{digits}f}")


def _signed(mean, std) -> str:
    if _absent(mean):
        return MISSING
    return f"{mean:+.3f}" + ("" if _absent(std) else f" ± {std:.3f}")


def _number(value, digits: int) -> str:
    return MISSING if _absent(value) else f"{value:.{digits}f}"


def results_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the overview: each strategy with each evaluation's primary metric."""
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


def _with_count(text: str, n: int | None, seeds: int) -> str:
    """How many seeds gave the number, when some did and others did not."""
    return f"{text} ({n} of {seeds} seeds)" if n and n < seeds else text


def evaluation_metrics(results: dict, evaluation: str) -> list[str]:
    """The evaluation's metrics, its primary first."""
    names = list((results.get("metrics") or {}).get(evaluation) or [])
    primary = (results.get("primary") or {}).get(evaluation)
    if primary not in names:
        return names
    return [primary] + [m for m in names if m != primary]


def evaluation_table(results: dict, evaluation: str) -> tuple[list[str], list[list[str]]] | None:
    """(header, rows) of one evaluation: strategy, seeds, realized mask ratio, every metric
    (mean ± std, with how many seeds had a value when not all did), then the Δ of every
    metric against the reference. None for results files without per-metric statistics."""
    metrics = evaluation_metrics(results, evaluation)
    rows_in = results["strategies"]
    if not metrics or any(evaluation not in (r.get("evaluations") or {}) for r in rows_in):
        return None
    reference = results["reference"]
    header = ["strategy", "seeds", "realized mask ratio", *metrics]
    if reference:
        header += [f"Δ {m}" for m in metrics]
    rows = []
    for row in rows_in:
        stats = row["evaluations"][evaluation]
        cells = [row["strategy"], str(row["n_seeds"]), _number(row["ratio_overall"], 3)]
        cells += [_with_count(_pm(s.get("mean"), s.get("std")), s.get("n"), row["n_seeds"])
                  for s in (stats.get(m) or {} for m in metrics)]
        if reference:
            cells += [_with_count(_signed(s.get("delta"), s.get("delta_std")), s.get("n_paired"),
                                  row["n_seeds"])
                      for s in (stats.get(m) or {} for m in metrics)]
        rows.append(cells)
    return header, rows


def evaluation_title(results: dict, evaluation: str) -> str:
    task = (results.get("tasks") or {}).get(evaluation)
    primary = (results.get("primary") or {}).get(evaluation)
    details = ", ".join(p for p in (f"task {task}" if task else "",
                                    f"primary metric {primary}" if primary else "") if p)
    return f"{evaluation} ({details})" if details else evaluation


def results_notes(results: dict) -> list[str]:
    reference = results.get("reference")
    notes = [(f"Every metric: mean ± std over seeds {results['seeds']}, last epoch on the "
              "evaluation split (no model selection on it); – where no seed has a finite value.")]
    if reference:
        notes.append(f"Δ: mean ± std of per-seed differences to {reference} (strategy − "
                     "reference, same seed = same initialization and data order); lower is "
                     "better for distances such as HD95.")
    if results.get("localization_dice") is not None:
        notes.append(f"Localized regions: mean DSC {results['localization_dice']:.3f} against the "
                     "masks on the test split." + _selectivity_note(results))
    if results["missing"]:
        notes.append(f"Missing cells ({len(results['missing'])}): " + ", ".join(results["missing"]))
    return notes


def _selectivity_note(results: dict) -> str:
    sel = results.get("localization_selectivity")
    if not sel:
        return ""
    return (f" Selectivity {sel['selectivity']['mean']:+.3f} ± {sel['selectivity']['std']:.3f} "
            f"on the {sel['n']} test images with another finding: DSC {sel['dice_own']:.3f} "
            f"against the prompt's finding minus {sel['dice_other']:.3f} against the image's "
            "other findings (1 = only the named finding, 0 = no preference).")


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows]


def results_markdown(results: dict) -> str:
    """The overview table and its notes, then one section per evaluation."""
    parts = ["\n".join(_markdown_table(*results_table(results))), *results_notes(results)]
    for e in results["evaluations"]:
        table = evaluation_table(results, e)
        if table is not None:
            parts.append(f"## {evaluation_title(results, e)}\n\n" + "\n".join(_markdown_table(*table)))
    return "\n\n".join(parts) + "\n"
