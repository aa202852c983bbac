"""VLM adapters: piecewise image encoding, text cache, exact geometry, offline loading."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import vlm_fixtures as vf  # noqa: E402
from mwm.data.io import DataError  # noqa: E402
from mwm.localize.vlm import (DEFAULT_MODEL, ModelUnavailableError,  # noqa: E402
                              load_vlm, wrap_hf_clip, wrap_open_clip)


@pytest.fixture(scope="module")
def timm_adapter():
    return vf.build_tiny_open_clip(trunk="timm")


@pytest.fixture(scope="module")
def adapters(timm_adapter, tmp_path_factory):
    work = tmp_path_factory.mktemp("vlm")
    return {
        "open_clip-timm": timm_adapter,
        "open_clip-native": vf.build_tiny_open_clip(trunk="native"),
        "open_clip-timm-bert": vf.build_tiny_open_clip(trunk="timm", text="bert", workdir=work),
        "hf-clip": vf.build_tiny_hf_clip(workdir=work),
    }


@pytest.mark.parametrize("kind", ["open_clip-timm", "open_clip-native", "open_clip-timm-bert", "hf-clip"])
def test_piecewise_encoder_equals_model(adapters, kind):
    a = adapters[kind]
    torch.manual_seed(1)
    x = torch.randn(3, 3, a.image_size, a.image_size)
    with torch.no_grad():
        ours = a.encode_image(x)
        ref = a.reference_image_features(x)
        tokens = a.embed(x)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    gh, gw = a.grid
    assert tokens.shape[:2] == (3, a.num_prefix_tokens + gh * gw)
    # splitting the block range anywhere gives the same result
    with torch.no_grad():
        mid = a.run_blocks(a.run_blocks(tokens, 0, 2), 2, a.depth)
        torch.testing.assert_close(a.pool(mid), ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert all(not p.requires_grad for p in a.model.parameters())
    assert not a.model.training
    text = a.encode_text(["brain tumor", "a lesion in the liver"])
    assert text.shape == (2, ours.shape[1])
    assert torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_prompt_cache_and_ensemble(timm_adapter):
    a = vf.build_tiny_open_clip(trunk="native", seed=3)
    calls = []
    original = a.encode_text

    def counting(prompts):
        calls.append(list(prompts))
        return original(prompts)

    a.encode_text = counting
    out = a.embed_prompts(["tumor", "tumor", ["tumor", "liver lesion"]])
    assert calls == [["tumor", "liver lesion"]]
    a.embed_prompts(["liver lesion", ["tumor"]])
    assert len(calls) == 1  # all cached
    single = original(["tumor", "liver lesion"])
    expected = torch.nn.functional.normalize(single.mean(0), dim=0)
    torch.testing.assert_close(out[2], expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out[0], single[0], atol=1e-6, rtol=1e-6)
    with pytest.raises(DataError):
        a.embed_prompts([""])
    with pytest.raises(DataError):
        a.embed_prompts([[]])


@pytest.fixture(scope="module")
def grid_adapter():
    return vf.build_tiny_open_clip(trunk="native", image_size=96, patch_size=8, depth=1)


@pytest.mark.parametrize("shape", [(40, 100), (100, 40), (37, 83), (64, 64), (300, 120)])
def test_grid_map_maps_back_to_pixel_rectangle(grid_adapter, shape):
    """Grid cells set to 1 come back as exactly the original pixels they cover.

    Bilinear upsampling crosses 0.5 exactly on the cell boundaries, so along the middle
    row/column the rectangle is exact to the pixel; only its corners are rounded.
    """
    a = grid_adapter
    h, w = shape
    x, geo = a.prepare(np.zeros((3, h, w), np.float32))
    assert x.shape == (3, a.image_size, a.image_size)
    assert geo.side == max(h, w)
    assert (geo.pad_top, geo.pad_left) == ((geo.side - h) // 2, (geo.side - w) // 2)
    g = a.grid[0]
    assert g == 12
    cell = geo.side / g
    r_first = int(np.ceil(geo.pad_top / cell))
    c_first = int(np.ceil(geo.pad_left / cell))
    rows, cols = range(r_first, r_first + 3), range(c_first + 1, c_first + 4)
    assert rows.stop * cell <= geo.pad_top + h and cols.stop * cell <= geo.pad_left + w
    grid_map = np.zeros((g, g), np.float32)
    grid_map[rows.start:rows.stop, cols.start:cols.stop] = 1.0
    out = a.to_image(grid_map, geo)
    assert out.shape == (h, w) and out.dtype == np.float32
    # pixel j is inside iff its centre j + 0.5 lies between the cell bounds (original coords)
    top, bottom = rows.start * cell - geo.pad_top, rows.stop * cell - geo.pad_top
    left, right = cols.start * cell - geo.pad_left, cols.stop * cell - geo.pad_left
    in_rows = ((np.arange(h) + 0.5) > top) & ((np.arange(h) + 0.5) < bottom)
    in_cols = ((np.arange(w) + 0.5) > left) & ((np.arange(w) + 0.5) < right)
    expected = in_rows[:, None] & in_cols[None, :]
    got = out > 0.5
    assert not (got & ~expected).any()                      # nothing outside the rectangle
    ys, xs = np.nonzero(got)
    ey, ex = np.nonzero(expected)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (ey.min(), ey.max(), ex.min(), ex.max())
    mid_r, mid_c = int((top + bottom) / 2), int((left + right) / 2)
    assert (got[mid_r] == expected[mid_r]).all() and (got[:, mid_c] == expected[:, mid_c]).all()
    assert got.sum() >= 0.8 * expected.sum()                 # only the corners are rounded


@pytest.mark.parametrize("shape", [(30, 90), (90, 30)])
def test_prepare_places_pixels_exactly(timm_adapter, shape):
    """A bright block lands where the pad/scale geometry says, and to_image inverts it."""
    a = timm_adapter
    h, w = shape
    image = np.zeros((3, h, w), np.float32)
    image[:, h // 3: 2 * h // 3, w // 3: 2 * w // 3] = 1.0
    x, geo = a.prepare(image)
    mean = torch.tensor(a.mean).view(3, 1, 1)
    std = torch.tensor(a.std).view(3, 1, 1)
    unnorm = (x * std + mean)[0]
    assert float(unnorm.min()) >= -1e-5 and float(unnorm.max()) <= 1 + 1e-5
    ys, xs = np.nonzero(unnorm.numpy() > 0.5)
    s = geo.scale
    assert abs(ys.min() - (geo.pad_top + h // 3) * s) <= 1.5
    assert abs(ys.max() + 1 - (geo.pad_top + 2 * h // 3) * s) <= 1.5
    assert abs(xs.min() - (geo.pad_left + w // 3) * s) <= 1.5
    assert abs(xs.max() + 1 - (geo.pad_left + 2 * w // 3) * s) <= 1.5
    back = a.to_image(unnorm, geo) > 0.5
    truth = image[0] > 0.5
    assert (back ^ truth).mean() < 0.03
    # padding is black (0 in [0, 1] space) before normalization
    if h < w:
        assert float(unnorm[:2].abs().max()) < 1e-5
    else:
        assert float(unnorm[:, :2].abs().max()) < 1e-5


def test_prepare_rejects_bad_input(timm_adapter):
    with pytest.raises(DataError):
        timm_adapter.prepare(np.zeros((4, 10, 10), np.float32))
    with pytest.raises(DataError):
        timm_adapter.prepare(np.full((3, 10, 10), np.nan, np.float32))
    gray, geo = timm_adapter.prepare(np.ones((10, 20), np.float32))
    assert gray.shape == (3, 64, 64) and (geo.height, geo.width) == (10, 20)


def test_default_model_offline_fails_fast():
    t0 = time.perf_counter()
    with pytest.raises(ModelUnavailableError) as info:
        load_vlm(DEFAULT_MODEL)
    assert time.perf_counter() - t0 < 20  # includes importing open_clip
    message = str(info.value)
    assert DEFAULT_MODEL in message and "cache" in message and "local-dir:" in message
    assert isinstance(info.value, DataError)


@pytest.mark.parametrize("name", ["openai/clip-vit-base-patch16", "ViT-B-16:openai",
                                  "hf-hub:nobody/not-cached-model"])
def test_other_uncached_models_offline(name):
    with pytest.raises(ModelUnavailableError, match="cache"):
        load_vlm(name)


def test_name_errors(tmp_path):
    with pytest.raises(DataError, match="needs a pretrained tag"):
        load_vlm("ViT-B-16")
    with pytest.raises(DataError, match="not found"):
        load_vlm(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="not found"):
        load_vlm("local-dir:" + str(tmp_path / "missing"))
    with pytest.raises(DataError, match="neither"):
        load_vlm(str(tmp_path))
    with pytest.raises(DataError, match="backend"):
        load_vlm("x", backend="tf")


def test_load_open_clip_folder(tmp_path):
    folder = vf.write_open_clip_dir(tmp_path / "oc", trunk="native", seed=5)
    a = load_vlm("local-dir:" + str(folder))
    b = load_vlm(str(folder))  # a plain folder path works too
    assert a.backend == "open_clip" and a.image_size == 64 and a.depth == 4
    from safetensors.torch import load_file
    state = load_file(str(folder / "open_clip_model.safetensors"))
    torch.testing.assert_close(a.model.state_dict()["visual.conv1.weight"], state["visual.conv1.weight"])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(a.encode_image(x), a.reference_image_features(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.encode_image(x), b.encode_image(x))
    assert a.encode_text(["tumor"]).shape == (1, 32)


def test_load_biomedclip_layout_folder(tmp_path):
    """timm trunk + BERT text tower named by a hub id: the folder's own config.json is used."""
    folder = vf.write_open_clip_dir(tmp_path / "bmc", trunk="timm", text="bert", depth=2)
    a = load_vlm("local-dir:" + str(folder))
    assert type(a).__name__ == "_OpenClipTimm" and a.image_size == 224 and a.grid == (14, 14)
    assert a.depth == 12 and a.model.text.config.hidden_size == 32  # the folder's BERT config
    assert a.encode_text(["brain tumor"]).shape == (1, 32)


def test_folder_without_weights(tmp_path):
    folder = vf.write_open_clip_dir(tmp_path / "now", weights=False)
    with pytest.raises(ModelUnavailableError, match="no weights"):
        load_vlm("local-dir:" + str(folder))


def test_load_hf_clip_folder(tmp_path):
    folder = vf.write_hf_clip_dir(tmp_path / "hf")
    a = load_vlm(str(folder))
    assert a.backend == "hf" and a.mean == (0.5, 0.5, 0.5) and a.std == (0.25, 0.25, 0.25)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a.encode_image(x), a.reference_image_features(x), atol=1e-5, rtol=1e-5)
    t = a.encode_text(["brain tumor", "a"])
    assert t.shape == (2, 16)
    # padding does not change a prompt's embedding
    torch.testing.assert_close(t[1], a.encode_text(["a"])[0], atol=1e-5, rtol=1e-5)


def test_remote_code_needs_explicit_permission(tmp_path):
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "biomed_clip", "auto_map": {"AutoModel": "modeling_biomed_clip.BiomedCLIPModel"}}))
    marker = tmp_path / "executed"
    (folder / "modeling_biomed_clip.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    with pytest.raises(DataError, match="--trust-remote-code"):
        load_vlm(str(folder))
    assert not marker.exists()


def test_from_builders_reject_unsupported():
    with pytest.raises(DataError):
        wrap_open_clip(torch.nn.Linear(2, 2), lambda p: p)
    with pytest.raises(DataError):
        wrap_hf_clip(torch.nn.Linear(2, 2), lambda p: p)
