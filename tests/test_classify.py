"""Classification fine-tuning / linear probing (mwm.downstream.classify) and its metrics."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from mwm.data.io import DataError
from mwm.downstream.full_finetune import finetune_optimizer, layer_groups
from mwm.downstream.classify import (FinetuneConfig, finetune,
                                     load_weights, read_weights)
from mwm.downstream.classify_metrics import binary_auroc, classification_metrics

ARCH = "resnet10t"


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from mwm.data.phantoms import generate_phantoms

    out = tmp_path_factory.mktemp("phantoms")
    generate_phantoms(out, n=40, size=64, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def spark():
    from mwm.pretrain.spark import SparKModel

    torch.manual_seed(1)
    return SparKModel(ARCH, input_size=64)


@pytest.fixture(scope="module")
def export(tmp_path_factory, spark):
    from mwm.pretrain.export import export_encoder

    path = tmp_path_factory.mktemp("export") / "encoder.safetensors"
    export_encoder(spark.encoder_state_dict(), path, arch=ARCH,
                   extra_metadata={"mean": [0.5] * 3, "std": [0.25] * 3, "input_size": 64})
    return path


def _cfg(phantoms, out, **kw) -> FinetuneConfig:
    base = dict(data=str(phantoms), out=str(out), model=None, input_size=64, epochs=2,
                batch_size=8, warmup_epochs=1, workers=0, quiet=True, device="cpu", amp="none")
    base.update(kw)
    return FinetuneConfig(**base)


# --------------------------------------------------------------------------- metrics

def test_auroc_hand_computed_with_ties():
    # positives 0.8, 0.4; negatives 0.4, 0.2, 0.1 → pairs: (0.8>all)=3, (0.4 tie 0.4)=0.5,
    # (0.4 > 0.2, 0.1)=2 → 5.5 / 6
    assert binary_auroc([0.8, 0.4, 0.4, 0.2, 0.1], [1, 1, 0, 0, 0]) == pytest.approx(5.5 / 6)
    assert binary_auroc([0.5, 0.5, 0.5], [1, 0, 0]) == pytest.approx(0.5)
    assert binary_auroc([0.1, 0.9], [1, 0]) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        binary_auroc([0.1, 0.2], [1, 1])


def test_classification_metrics_hand_made():
    probs = np.array([[0.7, 0.2, 0.1],   # true 0, pred 0
                      [0.6, 0.3, 0.1],   # true 0, pred 0
                      [0.2, 0.5, 0.3],   # true 0, pred 1
                      [0.1, 0.8, 0.1],   # true 1, pred 1
                      [0.3, 0.3, 0.4]])  # true 1, pred 2
    labels = np.array([0, 0, 0, 1, 1])
    m = classification_metrics(probs, labels, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)  # class c absent
    # F1: a = 2*2/(3+2) = 0.8; b = 2*1/(2+2) = 0.5; c = 0 (predicted, never true)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 0.0) / 3)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 0]]
    # AUROC a: pos {.7,.6,.2} vs neg {.1,.3} → (2+2+1)/6; b: pos {.8,.3} neg {.2,.3,.5}
    # → .8 beats 3, .3 beats .2 ties .3 → 3 + 1.5 = 4.5/6; c absent → skipped
    assert m["per_class"]["a"]["auroc"] == pytest.approx(5 / 6)
    assert m["per_class"]["b"]["auroc"] == pytest.approx(4.5 / 6)
    assert m["auroc_skipped"] == ["c"]
    assert m["auroc"] == pytest.approx((5 / 6 + 4.5 / 6) / 2)


def test_metrics_match_scipy_mann_whitney():
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 60).astype(float)  # many ties
    positive = rng.random(60) < 0.4
    u = mannwhitneyu(scores[positive], scores[~positive]).statistic
    assert binary_auroc(scores, positive) == pytest.approx(u / (positive.sum() * (~positive).sum()))


# --------------------------------------------------------------------------- weights

def test_export_and_pretrain_checkpoint_give_same_backbone(tmp_path, spark, export):
    from mwm.pretrain.train import PretrainConfig

    cfg = PretrainConfig(images="x", out=str(tmp_path), model=ARCH, input_size=64,
                         masking="random")
    torch.save({"model": spark.state_dict(), "config": cfg.to_dict(), "step": 3, "epoch": 1,
                "mean": [0.4] * 3, "std": [0.2] * 3, "arch": ARCH, "input_size": 64},
               tmp_path / "checkpoint.pt")
    a, meta_a, kind_a = read_weights(export)
    b, meta_b, kind_b = read_weights(tmp_path)  # run folder → checkpoint.pt
    assert (kind_a, kind_b) == ("mwm-export", "mwm-pretrain")
    assert meta_a["arch"] == meta_b["arch"] == ARCH and meta_b["mean"] == [0.4] * 3
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    import timm

    m1 = timm.create_model(ARCH, num_classes=4)
    m2 = timm.create_model(ARCH, num_classes=4)
    load_weights(m1, a)
    report = load_weights(m2, b)
    assert report["missing_head_keys"] == ["fc.bias", "fc.weight"]
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1 if not k.startswith("fc."))


def test_wrong_architecture_fails_naming_keys(tmp_path):
    import timm

    from mwm.pretrain.export import export_encoder

    path = tmp_path / "r18.safetensors"
    export_encoder(timm.create_model("resnet18", num_classes=0), path, arch="resnet18")
    state, _, _ = read_weights(path)
    with pytest.raises(DataError, match=r"missing keys: .*layer\d\.\d"):
        load_weights(timm.create_model("resnet34", num_classes=3), state, source=str(path))


def test_timm_checkpoint_head_dropped_and_nested(tmp_path):
    import timm

    src = timm.create_model(ARCH, num_classes=1000)
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}},
               tmp_path / "t.pth")
    state, meta, kind = read_weights(tmp_path / "t.pth")
    assert kind == "timm" and meta == {}
    report = load_weights(timm.create_model(ARCH, num_classes=3), state)
    assert report["ignored_head_keys"] == ["fc.bias", "fc.weight"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(DataError, match="unexpected keys: extra.weight"):
        load_weights(timm.create_model(ARCH, num_classes=3), state)


def test_missing_paths_are_errors(tmp_path, phantoms):
    with pytest.raises(DataError, match="no such file"):
        read_weights(tmp_path / "nope.safetensors")
    with pytest.raises(DataError, match="no checkpoint"):
        finetune(_cfg(phantoms, tmp_path / "run", model=ARCH, resume=str(tmp_path / "none.pt")))
    with pytest.raises(DataError, match="eval-only"):
        finetune(_cfg(phantoms, tmp_path / "run", model=ARCH, eval_only=True))


def test_layer_decay_groups():
    import timm

    model = timm.create_model(ARCH, num_classes=3)
    ids, n, how = layer_groups(model)
    assert n == 6 and how == "timm group_matcher"
    assert ids["conv1.0.weight"] == 0 and ids["layer1.0.conv1.weight"] == 1
    assert ids["layer4.0.conv1.weight"] == 4 and ids["fc.weight"] == 5
    cfg = FinetuneConfig(data="x", out="y", layer_decay=0.5)
    optimizer, _ = finetune_optimizer(model, cfg)
    scales = {g["name"]: g["lr_scale"] for g in optimizer.param_groups}
    assert scales["layer5_decay"] == 1.0 and scales["layer0_decay"] == pytest.approx(0.5 ** 5)


# --------------------------------------------------------------------------- runs

def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_linear_probe_end_to_end(tmp_path, phantoms, export):
    out = tmp_path / "lin"
    summary = finetune(_cfg(phantoms, out, weights=str(export), mode="linear", epochs=3))
    assert summary["arch"] == ARCH and len(summary["classes"]) == 4
    assert summary["normalization"]["source"] == "mwm-export metadata"
    assert summary["weights"]["kind"] == "mwm-export"
    assert 0.0 <= summary["best"]["metrics"]["accuracy"] <= 1.0
    for name in ("best.pt", "last.pt", "metrics.csv", "summary.json", "confusion_best.png",
                 "confusion_best.csv", "confusion_last.png"):
        assert (out / name).is_file(), name
    assert len(_rows(out / "metrics.csv")) == 3
    # the encoder stayed frozen: backbone in best.pt equals the export
    best = torch.load(out / "best.pt", weights_only=True)
    state, _, _ = read_weights(export)
    assert all(torch.equal(best["model"][k], v) for k, v in state.items())
    assert best["model"]["fc.weight"].shape[0] == 4
    # eval_only on the best checkpoint reproduces the recorded metrics
    ev = finetune(_cfg(phantoms, out, mode="linear", eval_only=True))
    assert ev["metrics"]["balanced_accuracy"] == pytest.approx(
        summary["best"]["metrics"]["balanced_accuracy"], abs=1e-6)
    assert json.loads((out / "eval_metrics.json").read_text())["split"] == "val"


def test_finetune_end_to_end_head_size_and_resume(tmp_path, phantoms, export):
    kw = dict(weights=str(export), epochs=2, ema=0.9, mixup=0.2, lr=1e-3)
    full = finetune(_cfg(phantoms, tmp_path / "full", **kw))
    assert full["epochs_done"] == 2 and full["steps"] == 2 * full["steps_per_epoch"]
    assert full["layer_groups"] == "timm group_matcher"
    last = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    assert last["model"]["fc.weight"].shape == (4, 512)  # head = number of classes
    rows = _rows(tmp_path / "full" / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 for r in rows)
    assert json.loads((tmp_path / "full" / "summary.json").read_text())["eval_split"] == "val"

    # interrupted mid-epoch-2 by max_steps, then resumed → the same weights as uninterrupted
    part = tmp_path / "part"
    stop = full["steps_per_epoch"] + 1
    first = finetune(_cfg(phantoms, part, max_steps=stop, **kw))
    assert first["steps"] == stop and first["epochs_done"] == 1
    resumed = finetune(_cfg(phantoms, part, resume="auto", **kw))
    assert resumed["steps"] == full["steps"] and resumed["epochs_done"] == 2
    a = torch.load(part / "last.pt", weights_only=True)["model"]
    for key, value in last["model"].items():
        assert torch.allclose(a[key].float(), value.float(), atol=1e-5), key
    assert [int(r["epoch"]) for r in _rows(part / "metrics.csv")] == [1, 2]
    # a changed setting refuses to resume
    with pytest.raises(DataError, match="other settings"):
        finetune(_cfg(phantoms, part, resume="auto", **{**kw, "lr": 2e-3}))


def test_scratch_computes_stats_and_wrong_model_fails(tmp_path, phantoms, export):
    summary = finetune(_cfg(phantoms, tmp_path / "s", model=ARCH, epochs=1, max_steps=1))
    assert summary["weights"]["kind"] == "scratch"
    assert summary["normalization"]["source"].startswith("computed on the train split")
    assert all(math.isfinite(v) for v in summary["normalization"]["mean"])
    with pytest.raises(DataError, match="missing keys"):
        finetune(_cfg(phantoms, tmp_path / "w", weights=str(export), model="resnet18", epochs=1))


def test_class_folders_without_val_fall_back_to_test(tmp_path, phantoms, export):
    import shutil

    root = tmp_path / "folders"
    with open(phantoms / "labels.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            split = "train" if row["split"] == "train" else "test"
            target = root / split / row["label"]
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(phantoms / row["image"], target)
    summary = finetune(_cfg(root, tmp_path / "run", weights=str(export), mode="linear",
                            epochs=1))
    assert summary["eval_split"] == "test" and "no 'val' split" in summary["note"]
    assert summary["n_eval"] == 12 and len(summary["classes"]) == 4
    import cv2

    png = cv2.imread(str(tmp_path / "run" / "confusion_best.png"))
    assert png is not None and png.shape[2] == 3
    cm = _rows(tmp_path / "run" / "confusion_best.csv")
    assert sum(int(v) for r in cm for k, v in r.items() if k != "true\\predicted") == 12


def test_lamb_optimizer_runs(tmp_path, phantoms):
    summary = finetune(_cfg(phantoms, tmp_path / "l", model=ARCH, optimizer="lamb", epochs=1,
                            cutmix=1.0, label_smoothing=0.0))
    assert summary["epochs_done"] == 1 and math.isfinite(summary["final_train_loss"])


# --------------------------------------------------------------------------- precision

def test_resolve_amp_one_rule(monkeypatch):
    """``auto`` = bf16 exactly where the device has native bf16; explicit choices as given."""
    from mwm.utils import resolve_amp

    cpu = torch.device("cpu")
    for avx512_bf16, amx, expected in ((True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                       (False, False, None)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert resolve_amp("auto", cpu) is expected
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_amp("auto", torch.device("cuda")) is None  # never fp16 unasked
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_amp("auto", torch.device("cuda")) is torch.bfloat16
    assert resolve_amp("auto", torch.device("meta")) is None
    assert resolve_amp("bf16", cpu) is torch.bfloat16 and resolve_amp("none", cpu) is None
    assert resolve_amp("fp16", torch.device("cuda")) is torch.float16
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        resolve_amp("fp16", cpu)
    with pytest.raises(ValueError, match="amp must be one of"):
        resolve_amp("half", cpu)


def test_finetune_and_pretrain_use_the_resolver(tmp_path, phantoms, monkeypatch):
    from mwm.downstream.classify import Finetuner
    from mwm.pretrain.train import PretrainConfig, Trainer

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    def dtypes():
        tuner = Finetuner(_cfg(phantoms, tmp_path / "f", model=ARCH, amp="auto"))
        trainer = Trainer(PretrainConfig(images=str(phantoms), out=str(tmp_path / "p"), model=ARCH,
                                         input_size=64, masking="random", amp="auto", device="cpu",
                                         batch_size=4, workers=0, stat_images=4, quiet=True))
        return tuner.amp_dtype, trainer.engine.amp_dtype

    assert dtypes() == (None, None)  # a CPU without bf16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert dtypes() == (torch.bfloat16, torch.bfloat16)


# --------------------------------------------------------------------------- torchrun

def test_torchrun_two_processes_agree_and_only_rank0_writes(tmp_path, phantoms, export):
    from dist_helpers import torchrun_mwm

    out = tmp_path / "ddp"
    result = torchrun_mwm("finetune", phantoms, "--out", out, "--weights", export,
                          "--input-size", "64", "--epochs", "2", "--batch-size", "4",
                          "--warmup-epochs", "1", "--ema", "0.9", "--workers", "0",
                          "--amp", "none", "--device", "cpu", "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["batch_size"] == 4
    assert summary["steps_per_epoch"] == summary["n_train"] // 8  # each rank takes 4 per step
    # weights (BN statistics included) and eval metrics are identical on both ranks
    assert summary["ranks_agree"] is True
    # one writer: rank 1 appending would double the rows; only rank 0 prints the result
    assert [int(r["epoch"]) for r in _rows(out / "metrics.csv")] == [1, 2]
    assert result.stdout.count("finetune on val") == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["best.pt", "last.pt", "metrics.csv", "summary.json", "run_manifest.json",
         "confusion_best.csv", "confusion_best.png", "confusion_last.csv", "confusion_last.png"])
