"""`mwm localize` → `postprocess` → `evaluate` end to end with a tiny local open_clip model."""

import json

import cv2
import pytest

from mwm.cli import main
from vlm_fixtures import write_open_clip_dir

FAST = ["--layer", "1", "--steps", "2", "--samples", "2", "--batch-size", "4", "--quiet",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from mwm.data.phantoms import generate_phantoms

    root = tmp_path_factory.mktemp("loc")
    generate_phantoms(root / "ph", n=6, size=48, seed=1, workers=1, progress=False)
    model = write_open_clip_dir(root / "model")
    return root, root / "ph", f"local-dir:{model}"


def test_localize_resume_postprocess_evaluate(setup, capsys):
    root, ph, model = setup
    sal = root / "sal"
    assert main(["localize", str(ph / "images"), "--prompts", str(ph / "prompts.json"),
                 "--out", str(sal), "--model", model, *FAST]) == 0
    assert "6 saliency maps written, 0 up to date" in capsys.readouterr().out
    first = cv2.imread(str(sal / "brain-mri_00000.png"), cv2.IMREAD_UNCHANGED)
    assert first.shape == (48, 48)
    # same settings: everything skipped; another beta: everything recomputed
    assert main(["localize", str(ph / "images"), "--prompts", str(ph / "prompts.json"),
                 "--out", str(sal), "--model", model, *FAST]) == 0
    assert "0 saliency maps written, 6 up to date" in capsys.readouterr().out
    assert main(["localize", str(ph / "images"), "--prompt", "brain tumor", "--beta", "0.5",
                 "--out", str(sal), "--model", model, *FAST]) == 0
    assert "6 saliency maps written" in capsys.readouterr().out
    assert main(["postprocess", str(sal), "--out", str(root / "reg"), "--top-k", "1",
                 "--quiet"]) == 0
    assert main(["evaluate", str(root / "reg"), str(ph / "masks"), "--out", str(root / "ev"),
                 "--quiet"]) == 0
    summary = json.loads((root / "ev" / "summary.json").read_text())
    assert summary["n_gt"] == 6 and 0.0 <= summary["metrics"]["dice"]["mean"] <= 1.0


def test_missing_prompt_names_the_image(setup, capsys, tmp_path):
    root, ph, model = setup
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"brain-mri_00000": "tumor"}))
    assert main(["localize", str(ph / "images"), "--prompts", str(prompts), "--out",
                 str(tmp_path / "o"), "--model", model, *FAST]) == 2
    assert "brain-mri_00001.png: no prompt" in capsys.readouterr().err


def test_tune_writes_table_and_uses_best(setup, capsys):
    root, ph, model = setup
    out = root / "tuned"
    assert main(["localize", str(ph / "images"), "--prompt", "brain tumor", "--out", str(out),
                 "--model", model, "--tune", str(ph / "images"), str(ph / "masks"),
                 "--tune-images", "3", *FAST]) == 0
    best = json.loads((out / "tune_best.json").read_text())["best"]
    used = json.loads((out / "m2ib_config.json").read_text())
    assert {k: used[k] for k in best} == best
    rows = (out / "tune_table.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3 * 3 * 3 * 2  # beta x layers {D-2, D-1, both} x noise x standardize


def test_offline_default_model_is_a_clear_error(setup, capsys):
    root, ph, _ = setup
    assert main(["localize", str(ph / "images"), "--prompt", "x", "--out", str(root / "off"),
                 "--quiet"]) == 2
    assert "local cache" in capsys.readouterr().err


def test_shifts_smooth_and_anchored_crf_from_the_command_line(setup, capsys):
    pytest.importorskip("pydensecrf.densecrf", reason="the crf extra (pydensecrf2) is not installed")
    root, ph, model = setup
    sal = root / "sal_shift"
    assert main(["localize", str(ph / "images"), "--prompt", "brain tumor", "--out", str(sal),
                 "--model", model, *FAST]) == 0
    plain = cv2.imread(str(sal / "brain-mri_00000.png"), cv2.IMREAD_UNCHANGED)
    capsys.readouterr()
    # new shift/smooth settings: the maps are stale and recomputed, and they differ
    assert main(["localize", str(ph / "images"), "--prompt", "brain tumor", "--out", str(sal),
                 "--model", model, "--shifts", "2", "--smooth", "0.3", *FAST]) == 0
    assert "6 saliency maps written" in capsys.readouterr().out
    shifted = cv2.imread(str(sal / "brain-mri_00000.png"), cv2.IMREAD_UNCHANGED)
    assert shifted.shape == plain.shape and (shifted != plain).any()
    saved = json.loads((sal / "m2ib_config.json").read_text())
    assert saved["shifts"] == 2 and saved["smooth"] == 0.3
    assert main(["postprocess", str(sal), "--out", str(root / "reg_crf"), "--method", "kmeans",
                 "--crf", "--crf-anchor", "binarization", "--images", str(ph / "images"),
                 "--top-k", "1", "--quiet"]) == 0
    config = json.loads((root / "reg_crf" / "postprocess_config.json").read_text())
    assert config["crf"]["anchor"] == "binarization"
    assert len(list((root / "reg_crf").glob("brain-mri_*.png"))) == 6


def test_manifest_prompts_need_no_flag_and_a_4d_nifti_is_one_listed_failure(setup, capsys,
                                                                            tmp_path):
    """A CSV manifest's `prompt` column is enough (no --prompt/--prompts); an unreadable file
    among the images is listed with the failures (exit 1) and the other maps are written."""
    import nibabel as nib
    import numpy as np

    root, ph, model = setup
    images = tmp_path / "images"
    images.mkdir()
    for name in ("brain-mri_00000.png", "brain-mri_00001.png"):
        (images / name).write_bytes((ph / "images" / name).read_bytes())
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 3), np.float32), np.eye(4)),
             str(images / "series.nii.gz"))
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,prompt\nimages/brain-mri_00000.png,brain tumor\n"
                        "images/brain-mri_00001.png,glioma\n")
    out = tmp_path / "sal"
    assert main(["localize", str(manifest), "--out", str(out), "--model", model, *FAST]) == 0
    record = json.loads((out / "run_manifest.json").read_text())
    assert record["results"]["outputs"] == ["brain-mri_00000.png", "brain-mri_00001.png"]
    capsys.readouterr()
    assert main(["localize", str(images), "--prompt", "tumor", "--out", str(tmp_path / "s2"),
                 "--model", model, *FAST]) == 1
    captured = capsys.readouterr()
    assert "series.nii.gz" in captured.err and "2 saliency maps written" in captured.out
