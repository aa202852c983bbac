"""M2IB saliency: formula, batch independence, efficiency, every parameter matters."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import vlm_fixtures as vf  # noqa: E402
from mwm.data.io import DataError  # noqa: E402
from mwm.localize.m2ib import (M2IBConfig, _minmax, image_seed, kl_per_element,  # noqa: E402
                               saliency_maps)

FAST = dict(layer=1, steps=3, samples=2, beta=0.01)


@pytest.fixture(scope="module")
def adapter():
    return vf.build_tiny_open_clip(trunk="timm", depth=4, width=64)


@pytest.fixture(scope="module")
def images():
    return vf.bright_square_images()


def test_kl_formula_matches_torch_distributions():
    torch.manual_seed(0)
    alpha = torch.randn(50) * 3
    r = torch.randn(50) * 2
    for sigma in (0.5, 1.0, 2.0):
        lam = torch.sigmoid(alpha)
        q = torch.distributions.Normal(lam * r, (1 - lam) * sigma)
        p = torch.distributions.Normal(torch.zeros(50), torch.full((50,), sigma))
        expected = torch.distributions.kl_divergence(q, p)
        torch.testing.assert_close(kl_per_element(alpha, r, sigma), expected, atol=1e-4, rtol=1e-4)


def test_maps_shape_range_and_frozen_model(adapter, images):
    maps = saliency_maps(adapter, images, "brain tumor", M2IBConfig(**FAST))
    assert [m.shape for m in maps] == [im.shape[1:] for im in images]
    for m in maps:
        assert m.dtype == np.float32 and np.isfinite(m).all()
        assert m.min() == 0.0 and m.max() == 1.0
    assert all(p.grad is None and not p.requires_grad for p in adapter.model.parameters())


def test_batch_equals_one_at_a_time(adapter, images):
    cfg = M2IBConfig(**FAST, batch_size=8)
    prompts = ["brain tumor", ["lesion", "mass"], "liver"]
    batched = saliency_maps(adapter, images, prompts, cfg)
    singles = [saliency_maps(adapter, [im], [p], cfg, keys=[i])[0]
               for i, (im, p) in enumerate(zip(images, prompts))]
    for b, s in zip(batched, singles):
        np.testing.assert_allclose(b, s, atol=1e-4)
    # batch size only groups the work
    in_pairs = saliency_maps(adapter, images, prompts, M2IBConfig(**FAST, batch_size=2))
    for b, s in zip(batched, in_pairs):
        np.testing.assert_allclose(b, s, atol=1e-4)
    # a different order with the same keys gives the same maps
    order = [2, 0, 1]
    shuffled = saliency_maps(adapter, [images[i] for i in order], [prompts[i] for i in order], cfg,
                             keys=order)
    for j, i in enumerate(order):
        np.testing.assert_allclose(shuffled[j], batched[i], atol=1e-4)


def test_batch_independence_is_exact_in_float64(images):
    a = vf.build_tiny_open_clip(trunk="native", depth=3, seed=2)
    a.model.double()
    cfg = M2IBConfig(layer=1, steps=3, samples=2)
    batched = saliency_maps(a, images, "tumor", cfg)
    singles = [saliency_maps(a, [im], "tumor", cfg, keys=[i])[0] for i, im in enumerate(images)]
    for b, s in zip(batched, singles):
        np.testing.assert_allclose(b, s, atol=1e-6)


def test_seed_reproducible_and_matters(adapter, images):
    cfg = M2IBConfig(**FAST)
    first = saliency_maps(adapter, images[:2], "tumor", cfg)
    again = saliency_maps(adapter, images[:2], "tumor", cfg)
    for x, y in zip(first, again):
        np.testing.assert_array_equal(x, y)
    other = saliency_maps(adapter, images[:2], "tumor", M2IBConfig(**{**FAST, "seed": 1}))
    assert np.abs(first[0] - other[0]).max() > 1e-3
    assert image_seed(0, "a") != image_seed(0, "b") != image_seed(1, "a")


@pytest.mark.parametrize("change", [
    {"beta": 1.0}, {"layer": 2}, {"noise_scale": 0.5}, {"steps": 5}, {"samples": 4},
    {"lr": 0.3}, {"alpha_init": 3.0}, {"standardize": False}])
def test_every_parameter_changes_the_map(adapter, images, change):
    base = saliency_maps(adapter, images[:1], "brain tumor", M2IBConfig(**FAST))[0]
    changed = saliency_maps(adapter, images[:1], "brain tumor", M2IBConfig(**{**FAST, **change}))[0]
    assert np.abs(base - changed).max() > 1e-3, change


def test_prompts_encoded_once_and_early_blocks_run_once(images):
    a = vf.build_tiny_open_clip(trunk="timm", depth=4, seed=1)
    calls = []
    original = a.encode_text
    a.encode_text = lambda prompts: (calls.append(list(prompts)), original(prompts))[1]
    rows = {i: 0 for i in range(a.depth)}
    hooks = [blk.register_forward_hook(lambda m, inp, out, i=i: rows.__setitem__(i, rows[i] + out.shape[0]))
             for i, blk in enumerate(a.blocks())]
    cfg = M2IBConfig(layer=1, steps=3, samples=2, batch_size=2)
    n = len(images)
    saliency_maps(a, images, ["tumor", ["tumor", "mass"], "mass"], cfg)
    saliency_maps(a, images[:1], ["mass"], cfg)
    for h in hooks:
        h.remove()
    assert calls == [["tumor", "mass"]]
    total = n + 1
    assert rows[0] == rows[1] == total                            # blocks <= layer: once per image
    assert rows[2] == rows[3] == total * cfg.steps * cfg.samples  # blocks after: per step and draw


def test_layer_validation_and_config_roundtrip(adapter, images):
    with pytest.raises(DataError, match="out of range"):
        saliency_maps(adapter, images[:1], "tumor", M2IBConfig(layer=4))
    with pytest.raises(DataError, match="out of range"):
        saliency_maps(adapter, images[:1], "tumor", M2IBConfig(layer=-1))
    for bad in ({"steps": 0}, {"samples": 0}, {"noise_scale": 0.0}, {"beta": -1.0}, {"batch_size": 0}):
        with pytest.raises(DataError):
            M2IBConfig(**bad).validate()
    cfg = M2IBConfig(layer=3, beta=0.5, noise_scale=2.0, seed=7, amp=True)
    assert M2IBConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(DataError, match="unknown"):
        M2IBConfig.from_dict({"var": 1.0})
    with pytest.raises(DataError, match="prompts"):
        saliency_maps(adapter, images, ["a", "b"], M2IBConfig(**FAST))
    assert saliency_maps(adapter, [], [], M2IBConfig(**FAST)) == []


def test_constant_map_is_zero_not_nan():
    assert (_minmax(np.full((5, 7), 3.5)) == 0).all()
    assert (_minmax(np.zeros((4, 4))) == 0).all()
    out = _minmax(np.array([[1.0, np.nan], [3.0, 2.0]]))
    assert np.isfinite(out).all() and out.max() == 1.0


def test_constant_image_gives_finite_map(adapter):
    maps = saliency_maps(adapter, [np.zeros((3, 30, 30), np.float32)], "tumor", M2IBConfig(**FAST))
    assert np.isfinite(maps[0]).all() and 0 <= maps[0].min() and maps[0].max() <= 1


def test_hf_clip_and_bf16_autocast(images):
    a = vf.build_tiny_hf_clip()
    maps = saliency_maps(a, images, "tumor", M2IBConfig(layer=2, steps=2, samples=2))
    assert all(np.isfinite(m).all() and m.max() == 1.0 for m in maps)
    b = vf.build_tiny_open_clip(trunk="timm", depth=3, seed=4)
    cfg = M2IBConfig(layer=1, steps=2, samples=2)
    fp32 = saliency_maps(b, images[:1], "tumor", cfg)[0]
    bf16 = saliency_maps(b, images[:1], "tumor", M2IBConfig(**{**cfg.to_dict(), "amp": True}))[0]
    assert np.isfinite(bf16).all() and bf16.max() == 1.0
    assert np.corrcoef(fp32.ravel(), bf16.ravel())[0, 1] > 0.5


def test_tune_grid_layers_for_deep_and_shallow_models():
    from mwm.localize.tune import default_grid

    assert default_grid(12)["layer"] == (7, 8, 9)        # the published search
    assert default_grid(3)["layer"] == (1, 2, (1, 2))    # shallow: the last two, and both
    assert default_grid(1)["layer"] == (0,)


def test_tune_scores_extra_postprocessing_on_the_same_maps(tmp_path):
    import json

    from PIL import Image

    from mwm.data.layouts import Sample, SliceRef
    from mwm.localize.postprocess import PostprocessConfig
    from mwm.localize.tune import tune

    truth = np.zeros((16, 16), np.uint8)
    truth[4:8, 4:8] = 255
    Image.fromarray(truth).save(tmp_path / "m.png")
    Image.fromarray(np.full((16, 16), 100, np.uint8)).save(tmp_path / "i.png")
    sample = Sample(SliceRef(tmp_path / "i.png"), SliceRef(tmp_path / "m.png"), prompt="x")
    calls = []

    def saliency_fn(images, prompts, names, config):
        calls.append(config.beta)
        m = np.zeros((16, 16), np.float32)
        m[3:9, 3:9] = 0.4          # a halo that a 0.5 threshold drops
        m[4:8, 4:8] = 1.0
        return [m]

    best, rows = tune([sample], saliency_fn, M2IBConfig(), PostprocessConfig(method="threshold",
                      threshold=0.3), tmp_path / "t", grid={"beta": (1.0, 2.0)},
                      posts=[PostprocessConfig(method="threshold", threshold=0.5)],
                      progress=False)
    assert calls == [1.0, 2.0]                          # maps computed once per grid point
    assert [r["postprocess"] for r in rows] == [0, 1, 0, 1]
    assert rows[1]["dice_mean"] == 1.0 and rows[0]["dice_mean"] < 1.0
    saved = json.loads((tmp_path / "t" / "tune_best.json").read_text())
    assert saved["postprocess"]["threshold"] == 0.5 and best.beta == 1.0


def test_top_k_can_rank_components_by_saliency_mass():
    # postprocessing of M2IB maps: a small, very salient blob against a large faint one
    from mwm.localize.postprocess import PostprocessConfig, postprocess

    m = np.zeros((20, 20))
    m[1:7, 1:7] = 0.35            # 36 px, mass 12.6
    m[12:16, 12:16] = 1.0         # 16 px, mass 16
    by_area = postprocess(m, method="threshold", threshold=0.3, top_k=1)
    by_mass = postprocess(m, method="threshold", threshold=0.3, top_k=1, rank="mass")
    assert by_area[2, 2] and not by_area[13, 13]
    assert by_mass[13, 13] and not by_mass[2, 2]
    assert PostprocessConfig.from_dict(PostprocessConfig(rank="mass").to_dict()).rank == "mass"
    with pytest.raises(ValueError, match="rank"):
        PostprocessConfig(rank="peak")


# --------------------------------------------------------------------------- shifts, smooth

def test_patch_offsets_and_shift_image():
    from mwm.localize.m2ib import patch_offsets, shift_image

    assert patch_offsets(16, 1) == [0]
    assert patch_offsets(16, 3) == [-5, 0, 5]
    assert patch_offsets(4, 3) == [-1, 0, 1]
    assert patch_offsets(16, 2) == [-4, 4]
    x = torch.arange(16.0).view(1, 4, 4)
    moved = shift_image(x, 1, -2, -1.0)
    assert moved[0, 0].tolist() == [-1, -1, -1, -1]            # the vacated top row
    assert moved[0, 1].tolist() == [2, 3, -1, -1]               # row 0 moved down, 2 left
    back = shift_image(moved, -1, 2, 0.0)
    assert torch.equal(back[0, :3, 2:], x[0, :3, 2:])           # what stayed inside returns


def test_gaussian_blur_keeps_constants_and_mass():
    from mwm.localize.m2ib import gaussian_blur

    flat = torch.full((1, 20, 20), 0.7)
    torch.testing.assert_close(gaussian_blur(flat, 2.0), flat)
    spike = torch.zeros(1, 21, 21)
    spike[0, 10, 10] = 1.0
    blurred = gaussian_blur(spike, 1.5)
    assert abs(float(blurred.sum()) - 1.0) < 1e-5 and blurred[0, 10, 10] < 0.1
    assert torch.allclose(blurred[0], blurred[0].T)             # isotropic


def test_shifts_and_smooth_batch_equals_one_at_a_time(adapter, images):
    cfg = M2IBConfig(**FAST, shifts=2, smooth=0.5, batch_size=8)
    together = saliency_maps(adapter, images, "brain tumor", cfg, keys=["a", "b", "c"])
    alone = [saliency_maps(adapter, [im], "brain tumor", M2IBConfig(**{**cfg.to_dict(),
                                                                       "batch_size": 1}),
                           keys=[k])[0] for im, k in zip(images, "abc")]
    for t, a, im in zip(together, alone, images):
        assert t.shape == im.shape[1:] and t.min() == 0.0 and t.max() == 1.0
        np.testing.assert_allclose(t, a, atol=1e-5)


@pytest.mark.parametrize("change", [{"shifts": 2}, {"shifts": 3}, {"smooth": 0.5}])
def test_shifts_and_smooth_change_the_map(adapter, images, change):
    base = saliency_maps(adapter, images[:1], "brain tumor", M2IBConfig(**FAST))[0]
    changed = saliency_maps(adapter, images[:1], "brain tumor", M2IBConfig(**{**FAST, **change}))[0]
    assert np.abs(base - changed).max() > 1e-3, change


def test_shift_averaging_places_a_point_at_its_pixel(monkeypatch):
    # With an "information" that is the mean intensity of each 3-px patch, one grid puts
    # a bright pixel at its patch's centre; the average over the 3 x 3 shifted grids,
    # each shifted back, peaks at the pixel itself, wherever it sits in its patch.
    from types import SimpleNamespace

    from mwm.localize import m2ib

    def patch_means(adapter, pixels, text, generators, config):
        p = adapter.patch_size
        return F.avg_pool2d(pixels[:, :1], p)[:, 0]

    monkeypatch.setattr(m2ib, "information_maps", patch_means)
    fake = SimpleNamespace(image_size=15, patch_size=3, mean=(0.0,) * 3, std=(1.0,) * 3)
    cfg = M2IBConfig(shifts=3)
    for y, x in [(6, 6), (7, 7), (8, 6), (6, 8), (7, 8)]:
        pixels = torch.zeros(1, 3, 15, 15)
        pixels[0, :, y, x] = 1.0
        averaged = m2ib.shifted_information(fake, pixels, None, [None], cfg)[0]
        assert np.unravel_index(int(averaged.argmax()), averaged.shape) == (y, x)
        single = F.interpolate(patch_means(fake, pixels, None, None, None)[:, None], size=(15, 15),
                               mode="bilinear", align_corners=False)[0, 0]
        centre = (y // 3 * 3 + 1, x // 3 * 3 + 1)
        assert np.unravel_index(int(single.argmax()), single.shape) == centre


def test_constant_image_with_shifts_is_zero(adapter):
    maps = saliency_maps(adapter, [np.zeros((3, 30, 30), np.float32)], "tumor",
                         M2IBConfig(**FAST, shifts=2, smooth=0.3))
    assert np.isfinite(maps[0]).all()


@pytest.mark.parametrize("bad", [{"shifts": 0}, {"shifts": 1.5}, {"smooth": -0.1},
                                 {"smooth": float("nan")}])
def test_bad_shifts_and_smooth(bad):
    with pytest.raises(DataError, match=next(iter(bad))):
        M2IBConfig(**bad).validate()


def test_several_layers_average_the_single_layer_maps(adapter, images):
    from mwm.localize.m2ib import parse_layers as layers_arg

    one = {k: v for k, v in FAST.items() if k != "layer"}
    maps = {layer: saliency_maps(adapter, images, "tumor", M2IBConfig(layer=layer, **one))
            for layer in (1, 3)}
    both = saliency_maps(adapter, images, "tumor", M2IBConfig(layer=[1, 3], **one))
    for i, combined in enumerate(both):
        expected = _minmax((maps[1][i] + maps[3][i]) / 2)
        np.testing.assert_allclose(combined, expected, atol=1e-6)
        assert combined.shape == images[i].shape[1:]
    assert not np.allclose(both[0], maps[1][0], atol=1e-3)
    # one spelling per setting (the fingerprint of stale maps depends on it)
    cfg = M2IBConfig(layer=[1, 3], **one)
    assert cfg.layer == (1, 3) and cfg.layers == (1, 3)
    assert M2IBConfig(layer=[2]).layer == 2 and M2IBConfig(layer=2).layers == (2,)
    assert M2IBConfig.from_dict(cfg.to_dict()) == cfg
    for bad in ([], [1, 1], [1, 4], [1, "2"]):
        with pytest.raises(DataError, match="layer"):
            saliency_maps(adapter, images[:1], "tumor", M2IBConfig(layer=bad, **one))
    assert layers_arg("7") == 7 and layers_arg("1,2") == (1, 2)
    with pytest.raises(Exception, match="indices"):
        layers_arg("1;2")
