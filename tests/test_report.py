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
