"""Where `mwm localize`'s M2IB settings come from: flags, --published, the model folder's
recommendation, the defaults; --tune on a shallow model; a quick error when the hub is
unreachable."""

from __future__ import annotations

import argparse
import json
import os
import time

import cv2
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import vlm_fixtures as vf  # noqa: E402
from mwm.cli import main  # noqa: E402
from mwm.cli.flags import add_flags, config_from_args  # noqa: E402
from mwm.data.layouts import Sample, SliceRef  # noqa: E402
from mwm.errors import DataError, ModelUnavailableError  # noqa: E402
from mwm.localize.m2ib import PUBLISHED, M2IBConfig  # noqa: E402
from mwm.localize.pipeline import LocalizeConfig, TuneSpec, localize  # noqa: E402
from mwm.localize.postprocess import PostprocessConfig  # noqa: E402
from mwm.localize.tune import default_grid  # noqa: E402

QUICK = dict(steps=1, samples=1)
# What M2IBConfig() meant before its tunable settings could be left out: the maps of
# `mwm demo` / `mwm experiment` (explicit settings) must keep these values exactly.
OLD_DEFAULTS = {"layer": 7, "beta": 1.0, "noise_scale": 1.0, "steps": 10, "samples": 10,
                "lr": 1.0, "alpha_init": 5.0, "seed": 0, "batch_size": 8, "standardize": True,
                "amp": False, "shifts": 1, "smooth": 0.0}


def localize_config(*argv: str) -> LocalizeConfig:
    parser = argparse.ArgumentParser()
    add_flags(parser, LocalizeConfig)
    return config_from_args(LocalizeConfig, parser.parse_args(["imgs", "--out", "o", *argv]))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two 32 px images with a bright square and its mask, as localize samples."""
    root = tmp_path_factory.mktemp("settings")
    samples = []
    for i in range(2):
        image = np.full((32, 32), 30, np.uint8)
        mask = np.zeros((32, 32), np.uint8)
        mask[8 + i:20, 6:18 + i] = 255
        image[mask > 0] = 200
        cv2.imwrite(str(root / f"i{i}.png"), image)
        cv2.imwrite(str(root / f"m{i}.png"), mask)
        samples.append(Sample(SliceRef(root / f"i{i}.png"), SliceRef(root / f"m{i}.png"),
                              prompt="tumor"))
    return samples


@pytest.fixture(scope="module")
def shallow():
    return vf.build_tiny_open_clip(trunk="native", depth=3, image_size=32, patch_size=8, width=32)


def used(out) -> dict:
    return json.loads((out / "m2ib_config.json").read_text())


# --------------------------------------------------------------------------- A: --published

def test_published_preset_gives_the_published_values():
    cfg = M2IBConfig().published()
    assert {k: getattr(cfg, k) for k in PUBLISHED} == PUBLISHED
    assert PUBLISHED == {"layer": 7, "beta": 0.1, "noise_scale": 1.0, "standardize": False,
                         "steps": 10, "samples": 10, "lr": 1.0, "alpha_init": 5.0,
                         "shifts": 1, "smooth": 0.0, "amp": False}
    # the published code's own options may be given; seed and batch size are not the formula
    mine = M2IBConfig(layer=9, beta=1.0, seed=3, batch_size=2, noise_scale=1.0).published()
    assert (mine.layer, mine.beta, mine.seed, mine.batch_size) == (9, 1.0, 3, 2)
    assert localize_config("--published").m2ib == cfg
    assert localize_config("--published", "--layer", "9").m2ib.layer == 9


@pytest.mark.parametrize("argv, named", [
    (["--standardize"], "--standardize True"), (["--noise-scale", "0.5"], "--noise-scale 0.5"),
    (["--steps", "20"], "--steps 20"), (["--m2ib-lr", "0.5"], "--m2ib-lr 0.5"),
    (["--shifts", "3"], "--shifts 3"), (["--amp"], "--amp True")])
def test_published_refuses_settings_that_contradict_it(argv, named):
    with pytest.raises(DataError, match=f"--published.*{named}"):
        localize_config("--published", *argv)


def test_help_shows_both_standardize_forms_and_published(capsys):
    with pytest.raises(SystemExit):
        main(["localize", "--help"])
    text = capsys.readouterr().out
    assert "--standardize, --no-standardize" in text and "--published" in text


def test_standardize_flag_has_both_forms_and_a_not_given_state():
    assert localize_config("--standardize").m2ib.standardize is True
    assert localize_config("--no-standardize").m2ib.standardize is False
    left_out = localize_config().m2ib
    assert left_out.standardize is None and left_out.resolved().standardize is True


def test_tune_grid_searches_standardize():
    grid = default_grid(12)
    assert grid["standardize"] == (True, False) and grid["noise_scale"] == (0.5, 1.0, 2.0)
    published = default_grid(12, published=True)
    assert published == {"beta": (0.1, 1.0, 2.0), "layer": (7, 8, 9)}


# --------------------------------------------------------------------------- B: model advice

def test_explicit_and_default_settings_resolve_as_before(shallow):
    assert M2IBConfig().resolved().to_dict() == OLD_DEFAULTS
    # the demo's settings with a folder recommending other ones: the explicit ones win,
    # the rest are what they always were
    shallow.m2ib_recommendation = {"layer": 1, "noise_scale": 2.0}
    try:
        demo = M2IBConfig(layer=2, noise_scale=0.5, shifts=3, smooth=0.4).for_model(shallow)
    finally:
        shallow.m2ib_recommendation = {}
    assert demo.to_dict() == {**OLD_DEFAULTS, "layer": 2, "noise_scale": 0.5, "shifts": 3,
                              "smooth": 0.4}


def test_tune_on_a_shallow_model_without_layer(data, shallow, tmp_path):
    spec = TuneSpec(data, PostprocessConfig(method="threshold", threshold=0.5), n_images=1)
    summary = localize(data, tmp_path, model=shallow, m2ib=M2IBConfig(**QUICK), tune=spec,
                       progress=False)
    rows = summary.tune_rows  # beta x layers {1, 2, (1, 2)} x noise scale x standardize
    assert summary.n_written == 2 and len(rows) == 3 * 3 * 3 * 2
    assert {r["standardize"] for r in rows} == {True, False}
    assert used(tmp_path)["layer"] in (1, 2, [1, 2])


def test_model_folder_recommendation_fills_the_settings_left_out(data, tmp_path):
    folder = vf.write_open_clip_dir(tmp_path / "model", depth=3, image_size=32, width=32)
    (folder / "m2ib_recommended.json").write_text(json.dumps(
        {"layer": 2, "noise_scale": 0.5, "note": "why"}))
    localize(data, tmp_path / "a", model=str(folder), m2ib=M2IBConfig(**QUICK), progress=False)
    assert used(tmp_path / "a") == {"model": str(folder), **OLD_DEFAULTS, **QUICK, "layer": 2,
                                    "noise_scale": 0.5}
    localize(data, tmp_path / "b", model=f"local-dir:{folder}",
             m2ib=M2IBConfig(layer=1, standardize=False, **QUICK), progress=False)
    assert (used(tmp_path / "b")["layer"], used(tmp_path / "b")["noise_scale"],
            used(tmp_path / "b")["standardize"]) == (1, 0.5, False)


def test_shallow_model_without_advice_says_what_to_give(data, shallow, tmp_path):
    with pytest.raises(DataError, match=r"3 vision blocks.*default layer 7.*--layer in 0\.\.2"
                                        r".*--tune"):
        localize(data, tmp_path, model=shallow, m2ib=M2IBConfig(**QUICK), progress=False)
    deep = vf.build_tiny_open_clip(trunk="native", depth=4, image_size=32, patch_size=8, width=32)
    with pytest.raises(DataError, match=r"layer 9 is out of range.*must be in 0\.\.3"):
        localize(data, tmp_path, model=deep, m2ib=M2IBConfig(layer=9, **QUICK), progress=False)
    assert not (tmp_path / "m2ib_config.json").exists()


@pytest.mark.parametrize("content, problem", [
    ("{not json", "not readable JSON"), ('{"layers": 2}', "not \\['layers'\\]"),
    ('[2]', "expected a JSON object"), ('{"layer": 5}', "layer 5 is out of range")])
def test_bad_recommendation_file_names_the_file(data, tmp_path, content, problem):
    folder = vf.write_open_clip_dir(tmp_path / "model", depth=3, image_size=32, width=32)
    (folder / "m2ib_recommended.json").write_text(content)
    with pytest.raises(DataError, match=f"m2ib_recommended.json.*{problem}.*fix or delete"):
        localize(data, tmp_path / "o", model=str(folder), m2ib=M2IBConfig(**QUICK),
                 progress=False)


# --------------------------------------------------------------------------- C: no network

@pytest.fixture
def unreachable_hub(monkeypatch):
    """Network allowed (HF_HUB_OFFLINE off) but the hub is a closed local port."""
    from huggingface_hub import constants

    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                 "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")


def _quick_error(load, kind=ModelUnavailableError) -> str:
    start = time.perf_counter()
    with pytest.raises(kind) as info:
        load()
    assert time.perf_counter() - start < 5.0
    return str(info.value)


def test_unreachable_hub_is_a_quick_clear_error(unreachable_hub, tmp_path):
    from mwm.clip.model import build_model
    from mwm.localize.hub import hub_offline
    from mwm.localize.refine import SamRefiner
    from mwm.localize.vlm import load_vlm

    text = _quick_error(lambda: load_vlm("hf-hub:nobody/not-cached-model"))
    assert "127.0.0.1:9 did not answer" in text and "local-dir:PATH" in text
    text = _quick_error(lambda: SamRefiner.from_pretrained("nobody/not-cached-sam"))
    assert "did not answer" in text and "SamModel folder" in text and "local-dir:" not in text
    text = _quick_error(lambda: build_model("hf-hub:nobody/not-cached-model"))
    assert "did not answer" in text and "--model DIR" in text
    assert not hub_offline()  # switched offline for the lookups only
    # a local folder still loads
    folder = vf.write_open_clip_dir(tmp_path / "model", depth=2, image_size=32, width=32)
    assert load_vlm(str(folder)).depth == 2


def test_missing_sam_folder_names_sams_own_options(tmp_path):
    from mwm.localize.refine import SamRefiner

    text = _quick_error(lambda: SamRefiner.from_pretrained(str(tmp_path / "nope")), DataError)
    assert "SAM model folder" in text and "SamModel folder" in text and "local-dir:" not in text
