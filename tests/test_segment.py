"""`mwm segment`: binary and multi-class runs, the probe, metrics, resume, bad inputs, the
experiment task."""

import csv
import json

import numpy as np
import pytest
import torch

from mwm.cli import main
from mwm.data.phantoms import generate_phantoms
from mwm.downstream.segment import aggregate, image_metrics

ARGS = ["--model", "resnet10t", "--input-size", "32", "--batch-size", "4", "--quiet",
        "--decoder-width", "8", "--overlays", "2"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    out = tmp_path_factory.mktemp("seg") / "ph"
    generate_phantoms(out, n=12, size=32, workers=1, progress=False)
    return out


def segment(data, out, *extra):
    return main(["segment", str(data), "--out", str(out), *ARGS, *extra])


def rows(path):
    return list(csv.DictReader(open(path)))


def test_binary_run_writes_every_output(phantoms, tmp_path, capsys):
    out = tmp_path / "bin"
    assert segment(phantoms, out, "--epochs", "2") == 0
    assert "segment (finetune) on val: dice" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["classes"] == ["background", "lesion"]
    assert [r["epoch"] for r in rows(out / "metrics.csv")] == ["1", "2"]
    per_image = rows(out / "per_image.csv")
    n_eval = summary["n"]["val"] + summary["n"]["test"]
    assert len(per_image) == n_eval and {r["class"] for r in per_image} == {"lesion"}
    val = [r for r in per_image if r["split"] == "val"]
    assert summary["last"]["val"]["dice"] == pytest.approx(np.mean([float(r["dice"]) for r in val]))
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file()
    assert len(list((out / "overlays").glob("val_*.png"))) == 2


def test_multiclass_probe_leaves_the_encoder_unchanged(phantoms, tmp_path):
    import timm

    encoder = timm.create_model("resnet10t", num_classes=0)
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    torch.save(state, tmp_path / "enc.pth")
    out = tmp_path / "probe"
    assert segment(phantoms, out, "--epochs", "1", "--mode", "probe", "--labels", "classes",
                   "--weights", str(tmp_path / "enc.pth"), "--lr", "0.01") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["classes"][0] == "background" and len(summary["classes"]) >= 3
    assert summary["weights"]["loaded"] == len(state)
    saved = torch.load(out / "last.pt", weights_only=True)["model_train"]
    for key, value in state.items():  # weights and BatchNorm statistics alike
        assert torch.equal(saved[f"encoder.{key}"], value), key
    assert summary["steps"] > 0 and summary["final_train_loss"] is not None
    classes = {r["class"] for r in rows(out / "per_image.csv")}
    assert classes == set(summary["classes"][1:])


def test_metrics_follow_the_empty_conventions():
    truth = np.zeros((16, 16), np.int64)
    truth[4:10, 4:10] = 1
    perfect = image_metrics(truth, truth, ["background", "lesion"])[0]
    assert (perfect["dice"], perfect["nsd"], perfect["hd95"]) == (1.0, 1.0, 0.0)
    missed = image_metrics(np.zeros_like(truth), truth, ["background", "lesion"])[0]
    assert (missed["dice"], missed["nsd"], missed["hd95"]) == (0.0, 0.0, float("inf"))
    nothing = image_metrics(np.zeros_like(truth), np.zeros_like(truth), ["background", "lesion"])[0]
    assert (nothing["dice"], nothing["nsd"], nothing["hd95"]) == (1.0, 1.0, 0.0)
    half = truth.copy()
    half[4:10, 7:10] = 0  # 18 of 36 pixels: DSC = 2 * 18 / (18 + 36)
    assert image_metrics(half, truth, ["background", "lesion"])[0]["dice"] == pytest.approx(2 / 3)
    summary = aggregate([perfect, missed, nothing])
    assert summary["dice"] == pytest.approx(2 / 3)
    assert summary["hd95"] == 0.0 and summary["hd95_infinite"] == 1


def test_resume_auto_repeats_the_uninterrupted_run(phantoms, tmp_path, capsys):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert segment(phantoms, whole, "--epochs", "2") == 0
    assert segment(phantoms, parts, "--epochs", "2", "--max-steps", "1") == 0
    assert len(rows(parts / "metrics.csv")) == 0  # stopped inside epoch 1
    assert segment(phantoms, parts, "--epochs", "2", "--resume", "auto") == 0
    keys = ("epoch", "step", "lr", "dice", "nsd", "hd95")
    assert ([{k: r[k] for k in keys} for r in rows(whole / "metrics.csv")]
            == [{k: r[k] for k in keys} for r in rows(parts / "metrics.csv")])
    a = torch.load(whole / "last.pt", weights_only=True)["model_train"]
    b = torch.load(parts / "last.pt", weights_only=True)["model_train"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert segment(phantoms, parts, "--epochs", "2") == 2  # a finished run, no --resume
    assert "--resume" in capsys.readouterr().err
    assert segment(phantoms, parts, "--epochs", "3", "--resume", "auto") == 2
    assert "epochs" in capsys.readouterr().err


def test_missing_weights_exits_2_naming_them(phantoms, tmp_path, capsys):
    missing = tmp_path / "nowhere" / "encoder.safetensors"
    assert segment(phantoms, tmp_path / "o", "--weights", str(missing)) == 2
    assert str(missing) in capsys.readouterr().err


def test_images_without_masks_exit_2(phantoms, tmp_path, capsys):
    manifest = tmp_path / "no_masks.csv"
    with open(phantoms / "labels.csv") as src, open(manifest, "w", newline="") as dst:
        writer = csv.DictWriter(dst, fieldnames=("image", "label", "split"))
        writer.writeheader()
        for row in csv.DictReader(src):
            writer.writerow({"image": str(phantoms / row["image"]), "label": row["label"],
                             "split": row["split"]})
    assert segment(manifest, tmp_path / "o") == 2
    assert "no image has a mask" in capsys.readouterr().err


def test_a_vit_encoder_gets_the_unetr_neck_and_loads_strictly(phantoms, tmp_path, capsys):
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=0)
    state = vit.state_dict()
    torch.save(state, tmp_path / "vit.pth")
    out = tmp_path / "vit"
    assert segment(phantoms, out, "--model", "vit_tiny_patch16_224", "--patch-size", "8",
                   "--weights", str(tmp_path / "vit.pth"), "--mode", "probe",
                   "--epochs", "1") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["decoder"].startswith("unetr")
    saved = torch.load(out / "last.pt", weights_only=True)["model_train"]
    assert all(torch.equal(saved[f"encoder.{k}"], v) for k, v in state.items())
    # strict loading: a key the encoder needs is missing from the file
    del state["blocks.0.norm1.weight"]
    torch.save(state, tmp_path / "short.pth")
    assert segment(phantoms, tmp_path / "short", "--model", "vit_tiny_patch16_224",
                   "--patch-size", "8", "--weights", str(tmp_path / "short.pth")) == 2
    assert "blocks.0.norm1.weight" in capsys.readouterr().err


def test_experiment_scores_every_cell_on_segment_probe(tmp_path):
    from test_experiment import TINY, run, write_config

    evaluate = [{"name": "seg", "task": "segment-probe", "epochs": 1, "batch_size": 8,
                 "decoder_width": 8, "overlays": 0}]
    config = write_config(tmp_path / "exp.yaml", strategies=[TINY["strategies"][1]],
                          reference=None, evaluate=evaluate)
    out = tmp_path / "run"
    assert run(config, out) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["primary"] == {"seg": "dice"}
    cell = json.loads((out / "cells" / "random-50" / "seed0" / "cell.json").read_text())
    assert 0.0 <= cell["evaluations"]["seg"]["dice"] <= 1.0
    assert "seg dice" in (out / "results.md").read_text().splitlines()[0]
