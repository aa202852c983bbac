"""Mask R-CNN fine-tuning on phantom COCO data: train steps (fp32 and bf16), periodic
evaluation with best/last checkpoints, resume, errors."""

import json

import pytest
import torch

timm = pytest.importorskip("timm")
pytest.importorskip("torchvision")
pytest.importorskip("pycocotools")

from mwm.data.io import DataError  # noqa: E402
from mwm.data.phantoms import generate_phantoms  # noqa: E402
from mwm.downstream.detect import (DetectConfig, METRIC_NAMES, STAGE_LR_EXPONENTS,  # noqa: E402
                                   CocoInstances, build_model, detect, stage_groups, train_step)
from mwm.engine import Engine  # noqa: E402
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
    assert (out / "best.pt").is_file()  # the end-of-run evaluation is the first: best so far
    config = json.loads((out / "config.json").read_text())
    assert config["weights_meta"]["mean"] == [0.2] * 3

    # resume continues from the checkpoint; every evaluation is a metrics.csv row
    again = detect(_cfg(phantoms, out, weights=str(encoder), max_steps=2, resume="auto", figures=0))
    assert again["step"] == 2
    assert len((out / "log.csv").read_text().strip().splitlines()) == 3
    assert [r["step"] for r in _rows(out / "metrics.csv")] == ["1", "2"]


def _rows(path):
    import csv

    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_periodic_evaluation_keeps_best_and_last(phantoms, tmp_path):
    out = tmp_path / "every"
    summary = detect(_cfg(phantoms, out, model="resnet18", epochs=2, eval_every=1, figures=0))
    per_epoch = summary["step"] // 2
    rows = _rows(out / "metrics.csv")
    assert [(int(r["epoch"]), int(r["step"])) for r in rows] == [(1, per_epoch), (2, 2 * per_epoch)]
    assert summary["evaluations"] == 2  # the end of epoch 2 is not evaluated twice
    scores = [float(r["segm/AP"]) for r in rows]
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["step"] == int(rows[scores.index(max(scores))]["step"])  # ties: the earlier
    assert summary["best"]["step"] == best["step"]
    last = torch.load(out / "checkpoint.pt", weights_only=True)
    assert last["step"] == 2 * per_epoch and len(last["evals"]) == 2
    model = build_model("resnet18", summary["num_classes"], input_size=SIZE)
    model.load_state_dict(best["model"])  # best.pt holds a loadable Mask R-CNN
    if best["step"] != last["step"]:
        assert not torch.equal(best["model"]["roi_heads.box_predictor.cls_score.weight"],
                               last["model"]["roi_heads.box_predictor.cls_score.weight"])
    # resuming the finished run evaluates it again but replaces that step's row
    again = detect(_cfg(phantoms, out, model="resnet18", epochs=2, resume="auto", figures=0))
    assert again["step"] == 2 * per_epoch and again["evaluations"] == 2
    assert len(_rows(out / "metrics.csv")) == 2


def test_bf16_autocast_train_step(phantoms):
    """One Mask R-CNN step under CPU bf16 autocast: the backbone runs in bf16, the losses
    are finite and differ from fp32's, the weights stay fp32 and change."""
    data = CocoInstances(phantoms, "train")
    images, targets = zip(*(data[i] for i in range(2)))
    seen = []
    losses = {}
    for dtype in (torch.bfloat16, None):
        torch.manual_seed(0)
        model = build_model("resnet18", data.num_classes, input_size=SIZE, rpn_batch_size=32,
                            roi_batch_size=32).train()
        hook = model.backbone.body.layer1[0].conv1.register_forward_hook(
            lambda m, i, o: seen.append(o.dtype))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        engine = Engine(model, optimizer, device=torch.device("cpu"),
                        amp="bf16" if dtype is torch.bfloat16 else "none")
        before = model.backbone.fpn.layer_blocks[0][0].weight.detach().clone()
        torch.manual_seed(1)
        losses[dtype] = train_step(engine, list(images), list(targets))
        hook.remove()
        after = model.backbone.fpn.layer_blocks[0][0].weight
        assert after.dtype == torch.float32 and not torch.equal(before, after)
    assert seen == [torch.bfloat16, torch.float32]
    assert all(torch.isfinite(torch.tensor(v)) for v in losses[torch.bfloat16].values())
    assert losses[torch.bfloat16]["loss"] != losses[None]["loss"]


def test_amp_choices_are_checked(phantoms, tmp_path):
    with pytest.raises(ValueError, match="amp must be one of auto, bf16, fp16, none"):
        _cfg(phantoms, tmp_path, amp="fp8")
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        detect(_cfg(phantoms, tmp_path, amp="fp16", device="cpu", max_steps=1))


def test_pretrained_weights_and_mean_reach_the_model(encoder):
    from mwm.downstream.convert import load_timm_state

    state, meta = load_timm_state(encoder)
    model = build_model("resnet18", 4, input_size=SIZE, mean=meta["mean"], std=meta["std"],
                        weights=state)
    body = model.backbone.body.state_dict()
    assert torch.equal(body["layer4.1.conv2.weight"], state["layer4.1.conv2.weight"])
    assert model.transform.image_mean == [0.2] * 3
    assert model.transform.min_size == (SIZE,) and model.transform.max_size == SIZE
    groups = stage_groups(model, 0.6, 1e-4)
    exps = {int(g["name"].split("_")[0][len("layer"):]) for g in groups}
    assert exps == set(STAGE_LR_EXPONENTS.values()) | {0}
    assert {g["lr_scale"] for g in groups} == {0.6 ** e for e in exps}
    assert all(g["weight_decay"] == 1e-4 for g in groups)


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
