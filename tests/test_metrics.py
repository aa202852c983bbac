import csv
import json
import math

import cv2
import numpy as np
import pytest
from scipy import ndimage

from mwm import metrics as M
from mwm.data.io import DataError
from mwm.files import write_png
from mwm.localize.evaluate import CSV_COLUMNS, evaluate_folders

OVERLAP = ("dice", "iou", "precision", "recall", "nsd")


def square(shape, x0, y0, x1, y1):
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


def blobs(seed, shape=(64, 64), n=40):
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        m = ndimage.gaussian_filter(rng.random(shape), 3) > 0.5 + rng.uniform(0, 0.04)
        if m.any():
            out.append(m)
    return out


# --------------------------------------------------------------------------- overlap

def test_two_squares_half_overlap():
    pred = square((8, 8), 0, 0, 4, 4)   # 16 px
    gt = square((8, 8), 0, 2, 4, 6)     # 16 px, rows 2-3 shared: 8 px
    assert M.confusion(pred, gt) == (8, 8, 8)
    assert M.dice(pred, gt) == 0.5
    assert M.iou(pred, gt) == pytest.approx(1 / 3)
    assert M.precision(pred, gt) == 0.5
    assert M.recall(pred, gt) == 0.5


def test_prediction_covering_the_lesion():
    pred = square((8, 8), 0, 0, 4, 4)   # 16 px
    gt = square((8, 8), 0, 0, 2, 4)     # 8 px inside pred
    assert M.precision(pred, gt) == 0.5
    assert M.recall(pred, gt) == 1.0
    assert M.dice(pred, gt) == pytest.approx(2 / 3)
    assert M.iou(pred, gt) == 0.5


def test_disjoint():
    a, b = square((8, 8), 0, 0, 2, 2), square((8, 8), 5, 5, 7, 7)
    for f in (M.dice, M.iou, M.precision, M.recall):
        assert f(a, b) == 0.0
    assert M.nsd(a, b, 1) == 0.0


def test_non_bool_inputs_and_shape_check():
    a = square((6, 6), 1, 1, 4, 4).astype(np.uint8) * 255
    assert M.dice(a, a > 0) == 1.0
    with pytest.raises(ValueError, match="same size"):
        M.dice(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="2-D"):
        M.dice(np.zeros((4, 4, 1)), np.zeros((4, 4, 1)))


# --------------------------------------------------------------------------- empty masks

def test_empty_empty_is_perfect():
    e = np.zeros((5, 5), bool)
    for name in OVERLAP:
        assert getattr(M, name)(e, e) == 1.0
    assert M.hausdorff95(e, e) == 0.0
    values = M.region_metrics(e, e, include_hd95=True)
    assert all(values[k] == 1.0 for k in M.METRIC_NAMES) and values["hausdorff95"] == 0.0


@pytest.mark.parametrize("swap", [False, True])
def test_one_empty_is_zero(swap):
    e, m = np.zeros((5, 5), bool), square((5, 5), 1, 1, 3, 3)
    pred, gt = (m, e) if swap else (e, m)
    for name in OVERLAP:
        assert getattr(M, name)(pred, gt) == 0.0
    assert M.hausdorff95(pred, gt) == math.inf
    assert all(v == 0.0 for v in M.region_metrics(pred, gt).values())


def test_never_nan():
    masks = blobs(3, (24, 24), 10) + [np.zeros((24, 24), bool), np.ones((24, 24), bool)]
    for a in masks:
        for b in masks:
            values = M.region_metrics(a, b, include_hd95=True)
            assert not any(math.isnan(v) for v in values.values())


# --------------------------------------------------------------------------- boundary

def test_boundary_definition():
    m = square((7, 7), 1, 1, 6, 6)
    assert M.boundary(m).sum() == 16                         # 5x5 square: 25 - 9
    assert M.boundary(np.ones((4, 4), bool)).sum() == 12     # the image border counts
    plus = np.zeros((3, 3), bool)
    plus[1, :] = plus[:, 1] = True
    assert M.boundary(plus).sum() == 4                       # the centre survives the cross


def test_nsd_hand_computed():
    a = square((32, 32), 10, 10, 20, 20)
    shifted = square((32, 32), 11, 10, 21, 20)
    assert M.nsd(a, a, 0) == 1.0
    assert M.nsd(a, shifted, 2) == 1.0
    assert M.nsd(a, shifted, 1) == 1.0
    # tolerance 0: only the top and bottom rows overlap, 9 + 9 of 36 boundary pixels each
    assert M.nsd(a, shifted, 0) == 0.5
    # two columns apart: at tolerance 1 the left and right sides (8 + 8 px each) miss
    far = square((32, 32), 12, 10, 22, 20)
    assert M.nsd(a, far, 1) == pytest.approx((36 - 16) / 36)
    assert M.nsd(a, far, 2) == 1.0
    # anisotropic pixels: columns 3 units apart put a one-column shift out of tolerance 2
    assert M.nsd(a, shifted, 2, spacing=(1, 3)) < 1.0
    with pytest.raises(ValueError):
        M.nsd(a, a, -1)
    with pytest.raises(ValueError):
        M.nsd(a, a, 2, spacing=(1, 0))


def test_hausdorff95_hand_computed():
    a = square((32, 32), 10, 10, 20, 20)
    assert M.hausdorff95(a, a) == 0.0
    far = square((32, 32), 14, 10, 24, 20)  # 4 columns to the right
    d_ab, d_ba = M.surface_distances(a, far)
    assert d_ab.max() == 4.0 and d_ba.max() == 4.0
    assert 0 < M.hausdorff95(a, far) <= 4.0


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_matches_monai():
    torch = pytest.importorskip("torch")
    metrics = pytest.importorskip("monai.metrics")
    masks = blobs(1, n=24)
    preds, gts = masks[::2], masks[1::2]
    tp = torch.from_numpy(np.stack(preds))[:, None].float()  # (B, 1, H, W)
    tg = torch.from_numpy(np.stack(gts))[:, None].float()
    ref = metrics.compute_dice(tp, tg)[:, 0].numpy()
    assert [M.dice(a, b) for a, b in zip(preds, gts)] == pytest.approx(ref, abs=1e-6)
    for tol in (0, 1, 2, 3.5):
        for spacing in ((1.0, 1.0), (0.5, 2.0)):
            ref = metrics.compute_surface_dice(tp, tg, [tol], spacing=spacing)[:, 0].numpy()
            ours = [M.nsd(a, b, tol, spacing) for a, b in zip(preds, gts)]
            assert ours == pytest.approx(ref, abs=1e-5)
    ref = metrics.compute_hausdorff_distance(tp, tg, percentile=95)[:, 0].numpy()
    assert [M.hausdorff95(a, b) for a, b in zip(preds, gts)] == pytest.approx(ref, abs=1e-4)


# --------------------------------------------------------------------------- box regions

def test_box_region_and_metrics():
    pred = np.zeros((8, 8), bool)
    pred[[0, 1, 2, 3], [0, 1, 2, 3]] = True                  # a diagonal: one 8-component
    pred[6, 6:8] = True                                       # a bar
    box = M.box_region(pred)
    assert box.sum() == 16 + 2 and box[0:4, 0:4].all() and box[6, 6:8].all()
    gt = square((8, 8), 0, 0, 2, 4)                           # 8 px, inside the first box
    values = M.region_metrics(pred, gt)
    assert set(values) == set(M.METRIC_NAMES)
    assert values["precision"] == pytest.approx(2 / 6)       # (0,0), (1,1) of 6 pixels
    assert values["recall"] == pytest.approx(2 / 8)
    assert values["box_precision"] == pytest.approx(8 / 18)
    assert values["box_recall"] == 1.0
    assert values["box_iou"] == pytest.approx(8 / 18)
    assert values["box_dice"] == pytest.approx(16 / 26)


def test_region_metrics_speed():
    import time

    a, b = blobs(5, (256, 256), 2)
    start = time.perf_counter()
    for _ in range(10):
        M.region_metrics(a, b)
    assert (time.perf_counter() - start) / 10 < 0.1


# --------------------------------------------------------------------------- evaluate_folders

def _strict_json(path):
    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_evaluate_folders(tmp_path):
    gt_dir, pred_dir, out = tmp_path / "gt", tmp_path / "pred", tmp_path / "eval"
    a = square((16, 16), 2, 2, 10, 10)
    write_png(gt_dir / "a.png", a.astype(np.uint8) * 255)
    write_png(gt_dir / "b.png", a.astype(np.uint8) * 255)             # no prediction
    write_png(gt_dir / "c.png", np.zeros((16, 16), np.uint8))         # empty lesion
    write_png(gt_dir / "d.png", a.astype(np.uint8) * 255)
    write_png(pred_dir / "a.png", a.astype(np.uint8))                 # 0/1 label map
    cv2.imwrite(str(pred_dir / "c.tif"), np.zeros((16, 16), np.uint8))  # other extension
    write_png(pred_dir / "d.png", np.zeros((16, 20), np.uint8))       # wrong size
    write_png(pred_dir / "e.png", np.zeros((16, 16), np.uint8))       # no ground truth

    summary = evaluate_folders(pred_dir, gt_dir, out, tolerance_px=2, progress=False)
    assert summary["n_gt"] == 4 and summary["n_evaluated"] == 3
    assert summary["n_missing"] == 1 and summary["n_failed"] == 1
    assert summary["failures"][0]["name"] == "d" and "d.png" in summary["failures"][0]["file"]
    assert "20x16" in summary["failures"][0]["reason"]
    assert summary["extra_predictions"] == ["e"]
    assert summary["metrics"]["dice"]["mean"] == pytest.approx(2 / 3)  # 1 (a), 0 (b), 1 (c)
    assert summary["metrics"]["dice"]["std"] == pytest.approx(np.std([1, 0, 1]))
    assert summary["tolerance_px"] == 2 and "empty_empty" in summary["conventions"]
    assert _strict_json(out / "summary.json") == json.loads(json.dumps(summary))

    with (out / "per_image.csv").open() as handle:
        rows = {row["name"]: row for row in csv.DictReader(handle)}
    assert list(rows) == ["a", "b", "c", "d"]
    assert tuple(rows["a"].keys()) == CSV_COLUMNS
    assert rows["a"]["has_prediction"] == "1" and float(rows["a"]["dice"]) == 1.0
    assert rows["b"]["has_prediction"] == "0" and float(rows["b"]["recall"]) == 0.0
    assert float(rows["c"]["nsd"]) == 1.0 and rows["c"]["error"] == ""
    assert rows["d"]["dice"] == "" and "size" in rows["d"]["error"]


def test_evaluate_empty_prediction_folder(tmp_path):
    write_png(tmp_path / "gt" / "a.png", square((8, 8), 1, 1, 4, 4).astype(np.uint8) * 255)
    (tmp_path / "pred").mkdir()
    summary = evaluate_folders(tmp_path / "pred", tmp_path / "gt", tmp_path / "out",
                               progress=False)
    assert summary["n_missing"] == 1 and summary["metrics"]["dice"]["mean"] == 0.0


def test_evaluate_nothing_evaluated_gives_null(tmp_path):
    write_png(tmp_path / "gt" / "a.png", np.zeros((8, 8), np.uint8))
    write_png(tmp_path / "pred" / "a.png", np.zeros((9, 8), np.uint8))
    summary = evaluate_folders(tmp_path / "pred", tmp_path / "gt", tmp_path / "out",
                               progress=False)
    assert summary["n_evaluated"] == 0 and summary["metrics"]["dice"] == {"mean": None, "std": None}
    _strict_json(tmp_path / "out" / "summary.json")


def test_evaluate_missing_folders(tmp_path):
    (tmp_path / "gt").mkdir()
    with pytest.raises(DataError):
        evaluate_folders(tmp_path / "pred", tmp_path / "gt", tmp_path / "out", progress=False)
    write_png(tmp_path / "gt" / "a.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match="not a folder"):
        evaluate_folders(tmp_path / "nope", tmp_path / "gt", tmp_path / "out", progress=False)
