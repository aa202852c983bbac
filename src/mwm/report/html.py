"""``mwm report RUN_DIR``: one self-contained HTML file for a demo or experiment folder.

Every figure is embedded as a base64 PNG ``data:`` URI and the page has no external
reference (no scripts, fonts or styles from the network), so it opens offline and can be
mailed as one file. Sections appear when their files exist in the run folder:

1. results: the overview table (``results.json``), then per evaluation its table of
   every metric and its plot of the primary metric against mask ratio (``plots/``);
2. segmentation: per evaluation whose folders hold overlays, a few image | truth |
   prediction overlays of one seed of each strategy, captioned with their DSC
   (``cells/<strategy>/seed<k>/eval_<name>/overlays/``, ``per_image.csv``);
3. data: the dataset contact sheet (``data/contact_sheet.png``);
4. localization: per-image saliency and region overlays with their DSC
   (``saliency/``, ``regions/``, ``localization/per_image.csv``);
5. pretraining: the last masked-cell / reconstruction grid of each strategy and the
   training curves (``cells/*/seed*/pretrain/``);
6. pretraining loss: the epoch-mean loss per strategy and whether it has flattened
   (:mod:`mwm.report.curves`; ``write_report`` also writes ``plots/pretrain_loss.png``
   and ``.csv``);
7. the run manifest (``run_manifest.json``).

A small inline script records, when the page has loaded, how many images decoded
(``data-images-loaded`` / ``data-images-total`` on ``<body>``); the browser test reads it.
"""

from __future__ import annotations

import base64
import csv
import html
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import opt
from ..files import read_json_or_none, write_text
from ..localize.selectivity import SELECTIVITY_JSON
from .curves import (
    FLAT_THRESHOLD,
    MIN_EPOCHS,
    flatness_table,
    pretrain_curves,
    write_pretrain_curves,
)
from .plots import pretrain_loss_png, training_curves_png

MAX_LOCALIZATION_TILES = 12
MAX_SEGMENTATION_OVERLAYS = 4  # per strategy and evaluation
STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;
max-width:1200px;color:#222;padding:0 16px}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:2em}
table{border-collapse:collapse;font-size:.9em;margin:8px 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
figure{display:inline-block;margin:6px;vertical-align:top;text-align:center}
figure img{max-width:100%;image-rendering:pixelated}
figcaption{font-size:.8em;color:#444;max-width:320px}
.wide img{max-width:100%}pre{background:#f7f7f7;padding:8px;overflow:auto;font-size:.8em}
.note{color:#555;font-size:.9em}
"""
LOAD_CHECK = """
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var ok = images.filter(function (im) { return im.complete && im.naturalWidth > 0; });
  document.body.setAttribute('data-images-total', images.length);
  document.body.setAttribute('data-images-loaded', ok.length);
});
"""


def png_data_uri(image: np.ndarray | bytes) -> str:
    """An RGB/gray uint8 array (or PNG bytes) as a ``data:image/png;base64,`` URI."""
    if not isinstance(image, (bytes, bytearray)):
        import cv2

        bgr = image[..., ::-1] if image.ndim == 3 else image
        ok, encoded = cv2.imencode(".png", np.ascontiguousarray(bgr))
        if not ok:
            raise ValueError("could not encode a report figure as PNG")
        image = encoded.tobytes()
    return "data:image/png;base64," + base64.b64encode(image).decode("ascii")


def figure(image: np.ndarray | bytes | Path, caption: str = "", wide: bool = False) -> str:
    data = image.read_bytes() if isinstance(image, Path) else image
    cls = ' class="wide"' if wide else ""
    return (f'<figure{cls}><img src="{png_data_uri(data)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


@dataclass(kw_only=True)
class ReportConfig:
    """Settings of ``mwm report``."""

    run_dir: str = opt(help="folder written by `mwm demo` or `mwm experiment`", positional=True,
                       metavar="RUN_DIR")
    out: str | None = opt(None, "report path (default: RUN_DIR/report.html)", metavar="FILE.html")
    quiet: bool = opt(False, "print only the report's path")


#: The generator tag of MWM's reports: ``mwm report`` replaces only files that carry it.
GENERATOR = "mwm report"


def is_report(path: str | Path) -> bool:
    """Whether ``path`` is an HTML report MWM wrote (its head names the generator)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        return False
    return f'<meta name="generator" content="{GENERATOR}">'.encode() in head


def write_report(run_dir: str | Path, path: str | Path | None = None) -> Path:
    run_dir = Path(run_dir)
    path = Path(path) if path else run_dir / "report.html"
    try:  # the curves' files sit beside the results' plots; the report embeds them anyway
        write_pretrain_curves(run_dir)
    except OSError:  # a read-only run folder reported elsewhere (--out)
        pass
    write_text(path, render_report(run_dir))
    return path


def render_report(run_dir: Path) -> str:
    manifest = read_json_or_none(run_dir / "run_manifest.json") or {}
    results = read_json_or_none(run_dir / "results.json")
    title = f"MWM report: {(results or {}).get('name') or run_dir.name}"
    sections = [_results_section(run_dir, results), *_segmentation_sections(run_dir, results),
                _data_section(run_dir),
                _localization_section(run_dir), _pretraining_section(run_dir),
                _pretrain_loss_section(run_dir), _manifest_section(manifest)]
    body = "\n".join(s for s in sections if s)
    meta = (f"{html.escape(str(manifest.get('command', '?')))} · status "
            f"{html.escape(str(manifest.get('status', '?')))} · started "
            f"{html.escape(str(manifest.get('start_time', '?')))} · mwm "
            f"{html.escape(str(manifest.get('mwm_version', '?')))} · commit "
            f"{html.escape(str(manifest.get('git_commit') or 'unknown (not run from a git checkout)'))}")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"generator\" content=\"{GENERATOR}\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style>"
            f"<script>{LOAD_CHECK}</script></head>\n<body><h1>{html.escape(title)}</h1>"
            f"<p class=\"note\">{meta}</p>\n{body}\n</body></html>\n")


# --------------------------------------------------------------------------- sections

def _html_table(header: list[str], rows: list[list[str]]) -> str:
    return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
                      for cells in rows) + "</table>")


def _results_section(run_dir: Path, results: dict | None) -> str:
    from .tables import (HYPOTHESES_TITLE, evaluation_table, evaluation_title, hypotheses_note,
                         hypotheses_table, reference_tables, results_notes, results_table)

    if not results:
        return ""
    parts = ["<h2>Results</h2>", _html_table(*results_table(results))]
    parts += [f'<p class="note">{html.escape(note)}</p>' for note in results_notes(results)]
    tested = hypotheses_table(results)
    if tested is not None:
        parts += [f"<h3>{HYPOTHESES_TITLE}</h3>", _html_table(*tested),
                  f'<p class="note">{html.escape(hypotheses_note(results))}</p>']
    for e in results["evaluations"]:
        table = evaluation_table(results, e)
        plot = run_dir / (results.get("plots") or {}).get(e, f"plots/{e}.png")
        if table is None and not plot.is_file():
            continue
        parts.append(f"<h3>{html.escape(evaluation_title(results, e))}</h3>")
        if table is not None:
            parts.append(_html_table(*table))
        for title, header, rows in reference_tables(results, e):  # Δ vs each further reference
            parts.append(f"<h4>{html.escape(title)}</h4>" + _html_table(header, rows))
        if plot.is_file():
            metric = (results.get("primary") or {}).get(e, "accuracy")
            parts.append(figure(plot, f"{e}: {metric} against the realized overall mask ratio",
                                wide=True))
    older = run_dir / "accuracy_vs_ratio.png"  # the one combined plot of earlier versions
    if not results.get("plots") and older.is_file():
        parts.append(figure(older, "downstream accuracy against the realized overall mask ratio",
                            wide=True))
    return "\n".join(parts)


def _segmentation_sections(run_dir: Path, results: dict | None) -> list[str]:
    """One section per evaluation whose cells wrote overlays (the segment tasks): the first
    overlays of one seed of each strategy, the same images for every strategy."""
    if not results:
        return []
    sections = []
    for e in results["evaluations"]:
        figures = []
        for row in results["strategies"]:
            found = _overlay_folder(run_dir, row["strategy"], e, results.get("seeds") or [])
            if found is not None:
                figures += _overlay_figures(row["strategy"], *found)
        if figures:
            sections.append(
                f"<h2>Segmentation: {html.escape(e)}</h2>"
                '<p class="note">Each figure: the image | the ground truth | the prediction of the '
                "last model, on the evaluation split, for one seed of each strategy; DSC from "
                "the evaluation's per_image.csv (mean over the foreground classes).</p>"
                + "".join(figures))
    return sections


def _overlay_folder(run_dir: Path, strategy: str, evaluation: str,
                    seeds: list) -> tuple[int, Path] | None:
    """(seed, overlays folder) of the first seed whose evaluation wrote overlays."""
    for seed in seeds:
        folder = run_dir / "cells" / strategy / f"seed{seed}" / f"eval_{evaluation}" / "overlays"
        if folder.is_dir() and any(folder.glob("*.png")):
            return seed, folder
    return None


def _overlay_figures(strategy: str, seed: int, folder: Path) -> list[str]:
    """The first overlays of the evaluation split (``<split>_<image>.png``), captioned."""
    eval_dir = folder.parent
    split = (read_json_or_none(eval_dir / "summary.json") or {}).get("eval_split")
    pngs = sorted(folder.glob("*.png"))
    chosen = [p for p in pngs if split and p.name.startswith(f"{split}_")] or pngs
    dice = _image_dice(eval_dir / "per_image.csv")
    figures = []
    for png in chosen[:MAX_SEGMENTATION_OVERLAYS]:
        image_split, _, name = png.stem.partition("_")
        score = dice.get((image_split, name))
        caption = (f"{strategy}, seed {seed}: {name} ({image_split})"
                   + (f", DSC {score:.2f}" if score is not None else ""))
        figures.append(figure(png, caption))
    return figures


def _image_dice(per_image: Path) -> dict[tuple[str, str], float]:
    """{(split, image): DSC averaged over the image's foreground classes}."""
    if not per_image.is_file():
        return {}
    values: dict[tuple[str, str], list[float]] = {}
    with per_image.open(newline="") as handle:
        for row in csv.DictReader(handle):
            try:
                value = float(row.get("dice") or "nan")
            except ValueError:
                continue
            if not np.isnan(value):
                values.setdefault((row.get("split", ""), row.get("image", "")), []).append(value)
    return {key: float(np.mean(v)) for key, v in values.items()}


def _data_section(run_dir: Path) -> str:
    sheet = run_dir / "data" / "contact_sheet.png"
    if not sheet.is_file():
        return ""
    return "<h2>Data</h2>" + figure(sheet, "the dataset: images with their lesion masks (red)", wide=True)


def _localization_section(run_dir: Path) -> str:
    per_image = run_dir / "localization" / "per_image.csv"
    if not per_image.is_file():
        return ""
    with per_image.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    summary = read_json_or_none(run_dir / "localization" / "summary.json") or {}
    metrics = summary.get("metrics", {})
    line = ", ".join(f"{k} {v['mean']:.3f}" for k, v in metrics.items()
                     if isinstance(v, dict) and isinstance(v.get("mean"), float))
    sel = read_json_or_none(run_dir / "localization" / SELECTIVITY_JSON)
    if sel:
        line += (f"; selectivity {sel['selectivity']['mean']:+.3f} on {sel['n']} images with "
                 "another finding (DSC against the named finding minus DSC against the others)")
    lesion_rows = [r for r in rows if int(r.get("gt_pixels") or 0) > 0][:MAX_LOCALIZATION_TILES]
    figures = [_localization_figure(run_dir, r) for r in lesion_rows]
    return ("<h2>Localization</h2>"
            f'<p class="note">Test images scored: {summary.get("n_gt", len(rows))}; means: '
            f"{html.escape(line)}. Each figure: the image with the lesion mask (red) and the "
            "region from the prompt (cyan), then the saliency map.</p>"
            + "".join(f for f in figures if f))


def _localization_figure(run_dir: Path, row: dict) -> str:
    import cv2

    from ..data.io import load_model_input, read_mask
    from .contact_sheet import Tile, render_tile

    name = row["name"]
    image_path = _find_image(run_dir / "data", name)
    saliency_path = run_dir / "saliency" / f"{name}.png"
    if image_path is None or not saliency_path.is_file():
        return ""
    # the project's reader and normalization, so 16-bit images display as the model saw them
    gray = (load_model_input(image_path)[0] * 255).round().astype(np.uint8)
    truth = read_mask(run_dir / "localization" / "gt" / f"{name}.png", shape=gray.shape)
    region_path = run_dir / "regions" / f"{name}.png"
    region = [read_mask(region_path, shape=gray.shape)] if region_path.is_file() else []
    size = max(128, gray.shape[0])
    overlay = render_tile(Tile(gray, "", [truth], region), size)
    heat = cv2.applyColorMap(cv2.imread(str(saliency_path), cv2.IMREAD_GRAYSCALE), cv2.COLORMAP_INFERNO)
    heat = cv2.resize(heat, (size, size), interpolation=cv2.INTER_NEAREST)[..., ::-1]
    return figure(np.concatenate([overlay, heat], axis=1), f"{name}: DSC {float(row['dice']):.2f}")


def _find_image(data_dir: Path, name: str) -> Path | None:
    for candidate in (data_dir / "images" / f"{name}.png", data_dir / f"{name}.png"):
        if candidate.is_file():
            return candidate
    return None


def _pretraining_section(run_dir: Path) -> str:
    runs = sorted(p for p in (run_dir / "cells").glob("*/seed*/pretrain") if p.is_dir())
    if not runs:
        return ""
    first_seed = {}
    for pre in runs:
        first_seed.setdefault(pre.parent.parent.name, pre)
    grids = []
    for strategy, pre in first_seed.items():
        epochs = sorted((pre / "figures").glob("epoch_*.png"))
        if epochs:
            grids.append(figure(epochs[-1], f"{strategy} ({pre.parent.name}, {epochs[-1].stem}): "
                                            "input | region | masked cells | reconstruction"))
    curves = training_curves_png({s: p / "train_log.csv" for s, p in first_seed.items()})
    parts = ["<h2>Pretraining</h2>",
             ('<p class="note">Last epoch of each strategy (first seed). Masked cells are '
              "darkened; the reconstruction is the decoder's output.</p>"), *grids]
    if curves is not None:
        parts.append(figure(curves, "training loss and realized overall mask ratio per step", wide=True))
    return "\n".join(parts)


def _pretrain_loss_section(run_dir: Path) -> str:
    """The epoch-mean loss per strategy and a table of its flatness (``mwm.report.curves``)."""
    curves = pretrain_curves(run_dir)
    if not curves:
        return ""
    note = ("Left: the mean over seeds of each epoch's mean logged loss (band: the seeds' "
            "min to max). Right: each curve scaled to its range, and (dotted) the "
            "least-squares line through its last quarter of epochs (at least 3). Flatness = "
            "that line's drop across the tail divided by the curve's range (max − min); a "
            f"curve is flat when |flatness| ≤ {FLAT_THRESHOLD:g} and needs {MIN_EPOCHS} "
            "epochs to be judged (docs/pretraining-curves.md). The loss is measured on the "
            "masked cells and depends on the masking, so the curves show whether each "
            "strategy has converged, not which is better.")
    return "\n".join(["<h2>Pretraining loss</h2>", f'<p class="note">{html.escape(note)}</p>',
                      figure(pretrain_loss_png(curves), "pretraining loss per epoch and strategy",
                             wide=True),
                      _html_table(*flatness_table(curves))])


def _manifest_section(manifest: dict) -> str:
    if not manifest:
        return ""
    text = json.dumps(manifest, indent=2, default=str)
    return f"<h2>Run manifest</h2><pre>{html.escape(text)}</pre>"
