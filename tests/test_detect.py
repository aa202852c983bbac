"""Mask R-CNN fine-tuning on phantom COCO data: one train step, evaluation, resume, errors."""

import json

import pytest
import torch

timm = pytest.importorskip("timm")
pytest.importorskip("torchvision")
pytest.importorskip("pycocotools")

from mwm.data.io import DataError  # noqa: E402
from mwm.data.phantoms import generate_phantoms  # noqa: E402
from mwm.downstream.detect import (DetectConfig, METRIC_NAMES, STAGE_LR_EXPONENTS,  # noqa: E402
                                   build_model, detect, param_groups)
from mwm.pretrain.export import export_encoder  # noqa: E402

SIZE = 64


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    generate_phantoms(root, modality="brain-mri", n=8, size=SIZE, workers=1, progress=False)
    return root


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("enc") / "encoder.safetensors"
    torch.manual_seed(0)
    export_encoder(timm.create_model("resnet18", pretrained=False, num_classes=0), path,
                   arch="resnet18", extra_metadata={"mean": [0.2] * 3, "std": [0.25] * 3})
    return path


def _cfg(phantoms, out, **kw):
    base = dict(data=str(phantoms), out=str(out), input_size=SIZE, epochs=1, batch_size=2,
                rpn_batch_size=32, roi_batch_size=32, score_thresh=0.0, quiet=True, figures=2)
    base.update(kw)
    return DetectConfig(**base)


def test_train_step_and_eval(phantoms, encoder, tmp_path):
    from pycocotools.coco import COCO

    out = tmp_path / "run"
    summary = detect(_cfg(phantoms, out, weights=str(encoder), max_steps=1))
    assert summary["arch"] == "resnet18" and summary["step"] == 1
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert set(metrics) == {f"{k}/{m}" for k in ("bbox", "segm") for m in METRIC_NAMES}
    assert all(-1.0 <= v <= 1.0 for v in metrics.values())
    results = json.loads((out / "predictions.json").read_text())
    assert results, "score_thresh=0 keeps detections"
    gt = COCO(str(phantoms / "instances_val.json"))
    dt = gt.loadRes(str(out / "predictions.json"))
    assert len(dt.getAnnIds()) == len(results)
    assert all(isinstance(r["segmentation"]["counts"], str) for r in results)
    assert summary["figures"] and all((out / "figures").glob("*.png"))
    assert (out / "checkpoint.pt").is_file() and (out / "log.csv").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["weights_meta"]["mean"] == [0.2] * 3

    # resume continues from the checkpoint
    again = detect(_cfg(phantoms, out, weights=str(encoder), max_steps=2, resume="auto", figures=0))
    assert again["step"] == 2
    assert len((out / "log.csv").read_text().strip().splitlines()) == 3


def test_pretrained_weights_and_mean_reach_the_model(encoder):
    from mwm.downstream.convert import load_timm_state

    state, meta = load_timm_state(encoder)
    model = build_model("resnet18", 4, input_size=SIZE, mean=meta["mean"], std=meta["std"],
                        weights=state)
    body = model.backbone.body.state_dict()
    assert torch.equal(body["layer4.1.conv2.weight"], state["layer4.1.conv2.weight"])
    assert model.transform.image_mean == [0.2] * 3
    assert model.transform.min_size == (SIZE,) and model.transform.max_size == SIZE
    groups = param_groups(model, 1.0, 0.6, 1e-4)
    exps = {g["lr_exp"] for g in groups}
    assert exps == set(STAGE_LR_EXPONENTS.values()) | {0}
    assert max(g["lr"] for g in groups) == 1.0


def test_wrong_weights_are_clear_errors(phantoms, encoder, tmp_path):
    with pytest.raises(DataError, match="pretrained as 'resnet18'"):
        detect(_cfg(phantoms, tmp_path / "a", weights=str(encoder), model="resnet50", max_steps=1))
    deep = tmp_path / "deep.safetensors"
    export_encoder(timm.create_model("resnet10t", pretrained=False, num_classes=0), deep,
                   arch="resnet10t")
    with pytest.raises(DataError, match="no torchvision equivalent"):
        detect(_cfg(phantoms, tmp_path / "b", weights=str(deep), max_steps=1))
    # right arch name, wrong tensors: the strict backbone load names the keys
    bad = tmp_path / "bad.safetensors"
    state = timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict()
    del state["layer1.0.conv1.weight"]
    export_encoder(state, bad, arch="resnet18")
    with pytest.raises(DataError, match="layer1.0.conv1.weight"):
        detect(_cfg(phantoms, tmp_path / "c", weights=str(bad), max_steps=1))
    with pytest.raises(DataError, match="not found"):
        detect(_cfg(phantoms, tmp_path / "d", weights=str(tmp_path / "none.safetensors")))


def test_missing_resume_and_data(phantoms, tmp_path):
    with pytest.raises(DataError, match="no checkpoint"):
        detect(_cfg(phantoms, tmp_path / "r", resume=str(tmp_path / "nowhere")))
    with pytest.raises(DataError, match="instances_train.json"):
        detect(_cfg(tmp_path, tmp_path / "r"))
