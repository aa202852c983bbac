import json

import cv2
import numpy as np
import pytest

from mwm.data.io import read_mask
from mwm.files import write_png
from mwm.localize.postprocess import (
    PostprocessConfig, anchor_at_half, binarize, binarize_level, kmeans_1d, otsu_level,
    postprocess, postprocess_folder)
from mwm.regions import (as_unit_saliency, component_boxes, connected_components, expand_boxes,
                         expanded_boxes, fill_holes, keep_largest_components, scale_box)


def square(shape, x0, y0, x1, y1):
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


def bimodal(seed=0, shape=(64, 64)):
    rng = np.random.default_rng(seed)
    truth = square(shape, 20, 10, 44, 30)
    p = np.where(truth, 0.75, 0.2) + rng.normal(0, 0.05, shape)
    return np.clip(p, 0, 1), truth


# --------------------------------------------------------------------------- inputs

def test_saliency_scales():
    assert as_unit_saliency(np.array([[0, 255]], np.uint8)).tolist() == [[0.0, 1.0]]
    assert as_unit_saliency(np.array([[0, 65535]], np.uint16)).tolist() == [[0.0, 1.0]]
    assert as_unit_saliency(np.array([[False, True]])).tolist() == [[0.0, 1.0]]
    gray3 = np.dstack([np.array([[3, 200]], np.uint8)] * 3)
    assert as_unit_saliency(gray3).shape == (1, 2)


@pytest.mark.parametrize("bad", [
    np.array([[0.0, 1.5]]), np.array([[np.nan, 0.5]]), np.zeros((2, 2, 2, 2)),
    np.array([[1, 2]], np.int64), np.dstack([np.zeros((2, 2)), np.ones((2, 2)), np.zeros((2, 2))]),
])
def test_saliency_refused(bad):
    with pytest.raises(ValueError):
        as_unit_saliency(bad)


# --------------------------------------------------------------------------- binarize

def test_threshold_is_strict_and_on_unit_scale():
    p = np.array([[0.2, 0.3, 0.31, 0.9]])
    assert binarize(p, "threshold", 0.3).tolist() == [[False, False, True, True]]
    u8 = np.array([[76, 77, 200, 0]], np.uint8)  # 76/255 = 0.298, 77/255 = 0.302
    assert binarize(u8, "threshold", 0.3).tolist() == [[False, True, True, False]]


@pytest.mark.parametrize("method", ["threshold", "otsu", "kmeans"])
@pytest.mark.parametrize("value", [0.0, 0.5, 1.0])
def test_constant_map_is_empty(method, value):
    assert not binarize(np.full((8, 9), value), method).any()
    assert not postprocess(np.full((8, 9), value), method=method).any()


@pytest.mark.parametrize("method", ["otsu", "kmeans"])
def test_bimodal_maps_recover_the_mode(method):
    p, truth = bimodal()
    assert np.array_equal(binarize(p, method), truth)


def test_otsu_matches_opencv():
    for seed in range(5):
        p, _ = bimodal(seed)
        p = np.clip(p + np.random.default_rng(seed).normal(0, 0.1, p.shape), 0, 1)
        levels = np.rint(p * 255).astype(np.uint8)
        t_cv, _ = cv2.threshold(levels, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        assert otsu_level(levels) == int(t_cv)


def test_two_level_map():
    p = np.array([[0.2, 0.2, 0.8]])
    for method in ("otsu", "kmeans"):
        assert binarize(p, method).tolist() == [[False, False, True]]


def test_kmeans_centres_hand_computed():
    # init 0 and 10, cut 5 → {0, 1, 2} and {9, 10}: centres 1 and 9.5, stable
    assert kmeans_1d(np.array([0, 1, 2, 9, 10.0])) == (1.0, 9.5)
    # init 0 and 1, cut 0.5 → {0, .1, .2} | {.6, 1}; centres .1, .8, cut .45: stable
    low, high = kmeans_1d(np.array([0, 0.1, 0.2, 0.6, 1.0]))
    assert low == pytest.approx(0.1) and high == pytest.approx(0.8)


def test_unknown_method():
    with pytest.raises(ValueError, match="method"):
        binarize(np.zeros((2, 2)), "mean")


# --------------------------------------------------------------------------- components

def test_keep_exactly_k_with_ties():
    m = np.zeros((20, 20), bool)
    m[0:2, 10:12] = True    # area 4, first pixel (0, 10)
    m[5:7, 0:2] = True      # area 4, first pixel (5, 0)
    m[10:13, 10:13] = True  # area 9
    m[15:17, 15:17] = True  # area 4, first pixel (15, 15)
    one = keep_largest_components(m, 1)
    assert np.array_equal(one, square(m.shape, 10, 10, 13, 13))
    two = keep_largest_components(m, 2)
    assert two.sum() == 13  # exactly two components: the 9 and the first 4 in raster order
    assert two[0:2, 10:12].all() and not two[5:7, 0:2].any() and not two[15:17, 15:17].any()
    three = keep_largest_components(m, 3)
    assert three[5:7, 0:2].all() and not three[15:17, 15:17].any()
    assert np.array_equal(keep_largest_components(m, 4), m)
    assert np.array_equal(keep_largest_components(m, 10), m)
    assert np.array_equal(keep_largest_components(m, 0), m)
    assert np.array_equal(keep_largest_components(m, None), m)


def test_tie_break_is_raster_order_of_first_pixel():
    # B's first pixel (row 0, col 5) comes before A's (row 1, col 0) in raster order,
    # although A is in the first 2x2 block a block-based labeller visits.
    m = np.zeros((6, 8), bool)
    m[1:3, 0:2] = True  # A, area 4
    m[0:2, 5:7] = True  # B, area 4
    kept = keep_largest_components(m, 1)
    assert kept[0:2, 5:7].all() and not kept[1:3, 0:2].any()
    assert component_boxes(m) == [(5, 0, 7, 2), (0, 1, 2, 3)]


def test_connectivity():
    m = np.eye(4, dtype=bool)  # a diagonal: one 8-component, four 4-components
    assert len(connected_components(m, 8)) == 1
    assert len(connected_components(m, 4)) == 4
    assert keep_largest_components(m, 1, connectivity=4).sum() == 1
    with pytest.raises(ValueError):
        connected_components(m, 6)


def test_bad_k():
    with pytest.raises(ValueError):
        keep_largest_components(np.ones((2, 2), bool), 1.5)


def test_fill_holes():
    ring = square((9, 9), 1, 1, 8, 8) & ~square((9, 9), 3, 3, 6, 6)
    assert np.array_equal(fill_holes(ring), square((9, 9), 1, 1, 8, 8))
    open_ring = ring.copy()
    open_ring[4, 1:3] = False  # a channel to the outside: no hole any more
    assert np.array_equal(fill_holes(open_ring), open_ring)


# --------------------------------------------------------------------------- boxes

def test_component_boxes_exclusive_ends():
    m = square((10, 12), 2, 3, 5, 7)
    m[8, 10] = True
    assert component_boxes(m) == [(2, 3, 5, 7), (10, 8, 11, 9)]
    assert component_boxes(np.zeros((3, 3), bool)) == []


def test_scale_box_symmetric_growth():
    # w = 4, ratio 1.5 → 6: one pixel per side
    assert scale_box((10, 10, 14, 14), 1.5, (100, 100)) == (9, 9, 15, 15)
    # w = 5, ratio 1.2 → 6: margin (6 - 5) / 2 = 0.5 rounds up to 1 per side → width 7
    assert scale_box((10, 10, 15, 15), 1.2, (100, 100)) == (9, 9, 16, 16)
    # w = 10, ratio 1.1 → 11: 0.5 → 1 per side; h = 4, ratio 1.1 → 0.2 → 0
    assert scale_box((0 + 20, 20, 30, 24), 1.1, (100, 100)) == (19, 20, 31, 24)
    # ratio 2 doubles: w = 6 → 12, h = 2 → 4
    assert scale_box((20, 20, 26, 22), 2.0, (100, 100)) == (17, 19, 29, 23)
    assert scale_box((3, 4, 8, 9), 1.0, (100, 100)) == (3, 4, 8, 9)


def test_scale_box_clamps_without_shifting():
    # w = 4 at the left border, ratio 2 → 2 px per side; the left side is cut at 0
    assert scale_box((0, 5, 4, 9), 2.0, (10, 10)) == (0, 3, 6, 10 - 0)
    assert scale_box((7, 7, 10, 10), 3.0, (10, 10)) == (4, 4, 10, 10)


def test_scale_box_refuses_shrinking():
    with pytest.raises(ValueError):
        scale_box((0, 0, 2, 2), 0.5, (4, 4))


def test_expand_boxes_union():
    m = np.zeros((20, 20), bool)
    m[2, 2:6] = True          # a bar: box (2, 2, 6, 3)
    m[10:14, 10] = True
    m[13, 10:14] = True       # an L: box (10, 10, 14, 14)
    tight = expand_boxes(m, 1.0)
    assert tight.sum() == 4 + 16 and tight[10:14, 10:14].all()
    grown = expand_boxes(m, 1.5)
    assert expanded_boxes(m, 1.5) == [(1, 2, 7, 3), (9, 9, 15, 15)]
    assert grown.sum() == 6 + 36
    assert grown.shape == m.shape and grown.dtype == bool
    assert not expand_boxes(np.zeros((5, 5), bool), 2.0).any()


# --------------------------------------------------------------------------- pipeline

def test_postprocess_pipeline():
    p, truth = bimodal()
    p[50:53, 50:53] = 0.9  # a small false blob
    p[18:22, 30:34] = 0.1  # a hole in the true region
    out = postprocess(p, method="kmeans", top_k=1, fill=True)
    assert out.shape == p.shape and out.dtype == bool
    assert np.array_equal(out, truth)
    boxed = postprocess(p, method="kmeans", top_k=1, box_ratio=1.5)
    assert np.array_equal(boxed, square(p.shape, 14, 5, 50, 35))
    unfilled = postprocess(p, method="kmeans", top_k=None, fill=False)
    assert unfilled[51, 51] and not unfilled[20, 32]


def test_config_round_trip():
    config = PostprocessConfig(method="otsu", top_k=2, box_ratio=1.2,
                               crf={"iterations": 3})
    data = json.loads(json.dumps(config.to_dict()))
    assert data["crf"]["iterations"] == 3
    assert PostprocessConfig.from_dict(data) == config
    assert PostprocessConfig.from_dict(PostprocessConfig().to_dict()) == PostprocessConfig()
    with pytest.raises(ValueError, match="unknown"):
        PostprocessConfig.from_dict({"metod": "otsu"})
    with pytest.raises(ValueError):
        PostprocessConfig(method="otsu", box_ratio=0.5)
    with pytest.raises(ValueError):
        PostprocessConfig(threshold=2.0)


def test_crf_needs_image():
    with pytest.raises(ValueError, match="image"):
        postprocess(bimodal()[0], crf=True)


# --------------------------------------------------------------------------- folders

def test_postprocess_folder(tmp_path):
    sal = tmp_path / "sal"
    p, truth = bimodal()
    write_png(sal / "a.png", np.rint(p * 255).astype(np.uint8))
    write_png(sal / "b.png", np.zeros((30, 40), np.uint8))                 # constant → empty
    colour = np.zeros((10, 10, 3), np.uint8)
    colour[..., 0] = 255
    write_png(sal / "c.png", colour)                                        # colour map → fails
    config = PostprocessConfig(method="kmeans", top_k=1, box_ratio=1.5)
    summary = postprocess_folder(sal, tmp_path / "out", config, boxes_dir=tmp_path / "boxes",
                                 progress=False)
    assert summary["n_maps"] == 3 and summary["n_written"] == 2 and summary["n_failed"] == 1
    assert summary["failures"][0]["name"] == "c" and "gray" in summary["failures"][0]["reason"]
    assert summary["config"] == config.to_dict()
    out_a = cv2.imread(str(tmp_path / "out" / "a.png"), cv2.IMREAD_UNCHANGED)
    assert out_a.dtype == np.uint8 and out_a.shape == p.shape and set(np.unique(out_a)) == {0, 255}
    assert np.array_equal(read_mask(tmp_path / "out" / "a.png"), square(p.shape, 14, 5, 50, 35))
    assert np.array_equal(read_mask(tmp_path / "boxes" / "a.png"), square(p.shape, 14, 5, 50, 35))
    out_b = cv2.imread(str(tmp_path / "out" / "b.png"), cv2.IMREAD_UNCHANGED)
    assert out_b.shape == (30, 40) and not out_b.any()
    assert not (tmp_path / "out" / "c.png").exists()


def test_postprocess_folder_boxes_without_ratio(tmp_path):
    sal = tmp_path / "sal"
    p, truth = bimodal()
    write_png(sal / "a.png", np.rint(p * 255).astype(np.uint8))
    summary = postprocess_folder(sal, tmp_path / "out", {"method": "otsu"},
                                 boxes_dir=tmp_path / "boxes", progress=False)
    assert summary["n_failed"] == 0
    assert np.array_equal(read_mask(tmp_path / "out" / "a.png"), truth)
    assert np.array_equal(read_mask(tmp_path / "boxes" / "a.png"), truth)  # tight box = square


def test_postprocess_folder_crf_requires_images(tmp_path):
    sal = tmp_path / "sal"
    write_png(sal / "a.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="images_dir"):
        postprocess_folder(sal, tmp_path / "out", PostprocessConfig(crf=True), progress=False)


@pytest.mark.parametrize("method", ["otsu", "kmeans", "threshold"])
def test_binarize_level_is_the_cut(method):
    rng = np.random.default_rng(1)
    p = rng.random((30, 30)).astype(np.float32) ** 2
    level = binarize_level(p, method, 0.35)
    assert np.array_equal(binarize(p, method, 0.35), p > level)
    assert binarize_level(np.full((4, 4), 0.3), method) is None


def test_anchor_at_half():
    p = np.array([0.0, 0.1, 0.2, 0.6, 1.0])
    assert np.allclose(anchor_at_half(p, 0.2), [0.0, 0.25, 0.5, 0.75, 1.0])
    assert np.all(np.diff(anchor_at_half(np.linspace(0, 1, 50), 0.9)) > 0)
