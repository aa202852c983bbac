"""ViT encoders downstream: strict loading with resampled position embeddings, MAE layer
decay, fine-tuning and linear probing through `mwm finetune`, Mask R-CNN over the simple
feature pyramid, and `mwm export` refusing ResNet-only formats."""

import json

import pytest
import torch

timm = pytest.importorskip("timm")

from mwm.cli import main  # noqa: E402
from mwm.data.io import DataError  # noqa: E402
from mwm.downstream.classifier import FinetuneConfig, build_classifier  # noqa: E402
from mwm.downstream.full_finetune import finetune_optimizer  # noqa: E402
from mwm.downstream.weights import load_weights  # noqa: E402
from mwm.pretrain.export import export_encoder, read_metadata  # noqa: E402

ARCH, PATCH, SIZE = "vit_tiny_patch16_224", 8, 32


def _encoder(size=SIZE):
    torch.manual_seed(0)
    return timm.create_model(ARCH, pretrained=False, num_classes=0, img_size=size,
                             patch_size=PATCH)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    path = tmp_path_factory.mktemp("vit") / "encoder.safetensors"
    export_encoder(_encoder().state_dict(), path, arch=ARCH,
                   extra_metadata={"input_size": SIZE, "patch_size": PATCH})
    return path


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from mwm.data.phantoms import generate_phantoms

    out = tmp_path_factory.mktemp("phantoms")
    generate_phantoms(out, n=12, size=SIZE, workers=1, progress=False)
    return out


def _classifier(input_size=SIZE, **kw):
    cfg = FinetuneConfig(data="x", out="y", input_size=input_size, **kw)
    return build_classifier(cfg, 3, {"arch": ARCH, "patch_size": PATCH})[0]


# --------------------------------------------------------------------------- loading

def test_strict_loading_only_the_head_may_be_missing():
    state = _encoder().state_dict()
    report = load_weights(_classifier(), state)
    assert report["missing_head_keys"] == ["head.bias", "head.weight"]
    assert "pos_embed" not in report  # same grid: nothing resampled
    renamed = {("blocks.3.attn.qkv.w" if k == "blocks.3.attn.qkv.weight" else k): v
               for k, v in state.items()}
    with pytest.raises(DataError, match=r"missing keys: blocks\.3\.attn\.qkv\.weight"):
        load_weights(_classifier(), renamed)
    with pytest.raises(DataError, match="unexpected keys: blocks.3.attn.qkv.w"):
        load_weights(_classifier(), renamed)
    without_norm = {k: v for k, v in state.items() if k != "norm.weight"}
    with pytest.raises(DataError, match="missing keys: norm.weight"):
        load_weights(_classifier(), without_norm)


def test_pos_embed_resampled_the_timm_way_for_another_input_size():
    from timm.layers import resample_abs_pos_embed

    state = _encoder().state_dict()  # 4x4 patches
    model = _classifier(input_size=48)  # 6x6 patches
    report = load_weights(model, state)
    assert "4x4 to a 6x6" in report["pos_embed"]
    expected = resample_abs_pos_embed(state["pos_embed"], new_size=[6, 6], num_prefix_tokens=1)
    assert torch.equal(model.pos_embed.detach(), expected)
    # another patch size is not resampled away: the strict loader names the keys
    with pytest.raises(DataError, match="patch_embed.proj.weight"):
        load_weights(timm.create_model(ARCH, num_classes=3, img_size=48, patch_size=16), state)


def test_mean_pooled_features_are_the_normed_patch_tokens():
    x = torch.randn(2, 3, SIZE, SIZE)
    avg, token = _classifier().eval(), _classifier(vit_pool="token").eval()
    token.load_state_dict(avg.state_dict())  # the same keys either way
    tokens = avg.forward_features(x)  # after the final norm
    assert torch.allclose(avg.forward_head(tokens, pre_logits=True), tokens[:, 1:].mean(1))
    assert torch.equal(token.forward_head(tokens, pre_logits=True), tokens[:, 0])


def test_layer_decay_per_block_as_mae():
    model = _classifier()
    decay, depth = 0.5, len(model.blocks)
    top = depth + 1  # L: final norm and head
    optimizer, how = finetune_optimizer(model, FinetuneConfig(data="x", out="y",
                                                              layer_decay=decay))
    assert how == "vit blocks (MAE)"
    scale = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    wd = {id(p): g["wd_scale"] for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    for i in range(depth):
        assert scale[id(params[f"blocks.{i}.attn.qkv.weight"])] == pytest.approx(
            decay ** (top - (i + 1)))
    for name in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        assert scale[id(params[name])] == pytest.approx(decay ** top), name
    for name in ("norm.weight", "head.weight", "head.bias"):
        assert scale[id(params[name])] == 1.0, name
    assert wd[id(params["pos_embed"])] == wd[id(params["cls_token"])] == 0.0
    assert wd[id(params["blocks.0.attn.qkv.weight"])] == 1.0


# --------------------------------------------------------------------------- runs

def _finetune(phantoms, export, out, *extra):
    return main(["finetune", str(phantoms), "--out", str(out), "--weights", str(export),
                 "--epochs", "1", "--batch-size", "4", "--warmup-epochs", "0", "--workers", "0",
                 "--device", "cpu", "--amp", "none", "--quiet", *extra])


def test_finetune_at_another_input_size(tmp_path, phantoms, export):
    out = tmp_path / "ft"
    assert _finetune(phantoms, export, out, "--input-size", "48") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["arch"] == ARCH and summary["layer_groups"] == "vit blocks (MAE)"
    assert summary["vit"] == {"patch_size": PATCH, "global_pool": "avg"}
    assert "6x6" in summary["weights"]["pos_embed"]
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["model"]["pos_embed"].shape == (1, 1 + 36, 192)
    assert best["model"]["head.weight"].shape == (len(summary["classes"]), 192)
    assert best["patch_size"] == PATCH


def test_linear_probe_and_eval_only(tmp_path, phantoms, export, capsys):
    out = tmp_path / "lin"
    assert _finetune(phantoms, export, out, "--mode", "linear", "--input-size", str(SIZE),
                     "--vit-pool", "token") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["vit"]["global_pool"] == "token"
    best = torch.load(out / "best.pt", weights_only=True)
    state = _encoder().state_dict()
    assert all(torch.equal(best["model"][k], v) for k, v in state.items())  # frozen
    # eval-only rebuilds the ViT (patch size, pooling) from the checkpoint alone
    assert main(["finetune", str(phantoms), "--out", str(out), "--eval-only", "--mode", "linear",
                 "--input-size", str(SIZE), "--workers", "0", "--device", "cpu",
                 "--amp", "none", "--quiet"]) == 0
    metrics = json.loads((out / "eval_metrics.json").read_text())
    assert metrics["balanced_accuracy"] == pytest.approx(
        summary["best"]["metrics"]["balanced_accuracy"], abs=1e-6)
    capsys.readouterr()
    # an input size the patches do not tile, or another patch size than the weights'
    assert _finetune(phantoms, export, tmp_path / "bad", "--input-size", "36") == 2
    assert "not a multiple of the ViT's patch size 8" in capsys.readouterr().err
    assert _finetune(phantoms, export, tmp_path / "bad2", "--input-size", "32",
                     "--patch-size", "16") == 2
    assert "made with patch size 8" in capsys.readouterr().err


def test_detect_one_step_with_the_simple_pyramid(tmp_path, export):
    from mwm.data.phantoms import generate_phantoms
    from mwm.downstream.detect import (METRIC_NAMES, DetectConfig, build_model, detect,
                                       stage_groups)
    from mwm.downstream.vit import SimpleFeaturePyramid

    pytest.importorskip("pycocotools")
    data = tmp_path / "coco"
    generate_phantoms(data, modality="brain-mri", n=4, size=64, workers=1, progress=False)
    out = tmp_path / "det"
    summary = detect(DetectConfig(data=str(data), out=str(out), weights=str(export),
                                  input_size=64, epochs=1, batch_size=2, max_steps=1,
                                  rpn_batch_size=16, roi_batch_size=16, score_thresh=0.0,
                                  quiet=True, figures=0))
    assert summary["arch"] == ARCH and summary["step"] == 1
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert set(metrics) == {f"{k}/{m}" for k in ("bbox", "segm") for m in METRIC_NAMES}
    # the levels' strides are those of a ResNet-FPN; the ViT's blocks decay as in MAE
    model = build_model(ARCH, 2, input_size=64, patch_size=PATCH,
                        weights=_encoder().state_dict())
    features = model.backbone(torch.zeros(1, 3, 64, 96))
    assert {k: tuple(v.shape[-2:]) for k, v in features.items()} == {
        "0": (16, 24), "1": (8, 12), "2": (4, 6), "3": (2, 3), "pool": (1, 2)}
    assert model.backbone.out_channels == 256
    scales = {g["name"]: g["lr_scale"] for g in stage_groups(model, 0.5, 1e-4)}
    assert scales["layer13_decay"] == pytest.approx(0.5 ** 13)  # embeddings
    assert scales["layer12_decay"] == pytest.approx(0.5 ** 12)  # block 0
    assert scales["layer0_decay"] == 1.0  # final norm, pyramid, heads
    with pytest.raises(DataError, match="power-of-two patch size"):
        SimpleFeaturePyramid(192, 14)


# --------------------------------------------------------------------------- export

def test_export_refuses_resnet_formats_and_keeps_timm_metadata(tmp_path, export, capsys):
    for fmt in ("torchvision", "detectron2"):
        assert main(["export", str(export), "--out", str(tmp_path / f"w.{fmt}"),
                     "--format", fmt]) == 2
        err = capsys.readouterr().err
        assert f"{ARCH} is a Vision Transformer" in err and "--format timm" in err, err
        assert not (tmp_path / f"w.{fmt}").exists()
    out = tmp_path / "timm.safetensors"
    assert main(["export", str(export), "--out", str(out), "--format", "timm"]) == 0
    meta = read_metadata(out)
    assert (meta["arch"], meta["input_size"], meta["patch_size"]) == (ARCH, SIZE, PATCH)
    model = timm.create_model(ARCH, pretrained=True, num_classes=0, img_size=SIZE,
                              patch_size=PATCH, pretrained_cfg_overlay=dict(file=str(out)))
    assert torch.equal(model.pos_embed, _encoder().pos_embed)


def test_mae_pretrain_checkpoint_gives_its_encoder(tmp_path):
    from mwm.downstream import convert
    from mwm.downstream.weights import read_weights

    encoder = _encoder().state_dict()
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {**{f"encoder.{k}": v for k, v in encoder.items()},
                          "decoder.pred.weight": torch.zeros(2, 2)},
                "config": {"model": ARCH, "input_size": SIZE, "patch_size": PATCH,
                           "masking": "random"},
                "arch": ARCH, "mean": [0.5] * 3, "std": [0.25] * 3, "input_size": SIZE}, path)
    state, meta, kind = read_weights(path)
    assert kind == "mwm-pretrain" and meta["patch_size"] == PATCH
    assert set(state) == set(encoder)
    load_weights(_classifier(), state)  # strict: the decoder is not part of it
    state, meta = convert.load_timm_state(path)
    assert set(state) == set(encoder) and meta["patch_size"] == PATCH
    with pytest.raises(DataError, match="is a Vision Transformer"):
        convert.export_weights(path, tmp_path / "tv.safetensors", "torchvision")
