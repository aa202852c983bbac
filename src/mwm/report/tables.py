"""The experiment's results as text tables, from the results dict (``results.json``).

Shared by ``results.md`` (written by the experiment) and the HTML report (which reads the
results file only, never the runner): an overview of each evaluation's primary metric,
then one table per evaluation with every metric its task reports and their Δ against the
(first) reference, then, per further reference, a table of every metric's Δ against it
(:func:`reference_tables`). With two seeds or more, every Δ column is followed by its 95%
confidence interval "[lo, hi]" (Student's t over the paired seeds; "–" with one pair).
A missing value (None or NaN) prints as "–"; a reference's Δ against itself as
"(reference)".
"""

from __future__ import annotations

import math

MISSING = "–"
SELF = "(reference)"  # the reference's own Δ column


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


def _interval(delta, half) -> str:
    """The 95% CI of a Δ as "[lo, hi]" ("–" when undefined: fewer than two paired seeds)."""
    if _absent(delta) or _absent(half):
        return MISSING
    return f"[{delta - half:+.3f}, {delta + half:+.3f}]"


def references_of(results: dict) -> list[str]:
    """Every reference of a results dict (files of earlier versions name one, or none)."""
    if results.get("references") is not None:
        return list(results["references"])
    return [results["reference"]] if results.get("reference") else []


def with_ci(results: dict) -> bool:
    """Confidence intervals need two paired seeds: runs of one seed show none."""
    return len(results.get("seeds") or []) >= 2


def _paired(row: dict, evaluation: str, metric: str | None, reference: str, first: bool) -> dict:
    """The Δ statistics of ``metric`` (None: the primary) against ``reference``."""
    stats = (row.get("evaluations") or {}).get(evaluation) or {}
    if metric is None:
        metric = next(iter(stats), None)
    found = stats.get(metric) or {}
    if reference in (found.get("vs") or {}):
        return found["vs"][reference]
    if first and found:  # a file without per-reference statistics: the reference's own keys
        return found
    if first:  # without per-metric statistics: the primary's columns
        return {"delta": row.get(f"{evaluation}_delta"),
                "delta_std": row.get(f"{evaluation}_delta_std")}
    return {}


def results_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the overview: each strategy with each evaluation's primary metric
    and its Δ (and 95% CI) against every reference."""
    evals, references, ci = results["evaluations"], references_of(results), with_ci(results)
    header = ["strategy", "masking", "regions", "settings", "seeds", "realized mask ratio",
              "pretrain s"]
    primary = results.get("primary") or {}
    for e in evals:
        header.append(f"{e} {primary.get(e, 'accuracy')}")
        for reference in references:
            header += [f"Δ vs {reference}"] + ([f"Δ vs {reference} 95% CI"] if ci else [])
    rows = []
    for row in results["strategies"]:
        cells = [row["strategy"], row["masking"], row["regions"], row["settings"],
                 str(row["n_seeds"]), _number(row["ratio_overall"], 3),
                 _number(row["pretrain_seconds"], 0)]
        for e in evals:
            cells.append(_pm(row[f"{e}_mean"], row[f"{e}_std"]))
            for k, reference in enumerate(references):
                if row["strategy"] == reference:  # a Δ of 0 ± 0 with itself says nothing
                    cells += [SELF] + ([MISSING] if ci else [])
                    continue
                paired = _paired(row, e, primary.get(e), reference, k == 0)
                cells.append(_signed(paired.get("delta"), paired.get("delta_std")))
                if ci:
                    cells.append(_interval(paired.get("delta"), paired.get("delta_ci")))
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
    references = references_of(results)
    header = ["strategy", "seeds", "realized mask ratio", *metrics]
    if references:
        header += _delta_header(metrics, "", with_ci(results))
    rows = []
    for row in rows_in:
        stats = row["evaluations"][evaluation]
        cells = [row["strategy"], str(row["n_seeds"]), _number(row["ratio_overall"], 3)]
        cells += [_with_count(_pm(s.get("mean"), s.get("std")), s.get("n"), row["n_seeds"])
                  for s in (stats.get(m) or {} for m in metrics)]
        if references:
            cells += _delta_cells(results, row, evaluation, metrics, references[0], True)
        rows.append(cells)
    return header, rows


def _delta_header(metrics: list[str], suffix: str, ci: bool) -> list[str]:
    header = []
    for m in metrics:
        header += [f"Δ {m}{suffix}"] + ([f"Δ {m}{suffix} 95% CI"] if ci else [])
    return header


def _delta_cells(results: dict, row: dict, evaluation: str, metrics: list[str], reference: str,
                 first: bool) -> list[str]:
    """Each metric's Δ against ``reference`` (with the seed count when not every seed was
    paired) and, with two seeds or more, its 95% CI."""
    cells = []
    for m in metrics:
        if row["strategy"] == reference:
            cells += [SELF] + ([MISSING] if with_ci(results) else [])
            continue
        paired = _paired(row, evaluation, m, reference, first)
        cells.append(_with_count(_signed(paired.get("delta"), paired.get("delta_std")),
                                 paired.get("n_paired"), row["n_seeds"]))
        if with_ci(results):
            cells.append(_interval(paired.get("delta"), paired.get("delta_ci")))
    return cells


def reference_tables(results: dict,
                     evaluation: str) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) per reference after the first: every metric's Δ against it."""
    metrics = evaluation_metrics(results, evaluation)
    if evaluation_table(results, evaluation) is None:
        return []
    tables = []
    for reference in references_of(results)[1:]:
        header = ["strategy", "seeds", *_delta_header(metrics, "", with_ci(results))]
        rows = [[row["strategy"], str(row["n_seeds"]),
                 *_delta_cells(results, row, evaluation, metrics, reference, False)]
                for row in results["strategies"]]
        tables.append((f"{evaluation}: Δ vs {reference}", header, rows))
    return tables


def evaluation_title(results: dict, evaluation: str) -> str:
    task = (results.get("tasks") or {}).get(evaluation)
    primary = (results.get("primary") or {}).get(evaluation)
    details = ", ".join(p for p in (f"task {task}" if task else "",
                                    f"primary metric {primary}" if primary else "") if p)
    return f"{evaluation} ({details})" if details else evaluation


def results_notes(results: dict) -> list[str]:
    references = references_of(results)
    notes = [(f"Every metric: mean ± std over seeds {results['seeds']}, last epoch on the "
              "evaluation split (no model selection on it); – where no seed has a finite value.")]
    if references:
        notes.append(f"Δ: mean ± std of per-seed differences to {' and to '.join(references)} "
                     "(strategy − reference, same seed = same initialization and data order); "
                     "lower is better for distances such as HD95.")
        if with_ci(results):
            notes.append("95% CI of Δ: mean ± t(0.975, n − 1) · sd / √n over the n paired "
                         "seeds (sd: sample standard deviation, ddof 1); – with one pair.")
    for name, found in (results.get("matched") or {}).items():
        side, views = found["grid"][0], found.get("views")
        how = f"{views} augmented views of each" if views else "without augmentation"
        notes.append(f"{name}: ratio {found['ratio']:.4f}, the mean overall mask ratio "
                     f"{found['strategy']} gives the {found['images']} train images "
                     f"({found['regions']} regions, {how}, {side}x{side} grid); "
                     f"exact counts mask {found['grid_ratio']:.4f} of each image's cells.")
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


HYPOTHESES_TITLE = "Pre-registered hypotheses"


def hypotheses_table(results: dict) -> tuple[list[str], list[list[str]]] | None:
    """(header, rows) of the pre-registered tests and their verdicts; None without any."""
    tests = results.get("hypotheses") or []
    if not tests:
        return None
    header = ["test", "strategy", "against", "metric", "seeds", "Δ", "95% CI", "verdict"]
    rows = []
    for t in tests:
        verdict = t["verdict"]
        if t.get("seeds_needed"):
            verdict += (f" (CI ±{t['delta_ci']:.3f} > ±{t['margin']:g}: about "
                        f"{t['seeds_needed']} seeds needed)")
        rows.append([t["name"], t["strategy"], t["against"], f"{t['evaluation']} {t['metric']}",
                     str(len(t["seeds"])), _signed(t["delta"], t["delta_std"]),
                     _interval(t["delta"], t["delta_ci"]), verdict])
    return header, rows


def hypotheses_note(results: dict) -> str:
    margin = (results.get("hypotheses") or [{}])[0].get("margin")
    return (f"Verdicts by the rule fixed before the run: better / worse when the 95% CI of the "
            f"paired Δ excludes 0, equivalent when it lies inside ±{margin:g}, else "
            "inconclusive; Δ is mean ± std over the paired seeds.")


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows]


def results_markdown(results: dict) -> str:
    """The overview table and its notes, then one section per evaluation."""
    parts = ["\n".join(_markdown_table(*results_table(results))), *results_notes(results)]
    tested = hypotheses_table(results)
    if tested is not None:
        parts += [f"## {HYPOTHESES_TITLE}\n\n" + "\n".join(_markdown_table(*tested)),
                  hypotheses_note(results)]
    for e in results["evaluations"]:
        table = evaluation_table(results, e)
        if table is not None:
            parts.append(f"## {evaluation_title(results, e)}\n\n" + "\n".join(_markdown_table(*table)))
        for title, header, rows in reference_tables(results, e):
            parts.append(f"## {title}\n\n" + "\n".join(_markdown_table(header, rows)))
    return "\n\n".join(parts) + "\n"
