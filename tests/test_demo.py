"""`mwm demo` end to end at a tiny size: every stage leaves its files."""

import json

import cv2

from mwm.cli import main


def test_demo_runs_every_stage(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n", "40", "--size", "64", "--clip-seconds", "5",
                 "--clip-epochs", "1", "--pretrain-epochs", "1", "--workers", "1", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "contact sheet" in text and "mean DSC" in text
    for path in ("phantoms/labels.csv", "clip/open_clip_model.safetensors", "eval/summary.json",
                 "run_manifest.json"):
        assert (out / path).is_file(), path
    n_test = sum(1 for line in (out / "phantoms" / "labels.csv").read_text().splitlines()
                 if line.endswith(",test"))
    assert len(list((out / "saliency").glob("*.png"))) == 40  # every image gets a region
    assert len(list((out / "regions").glob("*.png"))) == 40
    assert len(list((out / "eval" / "gt").glob("*.png"))) == n_test  # scored on test only
    assert (out / "pretrain" / "encoder.safetensors").is_file()
    assert "linear probe" in text
    sheet = cv2.imread(str(out / "contact_sheet.png"))
    assert sheet is not None and sheet.shape[0] > 100
    manifest = json.loads((out / "run_manifest.json").read_text())
    assert manifest["status"] == "ok"
    assert 0.0 <= manifest["results"]["localization"]["dice"]["mean"] <= 1.0
    for probe in manifest["results"]["linear_probe"].values():
        assert 0.0 <= probe["accuracy"] <= 1.0
