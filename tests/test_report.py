"""`mwm report`: one self-contained HTML file whose every figure loads in a real browser."""

import base64
import re
import shutil
import subprocess

import cv2
import numpy as np
import pytest

from mwm.cli import main
from mwm.report.html import render_report

IMG_SRC = re.compile(r'<img src="([^"]*)"')


def browser() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_is_self_contained(quick_demo, tmp_path):
    out = quick_demo[0]
    target = tmp_path / "copy" / "report.html"
    assert main(["report", str(out), "--out", str(target)]) == 0
    text = target.read_text()
    for section in ("Results", "Data", "Localization", "Pretraining", "Run manifest"):
        assert f"<h2>{section}</h2>" in text, section
    assert not re.search(r'(src|href)="(https?:|//|file:)', text)  # nothing fetched
    assert "<link" not in text
    sources = IMG_SRC.findall(text)
    assert len(sources) >= 8  # plot, data sheet, overlays, grids, curves
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        png = np.frombuffer(base64.b64decode(src.split(",", 1)[1]), np.uint8)
        assert cv2.imdecode(png, cv2.IMREAD_UNCHANGED) is not None
    # the results table shows every strategy and the DSC of each overlay is printed
    for strategy in ("scratch", "random-60", "region-80-40"):
        assert f"<td>{strategy}</td>" in text
    assert "DSC" in text


def test_report_of_a_partial_folder_skips_missing_sections(tmp_path):
    html = render_report(tmp_path)  # nothing there yet: a page, not a crash
    assert "<h2>" not in html and "<!DOCTYPE html>" in html
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_every_figure_loads_in_headless_chromium(quick_demo):
    exe = browser()
    if exe is None:
        pytest.skip("Chromium is not installed: `make test` installs Debian's chromium when it "
                    "can (root and apt); install it to run this browser test.")
    report = quick_demo[0] / "report.html"
    result = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu",
                             "--virtual-time-budget=10000", "--dump-dom", report.as_uri()],
                            capture_output=True, text=True, timeout=120)
    body = re.search(r"<body[^>]*>", result.stdout)
    assert body, f"no DOM from {exe}: {result.stderr[-2000:]}"
    total = re.search(r'data-images-total="(\d+)"', body.group(0))
    loaded = re.search(r'data-images-loaded="(\d+)"', body.group(0))
    assert total and loaded, "the page's load check did not run"
    assert int(total.group(1)) >= 8
    assert loaded.group(1) == total.group(1), f"{loaded.group(1)} of {total.group(1)} images decoded"


def _overlay(path, value: int) -> np.ndarray:
    """An image | truth | prediction strip as the segment task writes it."""
    strip = np.full((16, 48, 3), value, np.uint8)
    strip[:, 16:32, 2] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), strip)
    return strip


def test_report_shows_per_task_tables_plots_and_segmentation_overlays(tmp_path):
    """From hand-made cell records and overlay files: one table and one plot per evaluation,
    and a segmentation section with the overlays of one seed of each strategy, each
    captioned with its image's DSC from per_image.csv."""
    from test_experiment import LINEAR, SEG, TINY, write_fake_cells

    from mwm.experiment import cells_of, parse_experiment
    from mwm.experiment.results import write_results
    from mwm.report.html import MAX_SEGMENTATION_OVERLAYS

    config = parse_experiment({**TINY, "seeds": [0, 1], "evaluate": [LINEAR, SEG]})
    run = tmp_path / "run"
    write_fake_cells(run, config)
    write_results(config, run, cells_of(config))
    seg = {"random-50": run / "cells" / "random-50" / "seed0" / "eval_seg",
           "region-gt": run / "cells" / "region-gt" / "seed1" / "eval_seg"}  # seed 0 has none
    strips = {}
    for k, (strategy, folder) in enumerate(seg.items()):
        names = [f"brain-mri_{i:05d}" for i in range(MAX_SEGMENTATION_OVERLAYS + 2)]
        for i, name in enumerate(names):
            strips[(strategy, name)] = _overlay(folder / "overlays" / f"val_{name}.png", 40 * k + i)
        _overlay(folder / "overlays" / "test_brain-mri_00090.png", 200)  # not the eval split
        with open(folder / "per_image.csv", "w") as handle:
            handle.write("split,image,class,dice,nsd,hd95\n")
            for i, name in enumerate(names):
                handle.write(f"val,{name},lesion,{0.5 + 0.1 * i + 0.01 * k:.3f},0.5,3.0\n")
        (folder / "summary.json").write_text('{"eval_split": "val"}')

    text = render_report(run)
    assert "<h2>Segmentation: seg</h2>" in text and "Segmentation: linear" not in text
    for e in ("linear (task linear-probe, primary metric accuracy)",
              "seg (task segment-probe, primary metric dice)"):
        assert f"<h3>{e}</h3>" in text
    assert "<th>Δ nsd</th>" in text and "<th>hd95</th>" in text and "<th>Δ auroc</th>" in text
    section = text.split("<h2>Segmentation: seg</h2>", 1)[1].split("<h2>", 1)[0]
    figures = re.findall(r'<img src="data:image/png;base64,([^"]*)" alt="([^"]*)">', section)
    assert len(figures) == 2 * MAX_SEGMENTATION_OVERLAYS  # scratch wrote none
    captions = [caption for _, caption in figures]
    assert "random-50, seed 0: brain-mri_00001 (val), DSC 0.60" in captions
    assert "region-gt, seed 1: brain-mri_00002 (val), DSC 0.71" in captions
    assert not any("00090" in c or "scratch" in c for c in captions)
    for data, caption in figures:  # the file's pixels, not another image
        strategy, rest = caption.split(", seed ")
        name = rest.split(": ")[1].split(" ")[0]
        pixels = cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR)
        assert np.array_equal(pixels, strips[(strategy, name)]), caption
    results_part = text.split("<h2>Results</h2>", 1)[1].split("<h2>", 1)[0]
    plots = re.findall(r'alt="(\w+): \w+ against the realized overall mask ratio"', results_part)
    assert plots == ["linear", "seg"]
