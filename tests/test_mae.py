"""MAE for timm ViTs at tiny sizes: visible-only encoding, masked-only loss, padding,
export, and `mwm pretrain --model vit_*` end to end with an exact resume."""

import csv
import re

import pytest
import torch

from mwm.masking import random_masks, region_masks
from mwm.pretrain.mae import MAEModel
from mwm.pretrain.spark import patchify

ARCH = "vit_tiny_patch16_224"
TINY = dict(input_size=32, patch_size=8, decoder_width=32, decoder_depth=1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MAEModel(ARCH, **TINY).eval()


def images(seed=0, n=4, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def uneven_masks(seed=0):
    """Region masks (4 images, 4x4 grid) whose visible counts differ between images."""
    regions = torch.zeros(4, 32, 32, dtype=torch.bool)
    regions[0, :16, :16] = True
    regions[1, :8] = True
    regions[2, :, :24] = True   # image 3: empty region, masked at the background ratio
    masks = region_masks(regions, 8, 0.75, 0.25, generator=torch.Generator().manual_seed(seed))
    counts = masks.active_b1hw.flatten(1).sum(1)
    assert len(set(counts.tolist())) > 1  # the case under test: unequal counts
    return masks, counts


def block_inputs(model):
    """Record the token count and attention mask every call of the first block gets."""
    seen = []
    hook = model.encoder.blocks[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0].shape[1], kwargs.get("attn_mask"))),
        with_kwargs=True)
    return seen, hook


def test_the_encoder_gets_exactly_the_visible_tokens(model):
    seen, hook = block_inputs(model)
    try:
        random = random_masks(4, (4, 4), 0.75, generator=torch.Generator().manual_seed(1))
        model(images(), random.active_b1hw)
        masks, counts = uneven_masks()
        model(images(), masks.active_b1hw)
    finally:
        hook.remove()
    assert seen[0] == (1 + 4, None)  # CLS + round(16 * 0.25) visible, no padding
    length, attn_mask = seen[1]
    assert length == 1 + int(counts.max())
    # each image attends to its CLS and its own visible tokens only
    assert attn_mask.shape == (4, 1, 1, length)
    assert attn_mask.flatten(1).sum(1).tolist() == (1 + counts).tolist()


def test_masked_pixels_never_reach_the_encoder(model):
    masks, _ = uneven_masks()
    x = images()
    hidden = masks.masked_bhw.repeat_interleave(8, 1).repeat_interleave(8, 2).unsqueeze(1)
    changed = torch.where(hidden, images(seed=9), x)
    with torch.no_grad():
        a, _, valid = model.encode(x, masks.active_b1hw.flatten(1))
        b, _, _ = model.encode(changed, masks.active_b1hw.flatten(1))
        dense = model.encoder.forward_features(x)
    assert torch.equal(a, b)
    assert not torch.allclose(a[:, 1:2], dense[:, 1:2], atol=1e-3)  # not a dense pass


def test_the_loss_reads_only_masked_patches(model):
    masks, _ = uneven_masks()
    x = images()
    preds = []

    def keep(module, args, out):
        out.retain_grad()
        preds.append(out)

    hook = model.decoder.register_forward_hook(keep)
    try:
        out = model(x, masks.active_b1hw)
        out.loss.backward()
    finally:
        hook.remove()
        model.zero_grad(set_to_none=True)
    grad = preds[0].grad.abs().sum(-1)               # (B, N): d loss / d prediction
    masked = masks.masked_bhw.flatten(1)
    assert torch.all(grad[~masked] == 0) and torch.all(grad[masked] > 0)
    target = patchify(x, 8)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    expected = (preds[0].detach() - target).pow(2).mean(-1)[masked].mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_uneven_counts_give_each_image_its_own_result(model):
    masks, counts = uneven_masks()
    x, visible = images(), masks.active_b1hw.flatten(1)
    with torch.no_grad():
        latent, order, valid = model.encode(x, visible)
        pred = model.decoder(latent, order, valid, (4, 4))
        for i, n in enumerate(counts.tolist()):
            one, o1, v1 = model.encode(x[i:i + 1], visible[i:i + 1])
            assert one.shape[1] == 1 + n
            torch.testing.assert_close(latent[i, :1 + n], one[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(pred[i], model.decoder(one, o1, v1, (4, 4))[0],
                                       atol=1e-5, rtol=1e-5)


def test_every_trainable_parameter_gets_a_gradient_with_registers_and_fc_norm():
    """DDP runs without find_unused_parameters: every trainable parameter must be used;
    the parts MAE never calls (fc_norm here) are frozen."""
    torch.manual_seed(0)
    model = MAEModel(ARCH, **TINY, reg_tokens=2, global_pool="avg", fc_norm=True)
    assert model.n_prefix == 3
    masks, _ = uneven_masks()
    model(images(), masks.active_b1hw).loss.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert unused == [] and frozen == {"encoder.fc_norm.weight", "encoder.fc_norm.bias"}


def test_other_input_sizes_resample_the_position_embeddings(model):
    from timm.layers import resample_abs_pos_embed

    x = images(size=48, n=2)
    all_visible = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    with torch.no_grad():
        latent, _, _ = model.encode(x, all_visible.flatten(1))
        enc = model.encoder
        tokens = torch.cat([enc.cls_token.expand(2, -1, -1),
                            enc.patch_embed.proj(x).flatten(2).transpose(1, 2)], 1)
        tokens = tokens + resample_abs_pos_embed(enc.pos_embed, (6, 6), (4, 4), num_prefix_tokens=1)
        torch.testing.assert_close(latent, enc.norm(enc.blocks(tokens)))


def test_export_loads_into_timm_with_only_the_head_missing(model, tmp_path):
    import timm

    from mwm.pretrain.export import export_encoder, load_encoder

    path = tmp_path / "encoder.safetensors"
    export_encoder(model, path, arch=ARCH, extra_metadata={"input_size": 32, "patch_size": 8})
    state = model.encoder_state_dict()
    plain = timm.create_model(ARCH, pretrained=True, num_classes=0, img_size=32, patch_size=8,
                              pretrained_cfg_overlay=dict(file=str(path)))
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in state.items())
    headed = timm.create_model(ARCH, num_classes=3, img_size=32, patch_size=8)
    result = headed.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"]
    assert result.unexpected_keys == []
    # load_encoder builds the export's patch and size; at 64 px it resamples as timm does
    assert torch.equal(load_encoder(path).pos_embed, state["pos_embed"])
    bigger = timm.create_model(ARCH, pretrained=True, num_classes=0, img_size=64, patch_size=8,
                               pretrained_cfg_overlay=dict(file=str(path)))
    torch.testing.assert_close(load_encoder(path, img_size=64).pos_embed, bigger.pos_embed)


# --------------------------------------------------------------------------- mwm pretrain

@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from mwm.data.phantoms import generate_phantoms

    out = tmp_path_factory.mktemp("ph")
    generate_phantoms(out, modality="brain-mri", n=12, size=32, seed=0, workers=1, progress=False)
    return out


def cli(phantoms, out, *extra):
    from mwm.cli import main

    return main(["pretrain", str(phantoms), "--out", str(out), "--regions", str(phantoms / "masks"),
                 "--masking", "region", "--model", ARCH, "--patch-size", "8", "--input-size", "32",
                 "--decoder-width", "32", "--decoder-depth", "1", "--batch-size", "4",
                 "--epochs", "2", "--workers", "0", "--amp", "none", "--no-channels-last",
                 "--checkpoint-every", "1", "--log-every", "1", "--quiet", "--device", "cpu",
                 "--warmup-epochs", "0.5", "--stat-images", "8", *extra])


def log_rows(out):
    with open(out / "train_log.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_mwm_pretrain_a_vit_end_to_end_and_resume_exactly(phantoms, tmp_path):
    from mwm.pretrain.export import read_metadata

    assert cli(phantoms, tmp_path / "full") == 0
    full = log_rows(tmp_path / "full")
    assert len(full) >= 2 and all(0.6 <= float(r["ratio_salient"]) <= 1 for r in full)
    meta = read_metadata(tmp_path / "full" / "encoder.safetensors")
    assert (meta["arch"], meta["patch_size"], meta["input_size"]) == (ARCH, 8, 32)
    assert (tmp_path / "full" / "figures" / "epoch_0002.png").is_file()
    assert cli(phantoms, tmp_path / "cut", "--max-steps", "1") == 0
    assert cli(phantoms, tmp_path / "cut", "--resume", "auto") == 0
    curve = [(r["step"], r["loss"]) for r in full]
    assert [(r["step"], r["loss"]) for r in log_rows(tmp_path / "cut")] == curve


@pytest.mark.parametrize("extra, message", [
    (("--mask-patch", "16"), "--mask-patch 16: a ViT"),
    (("--model", "resnet10t", "--input-size", "64"), "--patch-size is the patch of a ViT"),
    (("--model", "swin_tiny_patch4_window7_224"), "SwinTransformer .* is not supported"),
    (("--input-size", "36"), "input_size 36 is not divisible by the patch size 8"),
])
def test_flags_that_do_not_fit_the_model_are_refused(phantoms, tmp_path, capsys, extra, message):
    assert cli(phantoms, tmp_path, *extra) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_a_cnn_refuses_the_mae_decoder_depth():
    from mwm.data.io import DataError
    from mwm.pretrain.train import pretrain_model

    with pytest.raises(DataError, match="--decoder-depth sets the depth of a ViT"):
        pretrain_model({"model": "resnet10t", "input_size": 64, "decoder_depth": 1})
