"""The pretraining loop at tiny sizes: outputs, exact resume, errors, DDP on 2 CPU processes."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mwm.data.io import DataError
from mwm.pretrain.train import PretrainConfig, Trainer, load_checkpoint, pretrain

from dist_helpers import torchrun_mwm

TINY = dict(model="resnet10t", input_size=64, decoder_width=32, batch_size=4, epochs=2, workers=0, amp="none",
            channels_last=False, checkpoint_every=1, log_every=1, quiet=True, device="cpu",
            warmup_epochs=0.5, stat_images=8)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from mwm.data.phantoms import generate_phantoms

    out = tmp_path_factory.mktemp("ph")
    generate_phantoms(out, modality="brain-mri", n=24, size=64, seed=0, workers=1, progress=False)
    return out


def n_train(phantoms):
    with open(phantoms / "labels.csv", newline="") as handle:
        return sum(1 for row in csv.DictReader(handle) if row["split"] == "train")


def losses(run_dir):
    with open(run_dir / "train_log.csv", newline="") as handle:
        return [(int(r["step"]), r["loss"]) for r in csv.DictReader(handle)]


def test_region_pretraining_writes_everything(phantoms, tmp_path):
    cfg = PretrainConfig(images=str(phantoms), regions=str(phantoms / "masks"), out=str(tmp_path),
                         masking="region", **TINY)
    summary = pretrain(cfg)
    assert summary.steps == 2 * (n_train(phantoms) // 4)  # the train split only
    assert (tmp_path / "encoder.safetensors").is_file()
    assert (tmp_path / "figures" / "epoch_0002.png").is_file()
    assert any((tmp_path / "tensorboard").iterdir())
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["step"] == summary.steps and len(ckpt["mean"]) == 3
    assert {"model", "optimizer", "rng", "config"} <= set(ckpt)
    rows = list(csv.DictReader(open(tmp_path / "train_log.csv")))
    salient = [float(r["ratio_salient"]) for r in rows]
    assert all(0.6 <= s <= 1.0 for s in salient)  # salient cells masked near 0.8
    assert all(float(r["ratio_background"]) < 0.5 for r in rows)
    # run averages over every batch (here every batch is logged), not the last batch
    for key, column in (("overall", "ratio_overall"), ("empty_fraction", "empty_fraction")):
        mean = sum(float(r[column]) for r in rows) / len(rows)
        assert summary.realized[key] == pytest.approx(mean, abs=1e-4)
    # images with an empty mask are counted when the data is opened, and listed
    listed = list(csv.DictReader(open(tmp_path / "empty_regions.csv")))
    assert summary.empty_regions["n_empty"] == len(listed) == empty_train_masks(phantoms)
    assert summary.empty_regions["n_images"] == n_train(phantoms)


def empty_train_masks(phantoms):
    import numpy as np
    from mwm.data.io import read_mask

    with open(phantoms / "labels.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"] == "train"]
    return sum(not np.any(read_mask(phantoms / r["mask"])) for r in rows)


def test_resume_repeats_the_uninterrupted_loss_curve(phantoms, tmp_path):
    common = dict(images=str(phantoms), regions=str(phantoms / "masks"), masking="region", **TINY)
    full = pretrain(PretrainConfig(out=str(tmp_path / "full"), **common))
    pretrain(PretrainConfig(out=str(tmp_path / "cut"), max_steps=3, **common))
    assert load_checkpoint(tmp_path / "cut")["step"] == 3
    resumed = pretrain(PretrainConfig(out=str(tmp_path / "cut"), resume="auto", **common))
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    assert resumed.realized == pytest.approx(full.realized, abs=1e-12)


def test_resume_errors(phantoms, tmp_path):
    common = dict(images=str(phantoms), **{**TINY, "epochs": 1})
    with pytest.raises(DataError, match="no checkpoint"):
        Trainer(PretrainConfig(out=str(tmp_path), masking="random", resume=str(tmp_path / "nope"), **common))
    pretrain(PretrainConfig(out=str(tmp_path), masking="random", max_steps=1, **common))
    with pytest.raises(DataError, match="ratio: 0.6 → 0.7"):
        Trainer(PretrainConfig(out=str(tmp_path), masking="random", ratio=0.7, resume="auto", **common))


def test_explicit_lr_is_honored_and_default_scales(phantoms, tmp_path):
    common = dict(images=str(phantoms), out=str(tmp_path), masking="random", **TINY)
    assert Trainer(PretrainConfig(lr=0.123, **common)).engine.schedule.peak == 0.123
    assert Trainer(PretrainConfig(base_lr=2e-4, **common)).engine.schedule.peak == pytest.approx(2e-4 * 4 / 256)


def test_region_masking_needs_regions(phantoms, tmp_path):
    with pytest.raises(DataError, match="--regions"):
        PretrainConfig(images=str(phantoms), out=str(tmp_path), masking="region")


def run_cli_pretrain(out, *extra):
    return [sys.executable, "-m", "mwm", "pretrain", *extra, "--out", str(out), "--model", "resnet10t",
            "--input-size", "64", "--batch-size", "4", "--epochs", "2", "--workers", "0",
            "--amp", "none", "--no-channels-last", "--checkpoint-every", "1", "--quiet",
            "--device", "cpu", "--warmup-epochs", "0.5", "--decoder-width", "32"]


def test_killed_run_resumes_with_the_same_curve(phantoms, tmp_path):
    base = [str(phantoms), "--regions", str(phantoms / "masks"), "--masking", "region"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    full = subprocess.run(run_cli_pretrain(tmp_path / "full", *base),
                          env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr
    killed = subprocess.Popen(run_cli_pretrain(tmp_path / "kill", *base), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:
        ckpt = tmp_path / "kill" / "checkpoint.pt"
        if ckpt.is_file() and torch.load(ckpt, weights_only=True)["step"] >= 2:
            break
        time.sleep(0.2)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    resumed = subprocess.run(run_cli_pretrain(tmp_path / "kill", *base, "--resume", "auto"),
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert losses(tmp_path / "kill") == losses(tmp_path / "full")


DDP_COMMON = ("--input-size", "64", "--batch-size", "2", "--epochs", "1", "--workers", "0",
              "--amp", "none", "--no-channels-last", "--quiet", "--device", "cpu",
              "--decoder-width", "32")


def ddp_manifest(phantoms, tmp_path, *args) -> dict:
    """``mwm pretrain`` on 2 CPU processes (torchrun); its manifest."""
    result = torchrun_mwm("pretrain", phantoms, "--out", tmp_path, *args, *DDP_COMMON)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((tmp_path / "run_manifest.json").read_text())


def test_ddp_two_cpu_processes_agree(phantoms, tmp_path):
    manifest = ddp_manifest(phantoms, tmp_path, "--masking", "random", "--model", "resnet10t",
                            "--sync-bn")
    assert manifest["results"]["ranks_agree"] is True
    assert manifest["results"]["steps"] == n_train(phantoms) // 4


def test_ddp_mae_with_uneven_visible_counts_agrees(phantoms, tmp_path):
    """Region masks give each rank (and image) its own visible count, so the ranks' token
    sequences differ in length; DDP (no find_unused_parameters) must still finish and
    keep the ranks' ViT weights equal."""
    manifest = ddp_manifest(phantoms, tmp_path, "--regions", phantoms / "masks", "--masking",
                            "region", "--model", "vit_tiny_patch16_224", "--patch-size", "8",
                            "--decoder-depth", "1")
    assert manifest["results"]["ranks_agree"] is True
    assert manifest["results"]["steps"] == n_train(phantoms) // 4


def test_mask_patch_16_pretrains_on_the_fine_grid_and_resumes(phantoms, tmp_path):
    """`--mask-patch 16` at 64 px: a 4 x 4 grid, exact counts logged on it (10 of 16 at 0.6,
    where the 2 x 2 stride grid gives 2 of 4), and a resumed run repeats the curve."""
    common = dict(images=str(phantoms), masking="random", ratio=0.6, mask_patch=16,
                  **{**TINY, "epochs": 1})
    full = pretrain(PretrainConfig(out=str(tmp_path / "full"), **common))
    rows = list(csv.DictReader(open(tmp_path / "full" / "train_log.csv")))
    assert {r["ratio_overall"] for r in rows} == {"0.6250"}
    assert full.realized["overall"] == pytest.approx(0.625)
    pretrain(PretrainConfig(out=str(tmp_path / "cut"), max_steps=2, **common))
    pretrain(PretrainConfig(out=str(tmp_path / "cut"), resume="auto", **common))
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    with pytest.raises(DataError, match="mask_patch"):
        Trainer(PretrainConfig(out=str(tmp_path / "bad"), **{**common, "mask_patch": 12}))
