"""Contrastive CLIP training: losses, data reading, saving in open_clip's format, resume."""

from __future__ import annotations

import csv
import math
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from mwm.clip import (ClipTrainConfig, ModelLoadError, dhn_nce_loss, infonce_loss,  # noqa: E402
                      load_clip, same_caption_matrix)
from mwm.clip import train_clip as _train_clip  # noqa: E402
from mwm.clip.data import augment_batch, read_pairs, swap_sides  # noqa: E402
from mwm.clip.model import build_model  # noqa: E402
from mwm.clip.train import CHECKPOINT_NAME, CONFIG_NAME, LOG_NAME, WEIGHTS_NAME  # noqa: E402
from mwm.engine import Schedule  # noqa: E402
from mwm.data.io import DataError  # noqa: E402

TINY = dict(model="scratch-micro", batch_size=8, workers=1, quiet=True, seed=0)


def train_clip(pairs, out, **settings):
    return _train_clip(ClipTrainConfig(pairs=str(pairs), out=str(out), **settings))


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from mwm.data.phantoms import generate_phantoms

    out = tmp_path_factory.mktemp("phantoms")
    generate_phantoms(out, modality="brain-mri", n=24, size=64, seed=0, workers=1,
                      progress=False)
    return out


def _unit(x):
    return torch.nn.functional.normalize(torch.as_tensor(x, dtype=torch.float32), dim=-1)


# --------------------------------------------------------------------------- losses

def test_dhn_nce_matches_its_formula_by_hand():
    # 3 pairs on a circle: similarities are plain cosines of angle differences.
    angles = torch.tensor([0.0, 0.5, 2.0])
    img = torch.stack([angles.cos(), angles.sin()], 1)
    angles_t = angles + torch.tensor([0.1, -0.2, 0.3])
    txt = torch.stack([angles_t.cos(), angles_t.sin()], 1)
    tau, b1, b2 = 0.5, 0.7, 0.3
    s = (img @ txt.T / tau).double().numpy()

    def direction(m, beta):
        total = 0.0
        for i in range(3):
            negs = [j for j in range(3) if j != i]
            z = sum(math.exp(beta * m[i, k]) for k in negs)
            den = sum(len(negs) * math.exp(beta * m[i, j]) / z * math.exp(m[i, j]) for j in negs)
            total += -math.log(math.exp(m[i, i]) / den)
        return total / 3

    expected = direction(s, b1) + direction(s.T, b2)
    got = dhn_nce_loss(img, txt, tau, b1, b2)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_dhn_nce_two_pairs_reduces_to_difference_of_similarities():
    # With one negative per row the weight is exactly 1: loss = sum_i (s_ij - s_ii) both ways.
    img = _unit([[1.0, 0.0], [0.6, 0.8]])
    txt = _unit([[0.8, 0.6], [0.0, 1.0]])
    tau = 0.25
    s = (img @ txt.T / tau)
    expected = ((s[0, 1] - s[0, 0]) + (s[1, 0] - s[1, 1])) / 2 \
        + ((s[1, 0] - s[0, 0]) + (s[0, 1] - s[1, 1])) / 2
    for beta in (0.0, 0.15, 2.0):
        assert float(dhn_nce_loss(img, txt, tau, beta, beta)) == pytest.approx(float(expected),
                                                                               rel=1e-6)


def test_dhn_nce_beta_zero_is_the_decoupled_loss():
    torch.manual_seed(0)
    img, txt = _unit(torch.randn(5, 8)), _unit(torch.randn(5, 8))
    s = img @ txt.T / 0.1
    off = ~torch.eye(5, dtype=torch.bool)
    dcl = lambda m: (torch.logsumexp(m.masked_fill(~off, -1e9), 1) - m.diagonal()).mean()  # noqa: E731
    assert float(dhn_nce_loss(img, txt, 0.1, 0.0, 0.0)) == pytest.approx(
        float(dcl(s) + dcl(s.T)), rel=1e-5)


def test_infonce_matches_cross_entropy():
    torch.manual_seed(1)
    img, txt = _unit(torch.randn(4, 6)), _unit(torch.randn(4, 6))
    scale = torch.tensor(math.log(10.0))
    logits = 10.0 * img @ txt.T
    target = torch.arange(4)
    expected = (torch.nn.functional.cross_entropy(logits, target)
                + torch.nn.functional.cross_entropy(logits.T, target)) / 2
    assert float(infonce_loss(img, txt, scale)) == pytest.approx(float(expected), rel=1e-6)


def test_identical_captions_are_not_negatives():
    captions = ["No lesion.", "glioma left", "no  lesion.", "meningioma"]
    same = same_caption_matrix(captions)
    assert same[0, 2] and same[2, 0] and not same[0, 1]
    torch.manual_seed(2)
    img, txt = _unit(torch.randn(4, 6)), _unit(torch.randn(4, 6))
    scale = torch.tensor(2.0)
    logits = scale.exp() * img @ txt.T
    idx = torch.arange(4)
    rows = [-(logits[i, i] - torch.logsumexp(logits[i][~same[i] | (idx == i)], 0))
            for i in range(4)]
    cols = [-(logits[i, i] - torch.logsumexp(logits[:, i][~same[:, i] | (idx == i)], 0))
            for i in range(4)]
    expected = (torch.stack(rows).mean() + torch.stack(cols).mean()) / 2
    assert float(infonce_loss(img, txt, scale, same)) == pytest.approx(float(expected), rel=1e-6)
    # moving text 2 (same caption as pair 0) does not change image 0's InfoNCE term
    moved = txt.clone()
    moved[2] = _unit(torch.randn(6))
    term0 = lambda t: torch.nn.functional.cross_entropy(  # noqa: E731
        (scale.exp() * img @ t.T)[:1].masked_fill(same[:1] & (idx != 0), float("-inf")),
        torch.tensor([0]))
    assert float(term0(txt)) == pytest.approx(float(term0(moved)))
    # all captions identical: no negatives at all -> zero loss, finite gradient
    x = _unit(torch.randn(3, 4)).requires_grad_()
    loss = dhn_nce_loss(x, _unit(torch.randn(3, 4)), 0.1, same=same_caption_matrix(["a"] * 3))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(x.grad).all()
    loss = infonce_loss(x, _unit(torch.randn(3, 4)), 1.0, same_caption_matrix(["a"] * 3))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_dhn_nce_ignores_same_caption_pairs_exactly():
    torch.manual_seed(3)
    img, txt = _unit(torch.randn(4, 6)), _unit(torch.randn(4, 6))
    same = same_caption_matrix(["a", "b", "a", "c"])
    base = dhn_nce_loss(img, txt, 0.2, 0.5, 0.5, same)
    # Rows 0 and 2 each lose one negative; moving text 2 must change row 2's positive
    # and others' negatives but never row 0's image->text term. Check by brute force:
    s = img @ txt.T / 0.2
    neg = ~(torch.eye(4, dtype=torch.bool) | same)

    def direction(m, n, beta):
        out = []
        for i in range(4):
            j = n[i]
            w = j.sum() * torch.softmax(beta * m[i][j], 0)
            out.append(torch.log((w * m[i][j].exp()).sum()) - m[i, i])
        return torch.stack(out).mean()

    expected = direction(s, neg, 0.5) + direction(s.T, neg.T, 0.5)
    assert float(base) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("loss", ["infonce", "dhn-nce"])
def test_losses_decrease_on_a_tiny_batch(loss):
    torch.manual_seed(0)
    net, tok, *_ = build_model("scratch-micro", seed=0)
    captions = ["glioma in the left frontal lobe", "meningioma along the right convexity",
                "no lesion", "pituitary adenoma at the midline", "no lesion"]
    images = torch.rand(5, 3, 64, 64)
    tokens = tok(captions)
    same = same_caption_matrix(captions)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    from mwm.clip.losses import contrastive_loss

    values = []
    for _ in range(8):
        v = contrastive_loss(loss, net.encode_image(images, normalize=True),
                             net.encode_text(tokens, normalize=True), net.logit_scale, same)
        assert torch.isfinite(v)
        opt.zero_grad()
        v.backward()
        opt.step()
        values.append(float(v))
    assert values[-1] < values[0] - 0.05


# --------------------------------------------------------------------------- data

def test_swap_sides_and_flip_augmentation():
    assert swap_sides("Mass in the left lobe; Right side clear. LEFT") == \
        "Mass in the right lobe; Left side clear. RIGHT"
    assert swap_sides("leftover brightness") == "leftover brightness"
    img = torch.zeros(2, 1, 16, 16)
    img[:, :, :, :4] = 1.0  # bright band on the image left
    gen = torch.Generator().manual_seed(0)
    out, caps = augment_batch(img, ["left", "left"], gen, min_scale=1.0, hflip=1.0, jitter=0.0)
    assert caps == ["right", "right"]
    assert out[:, :, :, -4:].mean() > 0.9 and out[:, :, :, :4].mean() < 0.1


def test_read_pairs_uses_only_the_train_split(phantoms):
    pairs = read_pairs(phantoms)
    with open(phantoms / "labels.csv", newline="") as handle:
        train = [r for r in csv.DictReader(handle) if r["split"] == "train"]
    assert len(pairs) == len(train) > 0
    assert all(p.prompt == "brain tumor" and p.caption for p in pairs)


def test_missing_caption_file_and_image_are_clear_errors(phantoms, tmp_path):
    folder = tmp_path / "no_captions"
    folder.mkdir()
    with pytest.raises(DataError, match="captions.csv"):
        read_pairs(folder)
    bad = tmp_path / "pairs.csv"
    bad.write_text("image,caption\nimages/missing.png,a caption\n")
    with pytest.raises(DataError, match=r"missing\.png"):
        train_clip(bad, tmp_path / "out", epochs=1, **TINY)
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("image,text\na.png,b\n")
    with pytest.raises(DataError, match="caption"):
        read_pairs(nocol)
    with pytest.raises(DataError, match="not_there"):
        read_pairs(tmp_path / "not_there.csv")


def test_hub_model_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="huggingface-cli download|--model DIR"):
        build_model("hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224")


def test_lr_schedule():
    lr_at = Schedule(1.0, 100, 10, shift=1, end=100).lr_at  # CLIP's: peak at the last warm-up step
    assert lr_at(0) == pytest.approx(0.1)
    assert lr_at(9) == pytest.approx(1.0)
    assert lr_at(10) == pytest.approx(1.0)
    assert lr_at(99) < 0.01


# --------------------------------------------------------------------------- training

def test_tiny_training_run_loads_with_open_clip_and_resumes(phantoms, tmp_path):
    out = tmp_path / "clip"
    summary = train_clip(phantoms, out, epochs=2, loss="dhn-nce", **TINY)
    for name in (CONFIG_NAME, WEIGHTS_NAME, LOG_NAME, CHECKPOINT_NAME):
        assert (out / name).is_file(), name
    assert summary.n_pairs == len(read_pairs(phantoms)) and summary.start_epoch == 0
    assert all(np.isfinite(r["loss"]) for r in summary.log)
    with open(out / LOG_NAME, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert set(rows[0]) >= {"epoch", "loss", "lr", "seconds"}

    # open_clip loads the folder on its own (local-dir:) with identical outputs
    model, preprocess_train, preprocess = open_clip.create_model_and_transforms(
        "local-dir:" + str(out))
    model.eval()
    ours, tokenizer, pre_cfg = load_clip(out)
    assert pre_cfg["size"] == [64, 64]
    x = torch.rand(2, 3, 64, 64)
    tokens = open_clip.get_tokenizer("local-dir:" + str(out))(["brain tumor", "no lesion"])
    with torch.no_grad():
        a_img, a_txt = model.encode_image(x), model.encode_text(tokens)
        b_img, b_txt = ours.encode_image(x), ours.encode_text(tokenizer(["brain tumor", "no lesion"]))
    state = torch.load(out / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    ref = build_model("scratch-micro")[0]
    ref.load_state_dict(state["model"])
    ref.eval()
    with torch.no_grad():
        c_img = ref.encode_image(x)
    assert torch.equal(a_img, b_img) and torch.equal(a_txt, b_txt) and torch.equal(a_img, c_img)

    # same call again: already done, nothing to train
    again = train_clip(phantoms, out, epochs=2, loss="dhn-nce", **TINY)
    assert again.steps == 0 and again.start_epoch == 2

    # interrupted run (time limit after epoch 1) + resume == uninterrupted run
    part = tmp_path / "part"
    first = train_clip(phantoms, part, epochs=2, loss="dhn-nce", time_limit=0.0, **TINY)
    assert first.stopped_early and [r["epoch"] for r in first.log] == [1]
    second = train_clip(phantoms, part, epochs=2, loss="dhn-nce", **TINY)
    assert second.start_epoch == 1 and [r["epoch"] for r in second.log] == [1, 2]
    from safetensors.torch import load_file

    full_w, part_w = load_file(out / WEIGHTS_NAME), load_file(part / WEIGHTS_NAME)
    assert full_w.keys() == part_w.keys()
    assert all(torch.equal(full_w[k], part_w[k]) for k in full_w)

    # other settings in the same folder: refused with a clear message
    with pytest.raises(DataError, match="other settings"):
        train_clip(phantoms, part, epochs=3, loss="infonce", **TINY)


def test_scratch_arch_options_and_csv_pairs(phantoms, tmp_path):
    # a plain CSV of pairs (paths relative to the CSV), no split column: all rows used
    rows = list(csv.DictReader(open(phantoms / "captions.csv", newline="")))[:10]
    sub = tmp_path / "data"
    (sub / "img").mkdir(parents=True)
    with open(sub / "pairs.csv", "w", newline="") as handle:
        w = csv.writer(handle)
        w.writerow(["image", "caption"])
        for r in rows:
            name = os.path.basename(r["image"])
            shutil.copy(phantoms / r["image"], sub / "img" / name)
            w.writerow([f"img/{name}", r["caption"]])
    s = train_clip(sub / "pairs.csv", tmp_path / "m", epochs=1, input_size=32,
                   arch={"patch_size": 16}, loss="infonce", amp="none", **TINY)
    assert s.n_pairs == 10 and s.input_size == 32
    model = open_clip.create_model("local-dir:" + str(tmp_path / "m"))
    assert model.visual.patch_size == (16, 16) and model.visual.image_size == (32, 32)


def test_negative_groups_follow_labels():
    from mwm.clip.data import CaptionPair
    from mwm.clip.batches import same_group

    data = [CaptionPair(f"{i}.png", c, lab) for i, (c, lab) in enumerate(
        [("normal brain", "none"), ("unremarkable brain", "none"), ("glioma left", "glioma"),
         ("glioma right", "glioma"), ("meningioma", "meningioma"), ("no label", None)])]
    idx = list(range(len(data)))
    normal = same_group(data, idx, "normal", "cpu")
    label = same_group(data, idx, "label", "cpu")
    # two lesion-free images are never negatives, whatever their wording
    assert normal[0, 1] and normal[1, 0] and label[0, 1]
    # findings of one class are negatives under "normal", not under "label"
    assert not normal[2, 3] and label[2, 3] and label[3, 2]
    assert not label[2, 4] and not label[0, 2]
    # a pair without a label is only grouped with itself
    assert not normal[5, 0] and not label[5, 5 - 1] and label[5, 5]
    with pytest.raises(ValueError, match="negatives"):
        train_clip("x", "y", negatives="nope")


def test_scratch_pool_and_position_options():
    net = build_model("scratch-micro", arch={"pool_type": "avg",
                                             "pos_embed_type": "sin_cos_2d"})[0]
    assert net.visual.pool_type == "avg"
    assert not net.visual.positional_embedding.requires_grad
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("scratch-micro", arch={"pooling": "avg"})


def test_token_max_embedding_is_the_channel_maximum_of_projected_tokens():
    from mwm.clip.model import encode_image_and_token_max

    torch.manual_seed(0)
    net = build_model("scratch-micro", arch={"pool_type": "avg"})[0].eval()
    pixels_bchw = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        emb_bd, token_max_bd = encode_image_and_token_max(net, pixels_bchw)
        v = net.visual
        tokens_bnc = v.ln_post(v.transformer(v._embeds(pixels_bchw)))[:, 1:]
        expected_bd = torch.nn.functional.normalize((tokens_bnc @ v.proj).amax(dim=1), dim=-1)
        assert torch.allclose(emb_bd, net.encode_image(pixels_bchw, normalize=True), atol=1e-5)
    assert torch.allclose(token_max_bd, expected_bd, atol=1e-5)
    assert not torch.allclose(token_max_bd, emb_bd, atol=1e-2)
    assert net.visual.output_tokens is False  # the model is left as it was

    class TimmLike(torch.nn.Module):
        visual = torch.nn.Identity()

    with pytest.raises(ValueError, match="VisionTransformer"):
        encode_image_and_token_max(TimmLike(), pixels_bchw)


def test_token_max_loss_changes_training_and_is_recorded(phantoms, tmp_path):
    base = train_clip(phantoms, tmp_path / "a", epochs=1, amp="none", token_max_weight=0.0,
                      **TINY)
    extra = train_clip(phantoms, tmp_path / "b", epochs=1, amp="none", **TINY)  # scratch: 1
    # the same first batch scored by two losses: the token-max term adds a positive loss
    assert extra.final_loss > base.final_loss
    saved = (tmp_path / "b" / CONFIG_NAME).read_text()
    assert '"token_max_weight": 1.0' in saved
    assert "token_max_weight" not in (tmp_path / "a" / CONFIG_NAME).read_text()
    model = open_clip.create_model("local-dir:" + str(tmp_path / "b"))  # a plain open_clip model
    assert model.visual.output_tokens is False
    _check_m2ib_recommendation(tmp_path)
    with pytest.raises(ValueError, match="token.max.weight"):
        train_clip(phantoms, tmp_path / "c", token_max_weight=-1.0, **TINY)


def _check_m2ib_recommendation(tmp_path):
    """The folders carry the M2IB settings `mwm localize` uses when it is not given them:
    the last block (scratch-micro has 2), or the last two with the token-max loss."""
    import json

    from mwm.localize.m2ib import M2IBConfig
    from mwm.localize.vlm import load_vlm

    advice = {name: json.loads((tmp_path / name / "m2ib_recommended.json").read_text())
              for name in ("a", "b")}
    assert {k: advice["a"][k] for k in ("layer", "beta", "noise_scale")} == \
        {"layer": 1, "beta": 1.0, "noise_scale": 0.5}
    assert advice["b"]["layer"] == [0, 1]
    adapter = load_vlm(str(tmp_path / "b"))
    resolved = M2IBConfig(beta=2.0).for_model(adapter)
    assert (resolved.layer, resolved.noise_scale, resolved.beta) == ((0, 1), 0.5, 2.0)
    # a folder saved without advice (a fine-tuned model) loses an earlier run's advice
    net, _, cfg, pre, _ = build_model("scratch-micro")
    from mwm.clip.model import save_model_folder

    save_model_folder(tmp_path / "a", net, cfg, pre)
    assert not (tmp_path / "a" / "m2ib_recommended.json").exists()
