"""`mwm segment`: binary and multi-class runs, label maps, the probe, metrics and their
per-class aggregation, resume, eval-only, torchrun, bad inputs, the experiment task."""

import csv
import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from mwm.cli import main
from mwm.data.io import read_mask
from mwm.data.layouts import open_dataset
from mwm.data.phantoms import generate_phantoms
from mwm.downstream.segment import SegmentConfig
from mwm.downstream.segment_metrics import aggregate, image_metrics
from mwm.downstream.segment_data import split_samples

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


def test_eval_every_scores_only_those_epochs_and_trains_the_same_model(phantoms, tmp_path):
    every, end_only, second = tmp_path / "every", tmp_path / "end", tmp_path / "second"
    assert segment(phantoms, every, "--epochs", "3") == 0
    assert segment(phantoms, end_only, "--epochs", "3", "--eval-every", "0") == 0
    assert segment(phantoms, second, "--epochs", "3", "--eval-every", "2") == 0
    assert [r["dice"] != "" for r in rows(end_only / "metrics.csv")] == [False] * 3
    assert [r["dice"] != "" for r in rows(second / "metrics.csv")] == [False, True, False]
    assert not (end_only / "best.pt").exists() and (second / "best.pt").is_file()
    a = torch.load(every / "last.pt", weights_only=True)["model_train"]
    b = torch.load(end_only / "last.pt", weights_only=True)["model_train"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # scoring never changes the training
    last = [json.loads((run / "summary.json").read_text())["last"]["val"]["dice"]
            for run in (every, end_only)]
    assert last[0] == last[1]
    assert json.loads((end_only / "summary.json").read_text())["best"] is None


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


# --------------------------------------------------------------------------- label maps

PHANTOM_VALUES = {"glioma": 1, "meningioma": 2, "pituitary": 3}


def write_label_maps(phantoms, folder, names=None):
    """The phantoms' truth as integer label PNGs (uint16 for every other image)."""
    folder.mkdir()
    for i, sample in enumerate(open_dataset(phantoms).samples):
        labels = read_mask(sample.mask).astype(np.uint16) * PHANTOM_VALUES.get(sample.label, 0)
        cv2.imwrite(str(folder / f"{sample.name}.png"),
                    labels if i % 2 else labels.astype(np.uint8))
    if names is not None:
        (folder / "classes.json").write_text(json.dumps(names))
    return folder


def test_label_maps_with_classes_json_give_the_mask_labels_run(phantoms, tmp_path):
    names = {str(v): k for k, v in PHANTOM_VALUES.items()}
    maps = write_label_maps(phantoms, tmp_path / "maps", names)
    by_maps, by_masks = tmp_path / "maps_run", tmp_path / "masks_run"
    assert segment(phantoms, by_maps, "--epochs", "1", "--labels", "classes",
                   "--label-maps", str(maps)) == 0
    assert segment(phantoms, by_masks, "--epochs", "1", "--labels", "classes") == 0
    summary = json.loads((by_maps / "summary.json").read_text())
    assert summary["classes"] == ["background", "glioma", "meningioma", "pituitary"]
    assert summary["classes"] == json.loads((by_masks / "summary.json").read_text())["classes"]
    keys = ("epoch", "step", "train_loss", "dice", "dice_present", "nsd", "hd95")
    assert ([{k: r[k] for k in keys} for r in rows(by_maps / "metrics.csv")]
            == [{k: r[k] for k in keys} for r in rows(by_masks / "metrics.csv")])
    per_image = rows(by_maps / "per_image.csv")
    val = summary["last"]["val"]
    assert set(val["per_class"]) == {"glioma", "meningioma", "pituitary"}
    for name, figures in val["per_class"].items():
        mine = [r for r in per_image if r["split"] == "val" and r["class"] == name]
        assert figures["n"] == len(mine) == summary["n"]["val"]
        assert figures["dice"] == pytest.approx(np.mean([float(r["dice"]) for r in mine]))
        assert figures["n_present"] == sum(r["present"] == "1" for r in mine)
    assert val["dice"] == pytest.approx(np.mean([c["dice"] for c in val["per_class"].values()]))


def test_label_maps_without_classes_json_and_binary(phantoms, tmp_path):
    maps = write_label_maps(phantoms, tmp_path / "maps")
    extra = open_dataset(phantoms).samples[0]
    cv2.imwrite(str(maps / f"{extra.name}.png"), np.full((32, 32), 5, np.uint8))
    palette = open_dataset(phantoms).samples[1]  # a palette PNG: its indices, not colours
    indexed = Image.fromarray(cv2.imread(str(maps / f"{palette.name}.png"), -1).astype(np.uint8))
    indexed.putpalette([(80 * i + 40) % 256 for i in range(256) for _ in range(3)])
    indexed.save(maps / f"{palette.name}.png")
    cfg = {"data": str(phantoms), "out": str(tmp_path / "o"), "label_maps": str(maps)}
    _, labels = split_samples(SegmentConfig(**cfg, labels="classes"))
    assert labels.classes == ["background", "class_1", "class_2", "class_3", "class_5"]
    assert labels.read(extra).max() == 4  # value 5 is the fifth class
    assert Image.open(maps / f"{palette.name}.png").mode == "P"
    value = PHANTOM_VALUES[palette.label]
    assert np.array_equal(labels.read(palette), read_mask(palette.mask) * value)
    _, labels = split_samples(SegmentConfig(**cfg, labels="binary"))
    assert labels.classes == ["background", "lesion"] and set(np.unique(labels.read(extra))) == {1}


def test_label_map_errors_name_the_file_and_the_fix(phantoms, tmp_path, capsys):
    names = {"1": "glioma", "2": "meningioma"}  # no name for pituitary's value 3
    maps = write_label_maps(phantoms, tmp_path / "maps", names)
    assert segment(phantoms, tmp_path / "o1", "--labels", "classes", "--label-maps", str(maps)) == 2
    err = capsys.readouterr().err
    assert "value 3 has no name" in err and "classes.json" in err and ".png" in err
    names["3"] = "pituitary"
    (maps / "classes.json").write_text(json.dumps(names))
    samples = open_dataset(phantoms).samples
    (maps / f"{samples[4].name}.png").unlink()
    assert segment(phantoms, tmp_path / "o2", "--label-maps", str(maps)) == 2
    err = capsys.readouterr().err
    assert f"1 of {len(samples)} images" in err and f"{samples[4].name}.png" in err
    cv2.imwrite(str(maps / f"{samples[4].name}.png"), np.zeros((16, 32), np.uint8))
    assert segment(phantoms, tmp_path / "o3", "--label-maps", str(maps)) == 2
    err = capsys.readouterr().err
    assert "32x16" in err and str(samples[4].image.path) in err


# --------------------------------------------------------------------------- aggregation

def test_per_class_aggregates_and_the_macro_mean_by_hand():
    classes = ["background", "edema", "tumor"]
    truth_a = np.zeros((16, 16), np.int64)
    truth_a[2:6, 2:6], truth_a[10:14, 10:14] = 1, 2
    pred_a = truth_a.copy()
    pred_a[10:14, 10:14] = 0  # edema exact, the tumor missed
    truth_b = np.zeros((16, 16), np.int64)
    truth_b[2:6, 2:6] = 1  # no tumor here; none predicted: DSC 1 for it
    pred_b = np.zeros_like(truth_b)
    pred_b[2:6, 2:4] = 1  # half the edema: DSC = 2 * 8 / (8 + 16) = 2/3
    rows = [{"image": name, **row} for name, pred, truth in (("a", pred_a, truth_a),
                                                              ("b", pred_b, truth_b))
            for row in image_metrics(pred, truth, classes)]
    result = aggregate(rows)
    edema, tumor = result["per_class"]["edema"], result["per_class"]["tumor"]
    assert edema["dice"] == pytest.approx(5 / 6) and edema["dice_present"] == pytest.approx(5 / 6)
    assert (edema["n"], edema["n_present"], edema["hd95_infinite"]) == (2, 2, 0)
    assert tumor["dice"] == pytest.approx(0.5)  # 0 (missed) and 1 (correctly empty)
    assert tumor["dice_present"] == 0.0 and tumor["n_present"] == 1
    assert tumor["hd95_infinite"] == 1 and tumor["hd95"] == 0.0  # the finite one: image b
    assert result["dice"] == pytest.approx((5 / 6 + 0.5) / 2)
    assert result["dice_present"] == pytest.approx((5 / 6 + 0.0) / 2)
    assert (result["n"], result["n_present"], result["hd95_infinite"]) == (2, 3, 1)
    assert result["hd95"] == pytest.approx((edema["hd95"] + 0.0) / 2) and edema["hd95"] > 0
    # one class: the macro mean is that class's figures
    binary = aggregate([r for r in rows if r["class"] == "edema"])
    assert {k: binary[k] for k in edema} == edema


# --------------------------------------------------------------------------- eval-only

def test_eval_only_reproduces_the_finished_run(phantoms, tmp_path, capsys):
    run = tmp_path / "run"
    assert segment(phantoms, run, "--epochs", "2") == 0
    finished = json.loads((run / "summary.json").read_text())
    # last.pt: the architecture, input size and normalization come from the checkpoint
    last = tmp_path / "eval_last"
    capsys.readouterr()
    assert main(["segment", str(phantoms), "--out", str(last), "--eval-only", "--weights",
                 str(run / "last.pt"), "--batch-size", "4", "--overlays", "1", "--quiet"]) == 0
    assert "segment (finetune, eval only) on test: dice" in capsys.readouterr().out
    summary = json.loads((last / "summary.json").read_text())
    assert summary["eval_only"] is True and summary["input_size"] == 32
    assert summary["last"] == finished["last"]
    assert rows(last / "per_image.csv") == rows(run / "per_image.csv")
    assert sorted(p.name for p in last.iterdir()) == ["overlays", "per_image.csv",
                                                      "run_manifest.json", "summary.json"]
    # the run folder: its best.pt, scored again on val as when it was selected
    best = tmp_path / "eval_best"
    assert segment(phantoms, best, "--eval-only", "--weights", str(run)) == 0
    summary = json.loads((best / "summary.json").read_text())
    assert summary["weights"]["source"].endswith("best.pt")
    assert summary["last"]["val"] == finished["best"]["metrics"]
    # other classes than the checkpoint's, a training folder as --out, no segment checkpoint
    assert segment(phantoms, tmp_path / "e1", "--eval-only", "--weights", str(run),
                   "--labels", "classes") == 2
    err = capsys.readouterr().err
    assert "['background', 'lesion']" in err and "'glioma'" in err
    manifest = (run / "run_manifest.json").read_bytes()
    assert segment(phantoms, run, "--eval-only", "--weights", str(run)) == 2
    assert "holds a training run" in capsys.readouterr().err
    assert (run / "run_manifest.json").read_bytes() == manifest  # the run's files untouched
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt")
    assert segment(phantoms, tmp_path / "e2", "--eval-only", "--weights",
                   str(tmp_path / "other.pt")) == 2
    assert "needs an `mwm segment` checkpoint" in capsys.readouterr().err


# --------------------------------------------------------------------------- torchrun

def test_torchrun_two_processes_agree_and_only_rank0_writes(phantoms, tmp_path):
    from dist_helpers import torchrun_mwm

    out = tmp_path / "ddp"
    result = torchrun_mwm("segment", phantoms, "--out", out, *ARGS[:-2], "--overlays", "1",
                          "--batch-size", "2", "--epochs", "2", "--amp", "none",
                          "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["batch_size"] == 2
    assert summary["steps_per_epoch"] == summary["n"]["train"] // 4  # 2 per rank and step
    assert summary["peak_lr"] == pytest.approx(1e-3 * 4 / 256)  # the global batch
    assert summary["ranks_agree"] is True  # weights, BN statistics and metrics
    assert [int(r["epoch"]) for r in rows(out / "metrics.csv")] == [1, 2]
    assert result.stdout.count("segment (finetune) on val") == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["best.pt", "last.pt", "metrics.csv", "overlays", "per_image.csv", "run_manifest.json",
         "summary.json"])


@pytest.mark.parametrize("arch, kwargs", [
    ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8}), ("convnext_atto", {}),
    ("resnet10t", {})])
def test_every_trainable_parameter_gets_a_gradient(arch, kwargs):
    """What DDP needs: the encoder parameters the decoder never reads are frozen."""
    import timm

    from mwm.downstream.segment_decoders import SegNet

    net = SegNet(timm.create_model(arch, num_classes=0, **kwargs), 8, 3, frozen=False)
    unused = net.freeze_unused(32)
    assert all(name.startswith("encoder.") for name in unused)
    assert bool(unused) == (arch != "resnet10t")  # a ViT's final norm, ConvNeXt's head norm
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
