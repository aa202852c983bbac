"""Encoder export in timm's key space: plain timm loading, load_encoder, errors, mapping."""

import pytest
import timm
import torch

from mwm.data.io import DataError
from mwm.pretrain.encoders import create_encoder
from mwm.pretrain.export import export_encoder, load_encoder, read_metadata
from mwm.pretrain.spark import SparKModel


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = SparKModel("resnet10t", input_size=64)
    model(torch.randn(2, 3, 64, 64), torch.tensor([[[[True, False], [False, True]]]] * 2)).loss.backward()
    with torch.no_grad():  # make the weights distinguishable from any fresh init
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("export") / "encoder.safetensors"
    export_encoder(model, str(path), arch="resnet10t",
                   extra_metadata={"mean": [0.1, 0.2, 0.3], "std": [1.0, 1.0, 1.0],
                                   "input_size": 64, "masking": "region"})
    return model.encoder_state_dict(), path


def _assert_same(model, state):
    own = model.state_dict()
    for k, v in state.items():
        assert torch.equal(own[k], v), k


@pytest.mark.parametrize("num_classes", [0, 7])
def test_timm_loads_the_export_via_pretrained_cfg_overlay(exported, num_classes):
    state, path = exported
    model = timm.create_model("resnet10t", pretrained=True, num_classes=num_classes,
                              pretrained_cfg_overlay=dict(file=str(path)))
    _assert_same(model, state)
    missing = set(model.state_dict()) - set(state)
    assert missing == ({"fc.weight", "fc.bias"} if num_classes else set())


def test_load_encoder_and_metadata(exported):
    state, path = exported
    meta = read_metadata(path)
    assert meta["arch"] == "resnet10t" and meta["format"] == "mwm-encoder"
    assert meta["mean"] == [0.1, 0.2, 0.3] and meta["input_size"] == 64 and meta["masking"] == "region"
    assert "mwm_version" in meta
    model = load_encoder(path)
    _assert_same(model, state)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 512)
    with_head = load_encoder(path, num_classes=3)
    _assert_same(with_head, state)
    assert with_head(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_load_encoder_names_mismatched_keys(exported):
    _, path = exported
    with pytest.raises(DataError) as err:
        load_encoder(path, arch="resnet18")
    text = str(err.value)
    assert "resnet18" in text and "exported for 'resnet10t'" in text
    assert "conv1.0.weight" in text or "conv1.weight" in text


def test_generic_adapter_maps_back_to_plain_keys(tmp_path):
    torch.manual_seed(1)
    enc = create_encoder("convnext_atto", adapter="generic")
    feature_keys = list(enc.model.state_dict())
    assert any(k.startswith("stages_0.") for k in feature_keys)  # timm flattened the names
    assert enc.feature_strides == [4, 8, 16, 32]
    assert set(enc.untrained_keys) == {"head.norm.weight", "head.norm.bias"}
    state = enc.timm_state_dict()
    plain = timm.create_model("convnext_atto", pretrained=False, num_classes=0)
    assert set(state) == set(plain.state_dict())
    assert torch.equal(state["stages.0.blocks.0.conv_dw.weight"],
                       enc.model.state_dict()["stages_0.blocks.0.conv_dw.weight"])
    path = tmp_path / "generic.safetensors"
    export_encoder(state, path, arch="convnext_atto")
    loaded = timm.create_model("convnext_atto", pretrained=True, num_classes=0,
                               pretrained_cfg_overlay=dict(file=str(path)))
    _assert_same(loaded, state)


def test_spark_model_with_generic_adapter_exports_plain_keys():
    model = SparKModel("convnext_atto", input_size=64, adapter="generic")
    assert model.family == "generic" and model.densify_norm == "ln"
    plain = timm.create_model("convnext_atto", pretrained=False, num_classes=0)
    assert set(model.encoder_state_dict()) == set(plain.state_dict())
