"""Weight conversion: timm → torchvision / Detectron2 key spaces, and export round trips."""

import re

import pytest
import torch

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

from mwm.data.io import DataError  # noqa: E402
from mwm.downstream import convert  # noqa: E402
from mwm.pretrain.export import export_encoder, read_metadata  # noqa: E402


def _timm_state(arch, seed=0):
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=0)
    # make BN buffers distinguishable from their defaults
    state = model.state_dict()
    for key, value in state.items():
        if value.is_floating_point():
            value.copy_(torch.randn_like(value).abs() + 0.1 if key.endswith("running_var")
                        else torch.randn_like(value))
    return state


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_mapping_takes_every_backbone_weight(arch):
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d

    state = _timm_state(arch)
    for norm in (FrozenBatchNorm2d, torch.nn.BatchNorm2d):
        backbone = resnet_fpn_backbone(backbone_name=arch, weights=None, trainable_layers=5,
                                       norm_layer=norm)
        loaded = convert.load_into_backbone(backbone.body, state)
        body = backbone.body.state_dict()
        assert sorted(body) == loaded  # no backbone key left untouched
        for key, value in body.items():
            if key.endswith("num_batches_tracked"):
                continue
            assert torch.equal(value, state[key]), key


def test_torchvision_mapping_into_full_maskrcnn():
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    state = _timm_state("resnet50")
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    mapped = convert.timm_to_torchvision(state, prefix="backbone.body.")
    result = model.load_state_dict(mapped, strict=False)
    assert not result.unexpected_keys
    body_keys = [k for k in model.state_dict() if k.startswith("backbone.body.")]
    assert not [k for k in result.missing_keys if k.startswith("backbone.body.")]
    sd = model.state_dict()
    assert all(torch.equal(sd[k], mapped[k]) for k in body_keys)
    # and back
    back = convert.torchvision_to_timm(sd, prefix="backbone.body.")
    assert set(back) - set(state) == set()  # (BatchNorm2d here: no untrained FrozenBN)
    assert {k for k in state if not k.endswith("num_batches_tracked")} <= set(back)


def _expected_d2_keys(arch):
    """Detectron2 ResNet key names, written out from Detectron2's naming scheme."""
    blocks = {"resnet18": (2, 2, 2, 2), "resnet50": (3, 4, 6, 3)}[arch]
    convs = 2 if arch == "resnet18" else 3
    keys = {"stem.conv1.weight"} | {f"stem.conv1.norm.{p}" for p in
                                    ("weight", "bias", "running_mean", "running_var")}
    for stage, n in enumerate(blocks, start=2):
        for b in range(n):
            pre = f"res{stage}.{b}"
            for c in range(1, convs + 1):
                keys.add(f"{pre}.conv{c}.weight")
                keys |= {f"{pre}.conv{c}.norm.{p}" for p in
                         ("weight", "bias", "running_mean", "running_var")}
            if b == 0 and (stage > 2 or arch != "resnet18"):
                keys.add(f"{pre}.shortcut.weight")
                keys |= {f"{pre}.shortcut.norm.{p}" for p in
                         ("weight", "bias", "running_mean", "running_var")}
    return keys


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_detectron2_mapping_covers_every_weight(arch):
    state = _timm_state(arch)
    d2 = convert.timm_to_detectron2(state)
    assert set(d2) == _expected_d2_keys(arch)
    back = convert.detectron2_to_timm(d2)
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        assert torch.equal(back[key], value), key
    assert all(re.match(r"^(stem|res[2-5])\.", k) for k in d2)


def test_deep_stem_variants_are_refused():
    state = timm.create_model("resnet10t", pretrained=False, num_classes=0).state_dict()
    with pytest.raises(DataError, match="deep-stem"):
        convert.timm_to_torchvision(state)
    with pytest.raises(DataError, match="deep-stem"):
        convert.timm_to_detectron2(state)
    with pytest.raises(DataError, match="no torchvision equivalent"):
        convert.torchvision_arch("resnet50d")
    assert convert.torchvision_arch("resnet50.a1_in1k") == "resnet50"


def test_wrong_weights_name_the_keys():
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=5)
    with pytest.raises(DataError, match="shape mismatches|missing keys"):
        convert.load_into_backbone(backbone.body, _timm_state("resnet18"))


@pytest.mark.parametrize("fmt", convert.FORMATS)
def test_export_round_trip(tmp_path, fmt):
    state = _timm_state("resnet18")
    src = tmp_path / "encoder.safetensors"
    export_encoder(state, src, arch="resnet18",
                   extra_metadata={"mean": [0.2, 0.2, 0.2], "std": [0.3, 0.3, 0.3]})
    out = tmp_path / ("weights.pkl" if fmt == "detectron2" else "weights.safetensors")
    summary = convert.export_weights(src, out, fmt)
    assert summary["arch"] == "resnet18" and out.is_file()
    assert not list(tmp_path.glob(".*.tmp"))
    if fmt == "detectron2":
        payload = convert.read_detectron2(out)
        assert payload["__author__"] == "MWM" and payload["matching_heuristics"] is True
        back = convert.detectron2_to_timm(payload["model"])
    else:
        from safetensors.torch import load_file

        back = load_file(out)
        meta = read_metadata(out)
        assert meta["arch"] == "resnet18" and meta["mean"] == [0.2, 0.2, 0.2]
    for key, value in back.items():
        assert torch.equal(value, state[key]), key
    if fmt == "torchvision":
        model = torchvision.models.resnet18(weights=None)
        result = model.load_state_dict(back, strict=False)
        assert set(result.missing_keys) == {"fc.weight", "fc.bias"}
        assert not result.unexpected_keys


def test_export_from_pretrain_checkpoint(tmp_path):
    from mwm.pretrain.spark import SparKModel

    model = SparKModel("resnet18", input_size=64)
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "arch": "resnet18", "mean": [0.1] * 3,
                "std": [0.2] * 3, "input_size": 64}, ckpt)
    state, meta = convert.load_timm_state(tmp_path)  # the run folder works too
    assert meta["arch"] == "resnet18" and meta["mean"] == [0.1] * 3
    expected = model.encoder_state_dict()
    assert set(state) == set(expected)
    out = tmp_path / "d2.pkl"
    convert.export_weights(ckpt, out, "detectron2")
    assert set(convert.read_detectron2(out)["model"]) == _expected_d2_keys("resnet18")


def test_missing_source_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        convert.export_weights(tmp_path / "nope.safetensors", tmp_path / "x.safetensors", "timm")
    with pytest.raises(ValueError, match="format"):
        convert.export_weights(tmp_path / "nope.safetensors", tmp_path / "x", "onnx")
