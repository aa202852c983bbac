"""Resume and staleness rules of the localization driver, with a stand-in saliency function."""

import cv2
import numpy as np
import pytest

from mwm.data.layouts import Sample, find_images
from mwm.files import read_png_text
from mwm.localize.pipeline import FINGERPRINT_KEY, model_identity, shard, write_maps


class CountingSaliency:
    """Map = normalized first channel; counts how many images it was asked for."""

    def __init__(self):
        self.calls = 0

    def __call__(self, images, prompts, names):
        assert len(names) == len(images)
        self.calls += len(images)
        return [im[0] / max(float(im[0].max()), 1e-6) for im in images]


def make_images(folder, n=3, shape=(12, 20)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cv2.imwrite(str(folder / f"im{i}.png"), np.full(shape, 40 * (i + 1), np.uint8))
    return [Sample(ref, prompt="brain tumor") for ref in find_images(folder)]


def test_maps_have_image_size_and_fingerprint(tmp_path):
    samples = make_images(tmp_path / "img")
    fn = CountingSaliency()
    summary = write_maps(samples, tmp_path / "out", fn, model_id="m", params={"beta": 1},
                               progress=False)
    assert (summary.n_written, summary.n_skipped) == (3, 0)
    saved = cv2.imread(str(tmp_path / "out" / "im0.png"), cv2.IMREAD_UNCHANGED)
    assert saved.shape == (12, 20) and saved.dtype == np.uint8
    assert FINGERPRINT_KEY in read_png_text(tmp_path / "out" / "im0.png")


def test_rerun_skips_only_identical_settings(tmp_path):
    samples = make_images(tmp_path / "img")
    fn = CountingSaliency()
    run = lambda s, **kw: write_maps(s, tmp_path / "out", fn, progress=False,  # noqa: E731
                                           **{"model_id": "m", "params": {"beta": 1}, **kw})
    run(samples)
    assert fn.calls == 3
    assert run(samples).n_skipped == 3 and fn.calls == 3           # same everything: skipped
    run(samples, params={"beta": 2})                                # parameter changed
    assert fn.calls == 6
    run(samples, params={"beta": 2}, model_id="other")              # model changed
    assert fn.calls == 9
    changed = [samples[0].__class__(samples[0].image, prompt="edema")] + samples[1:]
    summary = run(changed, params={"beta": 2}, model_id="other")    # one prompt changed
    assert fn.calls == 10 and summary.n_skipped == 2


def test_half_written_or_foreign_file_is_recomputed(tmp_path):
    samples = make_images(tmp_path / "img", n=1)
    (tmp_path / "out").mkdir()
    cv2.imwrite(str(tmp_path / "out" / "im0.png"), np.zeros((12, 20), np.uint8))  # no stamp
    fn = CountingSaliency()
    write_maps(samples, tmp_path / "out", fn, model_id="m", params={}, progress=False)
    assert fn.calls == 1


def test_unreadable_image_is_recorded_and_others_go_on(tmp_path):
    samples = make_images(tmp_path / "img", n=2)
    (tmp_path / "img" / "im0.png").write_bytes(b"junk")
    summary = write_maps(samples, tmp_path / "out", CountingSaliency(), model_id="m",
                               params={}, progress=False)
    assert summary.n_written == 1 and len(summary.failures) == 1
    assert "im0.png" in summary.failures[0]["file"]


def test_shards_partition_the_items():
    items = list(range(10))
    parts = [shard(items, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == items
    assert all(not set(a) & set(b) for i, a in enumerate(parts) for b in parts[i + 1:])
    with pytest.raises(ValueError):
        shard(items, 3, 3)


def test_local_model_identity_follows_the_weights_not_the_path(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"1")
    first = model_identity(str(tmp_path))
    (tmp_path / "w.safetensors").write_bytes(b"12")
    second = model_identity(str(tmp_path))
    assert second != first
    (tmp_path / "log.csv").write_text("not part of the model")
    assert model_identity(f"local-dir:{tmp_path}") == second
    copy = tmp_path.parent / f"{tmp_path.name}-copy"  # a copied run keeps its maps
    copy.mkdir()
    (copy / "w.safetensors").write_bytes(b"12")
    assert model_identity(str(copy)) == second
    assert model_identity("hf-hub:org/model") == "hf-hub:org/model"
