import dataclasses
import sys

import numpy as np
import pytest

from mwm.files import write_png
from mwm.data.io import read_mask
from mwm.localize.crf import CRFParams, check_image, crf_unary, dense_crf
from mwm.localize.postprocess import PostprocessConfig, postprocess, postprocess_folder

try:
    import pydensecrf.densecrf  # noqa: F401
    HAVE_BACKEND = True
except ImportError:  # pragma: no cover - the dev extra installs pydensecrf2
    HAVE_BACKEND = False
needs_backend = pytest.mark.skipif(not HAVE_BACKEND, reason="pydensecrf2 not installed "
                                   "(pip install -e .[dev] installs it)")


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


def spill_case(seed=0):
    """An image with a bright rectangle and a saliency blob spilling 10 px past its edge."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((64, 64), bool)
    truth[16:48, 16:40] = True
    image = np.where(truth, 200, 40).astype(np.float64)
    image = np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)
    blob = np.zeros_like(truth)
    blob[14:50, 14:50] = True
    p = np.clip(np.where(blob, 0.65, 0.3) + rng.normal(0, 0.05, truth.shape), 0, 1)
    return p, np.repeat(image[:, :, None], 3, axis=2), truth


# --------------------------------------------------------------------------- unary

def test_unary_formula_and_symmetry():
    p = np.array([[0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]])
    u = crf_unary(p, tau=2.0, eps=1e-6)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    assert u.shape == (2, 1, 7) and u.dtype == np.float32
    assert u[1, 0, 5] == pytest.approx(-np.log(0.9 + 1e-6) / (2 * sig(0.9)), rel=1e-6)
    assert u[0, 0, 5] == pytest.approx(-np.log(0.1 + 1e-6) / (2 * sig(0.1)), rel=1e-5)
    assert u[1, 0, 0] == pytest.approx(-np.log(1e-6) / (2 * sig(0.0)), rel=1e-6)
    assert u[0, 0, 3] == u[1, 0, 3]                             # p = 0.5: no preference
    assert np.allclose(u[0, 0, ::-1], u[1, 0])                  # background(p) = foreground(1-p)
    assert np.all(u[1, 0, 4:] < u[0, 0, 4:]) and np.all(u[1, 0, :3] > u[0, 0, :3])
    assert np.all(np.isfinite(u))


# --------------------------------------------------------------------------- validation (d)

@pytest.mark.parametrize("saliency, image, match", [
    (np.zeros((8, 8)), np.zeros((8, 8, 3), np.float32), "uint8"),
    (np.zeros((8, 8)), np.zeros((8, 8, 4), np.uint8), "RGB"),
    (np.zeros((8, 8)), np.zeros((8, 9, 3), np.uint8), "same size"),
    (np.zeros((8, 8, 2)), np.zeros((8, 8, 3), np.uint8), "2-D"),
    (np.full((8, 8), 3.0), np.zeros((8, 8, 3), np.uint8), r"\[0, 1\]"),
    (np.zeros((8, 8), np.int32), np.zeros((8, 8, 3), np.uint8), "float"),
])
def test_wrong_inputs_raise_value_error(saliency, image, match):
    with pytest.raises(ValueError, match=match):
        dense_crf(saliency, image)


def test_bad_params():
    with pytest.raises(ValueError):
        CRFParams(iterations=-1)
    with pytest.raises(ValueError):
        CRFParams(tau=0)
    with pytest.raises(ValueError, match="unknown"):
        CRFParams.from_dict({"iters": 3})
    assert CRFParams.from_dict(CRFParams(iterations=2).to_dict()) == CRFParams(iterations=2)


def test_gray_image_is_repeated():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgb = check_image(gray)
    assert rgb.shape == (3, 4, 3) and np.array_equal(rgb[:, :, 2], gray)


def test_missing_backend_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    with pytest.raises(ImportError, match="pip install pydensecrf2"):
        dense_crf(np.full((4, 4), 0.7), np.zeros((4, 4, 3), np.uint8))


# --------------------------------------------------------------------------- inference

@needs_backend
def test_zero_pairwise_is_unary_argmax():  # (a)
    rng = np.random.default_rng(0)
    p = rng.random((40, 50))
    p[0, :5] = 0.5  # ties go to background
    image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    out = dense_crf(p, image, gaussian_compat=0, bilateral_compat=0)
    assert out.shape == p.shape and out.dtype == bool
    assert np.array_equal(out, p > 0.5)


@needs_backend
@pytest.mark.parametrize("value", [0.7, 0.8])
def test_isolated_pixel_flips(value):  # (b)
    image = np.full((32, 32, 3), 128, np.uint8)
    p = np.full((32, 32), 0.1)
    p[16, 16] = value
    assert dense_crf(p, image, gaussian_compat=0, bilateral_compat=0)[16, 16]  # unary alone
    assert not dense_crf(p, image, bilateral_compat=0).any()
    # and the other way round: a weak background pixel in a confident foreground
    q = 1.0 - p
    assert dense_crf(q, image, bilateral_compat=0).all()


@needs_backend
def test_bilateral_pulls_blob_back_to_the_edge():  # (c)
    p, image, truth = spill_case()
    before = iou(p > 0.5, truth)
    after = iou(dense_crf(p, image), truth)
    assert before < 0.65
    assert after > 0.95
    # one iteration (the reference setting) already helps, less
    assert before < iou(dense_crf(p, image, iterations=1), truth) <= after


@needs_backend
def test_postprocess_with_crf_and_folder(tmp_path):
    p, image, truth = spill_case()
    out = postprocess(p, crf=True, image=image, top_k=1)
    assert out.shape == p.shape and iou(out, truth) > 0.95
    assert not postprocess(np.full((64, 64), 0.8), crf=True, image=image).any()

    write_png(tmp_path / "sal" / "a.png", np.rint(p * 255).astype(np.uint8))
    write_png(tmp_path / "sal" / "b.png", np.rint(p * 255).astype(np.uint8))
    write_png(tmp_path / "sal" / "c.png", np.rint(p * 255).astype(np.uint8))
    write_png(tmp_path / "img" / "a.png", image)
    write_png(tmp_path / "img" / "b.png", image[:32])  # wrong size
    summary = postprocess_folder(tmp_path / "sal", tmp_path / "out",
                                 PostprocessConfig(crf=CRFParams(), top_k=1),
                                 images_dir=tmp_path / "img", progress=False)
    assert summary["n_written"] == 1 and summary["n_failed"] == 2
    reasons = {f["name"]: f["reason"] for f in summary["failures"]}
    assert "same size" in reasons["b"] and "no image named c" in reasons["c"]
    assert iou(read_mask(tmp_path / "out" / "a.png"), truth) > 0.95


@needs_backend
def test_default_crf_is_fast():
    import time

    rng = np.random.default_rng(0)
    p = rng.random((256, 256))
    image = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    start = time.perf_counter()
    out = dense_crf(p, image)
    assert out.shape == (256, 256)
    assert time.perf_counter() - start < 5.0


# --------------------------------------------------------------------------- anchor

@pytest.mark.parametrize("method", ["otsu", "kmeans", "threshold"])
def test_binarization_anchor_without_pairwise_is_the_binarization(method):
    # the anchored unary decides exactly where the postprocessing's cut decides
    rng = np.random.default_rng(3)
    p = np.clip(rng.normal(0.2, 0.1, (40, 40)), 0, 1)
    p[10:20, 10:25] += 0.5
    image = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    crf = CRFParams(anchor="binarization", gaussian_compat=0, bilateral_compat=0)
    anchored = postprocess(p, method=method, threshold=0.4, crf=crf, image=image, fill=False)
    assert np.array_equal(anchored, postprocess(p, method=method, threshold=0.4, fill=False))
    published = postprocess(p, crf=dataclasses.replace(crf, anchor="map"), image=image, fill=False)
    assert np.array_equal(published, p > 0.5)


@needs_backend
def test_binarization_anchor_moves_a_low_map_onto_the_edge():
    # A map whose lesion values stay under 0.5 (as M2IB maps often do): the published
    # anchor finds nothing, the binarization anchor snaps the k-means blob to the edge.
    p, image, truth = spill_case()
    low = 0.45 * p
    assert not postprocess(low, crf=True, image=image).any()
    blob = postprocess(low, method="kmeans")
    refined = postprocess(low, method="kmeans", crf=CRFParams(anchor="binarization"),
                          image=image, top_k=1)
    assert iou(blob, truth) < 0.7 and iou(refined, truth) > 0.95


def test_bad_anchor():
    with pytest.raises(ValueError, match="anchor"):
        CRFParams(anchor="edges")
