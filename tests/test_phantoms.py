"""Tests for the synthetic phantom generator (mwm.data.phantoms)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from mwm.data.phantoms import (CLASSES, MODALITIES, PROMPTS, SPLITS, _render, generate_phantoms,
                               render_phantom, stratified_split)

SIZE = 64
N = 48

# pycocotools' annToMask trips a numpy-2 DeprecationWarning inside the library
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _read(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None, path
    return img


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _dilate(mask: np.ndarray, radius: int = 3) -> np.ndarray:
    k = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
    return cv2.dilate(mask.astype(np.uint8), k).astype(bool)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for mod in MODALITIES:
        d = tmp_path_factory.mktemp(mod)
        generate_phantoms(d, mod, n=N, size=SIZE, seed=3, workers=1, class_folders=True,
                          progress=False)
        out[mod] = d
    return out


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("kwargs, word", [
    (dict(modality="pet"), "brain-mri"),
    (dict(n=0), "n must"),
    (dict(size=31), "32"),
    (dict(bit_depth=12), "(8, 16)"),
    (dict(seed=-1), "seed"),
    (dict(workers=0), "workers"),
    (dict(split_fractions=(0.5, 0.2, 0.2)), "split_fractions"),
    (dict(split_fractions=(0.7, 0.3)), "split_fractions"),
])
def test_invalid_generate_arguments(tmp_path, kwargs, word):
    with pytest.raises(ValueError, match=re.escape(word)):
        generate_phantoms(tmp_path, **{"n": 4, "size": 32, "progress": False, **kwargs})
    assert not (tmp_path / "labels.csv").exists()


@pytest.mark.parametrize("args", [("ct", 64, 0, 0), ("chest-ct", 16, 0, 0), ("chest-ct", 64, 0, -1)])
def test_invalid_render_arguments(args):
    with pytest.raises(ValueError):
        render_phantom(*args)
    with pytest.raises(ValueError, match="8, 16"):
        render_phantom("chest-ct", 64, 0, 0, bit_depth=10)


# --------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("modality", MODALITIES)
@pytest.mark.parametrize("size", [96, 160])
def test_render_sizes_and_consistency(modality, size):
    for index in range(8):
        ph = render_phantom(modality, size, 1, index)
        assert ph.image.shape == (size, size) and ph.image.dtype == np.uint8
        assert ph.label in CLASSES[modality]
        assert ph.stem == f"{modality}_{index:05d}"
        assert (ph.label == "none") == (len(ph.instance_masks) == 0)
        for m in ph.instance_masks:
            assert m.shape == (size, size) and m.dtype == bool and m.any()
        assert ph.image.std() > 10        # not blank
        assert ph.caption.endswith(".")


def test_render_deterministic_and_16_bit():
    for mod in MODALITIES:
        a = render_phantom(mod, 96, 5, 7)
        b = render_phantom(mod, 96, 5, 7)
        assert np.array_equal(a.image, b.image) and a.caption == b.caption
        assert all(np.array_equal(x, y) for x, y in zip(a.instance_masks, b.instance_masks))
        assert not np.array_equal(a.image, render_phantom(mod, 96, 6, 7).image)
        assert not np.array_equal(a.image, render_phantom(mod, 96, 5, 8).image)
        w = render_phantom(mod, 96, 5, 7, bit_depth=16)
        assert w.image.dtype == np.uint16 and w.image.max() > 20000   # full 16-bit scale
        assert np.abs(w.image / 257.0 - a.image).max() <= 1.0
        assert w.label == a.label and w.caption == a.caption


@pytest.mark.parametrize("modality", MODALITIES)
def test_lesion_area_fraction(modality):
    seen = set()
    for index in range(300):
        ph = render_phantom(modality, 96, 11, index)
        if ph.label == "none":
            continue
        seen.add(ph.label)
        frac = np.logical_or.reduce(ph.instance_masks).mean()
        assert 0.01 <= frac <= 0.15, (ph.label, index, frac)
        assert len(ph.instance_masks) in (1, 2)
    assert seen == set(CLASSES[modality][1:])


@pytest.mark.parametrize("modality", MODALITIES)
def test_anatomy_does_not_depend_on_class(modality):
    """Forcing another class changes pixels only next to that class's lesion."""
    for index in range(12):
        base = _render(modality, 96, 2, index, 8, label="none")
        for label in CLASSES[modality][1:]:
            ph = _render(modality, 96, 2, index, 8, label=label)
            near = _dilate(ph.mask > 0)
            assert np.array_equal(ph.image[~near], base.image[~near]), (label, index)


@pytest.mark.parametrize("modality", MODALITIES)
def test_background_statistics_do_not_reveal_class(modality):
    """Mean intensity outside a (dilated) lesion footprint is alike for every class.

    The same footprints are cut out of the lesion-free images, so that removing, say,
    bright brain tissue under a glioma does not by itself bias the comparison.
    """
    phantoms = [render_phantom(modality, SIZE, 4, i) for i in range(320)]
    none = [ph.image for ph in phantoms if ph.label == "none"]
    for label in CLASSES[modality][1:]:
        lesion = [ph for ph in phantoms if ph.label == label]
        assert len(lesion) > 40 and len(none) > 40
        near = [_dilate(ph.mask > 0) for ph in lesion]
        a = np.array([ph.image[~m].mean() for ph, m in zip(lesion, near)])
        b = np.array([img[~near[i % len(near)]].mean() for i, img in enumerate(none)])
        pooled = np.sqrt((a.var() + b.var()) / 2)
        se = np.sqrt(a.var() / len(a) + b.var() / len(b))
        diff = abs(a.mean() - b.mean())
        assert diff < 0.5 * pooled and diff < 3.5 * se, (label, a.mean(), b.mean(), pooled)


@pytest.mark.parametrize("modality", MODALITIES)
def test_caption_side_matches_lesion_position(modality):
    size = 96
    margin = (0.2 if modality == "brain-mri" else 0.12) * size
    checked = 0
    for index in range(240):
        ph = render_phantom(modality, size, 8, index)
        if len(ph.instance_masks) != 1:
            continue
        ys, xs = np.nonzero(ph.instance_masks[0])
        dx = xs.mean() - (size - 1) / 2
        if abs(dx) < margin:
            continue
        words = set(re.findall(r"[a-z]+", ph.caption.lower()))
        # radiological convention: the patient's left is on the image right
        expected, other = ("left", "right") if dx > 0 else ("right", "left")
        assert expected in words and other not in words, (ph.caption, dx)
        checked += 1
    assert checked >= 20


def test_caption_wording_varies():
    captions = {render_phantom("chest-xray", 64, 0, i).caption.split(" ")[0] for i in range(40)}
    assert len(captions) >= 3


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("modality", MODALITIES)
def test_written_files(datasets, modality):
    d = datasets[modality]
    rows = _rows(d / "labels.csv")
    assert list(rows[0]) == ["image", "label", "mask", "prompt", "split"]
    assert len(rows) == N
    stems = [f"{modality}_{i:05d}" for i in range(N)]
    assert [r["image"] for r in rows] == [f"images/{s}.png" for s in stems]
    assert {r["label"] for r in rows} <= set(CLASSES[modality])
    for r in rows:
        img, mask = _read(d / r["image"]), _read(d / r["mask"])
        assert img.dtype == np.uint8 and img.shape == (SIZE, SIZE)
        assert mask.dtype == np.uint8 and mask.shape == (SIZE, SIZE)
        assert set(np.unique(mask)) <= {0, 255}
        assert (r["label"] == "none") == (not mask.any())
        assert r["prompt"] == PROMPTS[modality]
    caps = _rows(d / "captions.csv")
    assert [c["image"] for c in caps] == [r["image"] for r in rows]
    assert all(len(c["caption"]) > 15 for c in caps)
    prompts = json.loads((d / "prompts.json").read_text())
    assert list(prompts) == stems and set(prompts.values()) == {PROMPTS[modality]}
    meta = json.loads((d / "dataset.json").read_text())
    assert meta["modality"] == modality and meta["n"] == N and meta["size"] == SIZE
    assert meta["classes"] == list(CLASSES[modality]) and meta["bit_depth"] == 8
    assert sum(meta["class_counts"].values()) == N and sum(meta["split_counts"].values()) == N
    assert "intensity" in meta and "orientation" in meta
    # class folders: hard links (or copies) of the images
    for r in rows:
        p = d / "classes" / r["split"] / r["label"] / Path(r["image"]).name
        assert p.read_bytes() == (d / r["image"]).read_bytes()
    assert sum(1 for _ in (d / "classes").rglob("*.png")) == N


@pytest.mark.parametrize("modality", MODALITIES)
def test_coco_instances(datasets, modality):
    from pycocotools.coco import COCO

    d = datasets[modality]
    rows = {Path(r["image"]).stem: r for r in _rows(d / "labels.csv")}
    coco = COCO(str(d / "instances.json"))
    cats = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    assert sorted(cats) == list(range(1, len(CLASSES[modality])))
    assert set(cats.values()) == set(CLASSES[modality][1:])
    assert len(coco.getImgIds()) == N
    for img_id in coco.getImgIds():
        info = coco.loadImgs(img_id)[0]
        stem = Path(info["file_name"]).stem
        assert info["file_name"] == f"{stem}.png" and (d / "images" / info["file_name"]).exists()
        row = rows[stem]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        union = _read(d / row["mask"]) > 0
        assert (len(anns) == 0) == (row["label"] == "none")
        assert len(anns) <= 2
        covered = np.zeros_like(union)
        for ann in anns:
            assert cats[ann["category_id"]] == row["label"] and ann["iscrowd"] == 0
            x, y, w, h = ann["bbox"]
            assert x >= 0 and y >= 0 and x + w <= SIZE and y + h <= SIZE and w > 0 and h > 0
            box = union[y:y + h, x:x + w]
            # the instance (area pixels) lies inside its box, within the union mask
            assert box.sum() >= ann["area"] > 0
            # tight: every edge of the box touches the mask
            assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()
            covered[y:y + h, x:x + w] = True
            seg = coco.annToMask(ann).astype(bool)
            assert seg.any() and not (seg & ~_box_mask(union.shape, x, y, w, h)).any()
            if isinstance(ann["segmentation"], list):
                assert all(len(poly) >= 6 and len(poly) % 2 == 0 for poly in ann["segmentation"])
        assert not (union & ~covered).any()
    # the per-split files hold the same ids
    all_anns = {a["id"]: a for a in coco.dataset["annotations"]}
    seen_imgs = []
    for split in SPLITS:
        part = json.loads((d / f"instances_{split}.json").read_text())
        assert part["categories"] == coco.dataset["categories"]
        for a in part["annotations"]:
            assert all_anns[a["id"]] == a
        names = {im["file_name"] for im in part["images"]}
        assert names == {Path(r["image"]).name for r in rows.values() if r["split"] == split}
        seen_imgs += [im["id"] for im in part["images"]]
    assert sorted(seen_imgs) == sorted(coco.getImgIds())


def _box_mask(shape, x, y, w, h) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[y:y + h, x:x + w] = True
    return m


@pytest.mark.parametrize("modality", MODALITIES)
def test_splits_stratified_disjoint_covering(datasets, modality):
    d = datasets[modality]
    rows = _rows(d / "labels.csv")
    splits = json.loads((d / "splits.json").read_text())
    assert list(splits) == list(SPLITS)
    stems = [Path(r["image"]).stem for r in rows]
    flat = [s for part in splits.values() for s in part]
    assert sorted(flat) == sorted(stems) and len(flat) == len(set(flat))
    for split, part in splits.items():
        assert part, split
        assert {Path(r["image"]).stem for r in rows if r["split"] == split} == set(part)
    for label in CLASSES[modality]:
        cls = [r for r in rows if r["label"] == label]
        for split, frac in zip(SPLITS, (0.7, 0.15, 0.15)):
            got = sum(r["split"] == split for r in cls)
            assert abs(got - frac * len(cls)) <= 1.0, (label, split, got, len(cls))


def test_stratified_split_small_and_seeded():
    labels = ["a", "b", "a", "c", "b", "a"]
    s1 = stratified_split(labels, (0.7, 0.15, 0.15), 0)
    assert s1 == stratified_split(labels, (0.7, 0.15, 0.15), 0)
    assert set(s1) == set(SPLITS)
    assert stratified_split(["a"], (0.7, 0.15, 0.15), 0) == ["train"]
    assert set(stratified_split(labels * 5, (1.0, 0.0, 0.0), 0)) == {"train"}


# --------------------------------------------------------------------------- determinism


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_generation_identical_for_any_workers_and_n(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate_phantoms(a, "chest-ct", n=24, size=SIZE, seed=9, workers=1, progress=False)
    generate_phantoms(b, "chest-ct", n=24, size=SIZE, seed=9, workers=2, progress=False)
    fa, fb = _files(a), _files(b)
    assert fa == fb
    generate_phantoms(c, "chest-ct", n=10, size=SIZE, seed=9, workers=2, progress=False)
    fc = _files(c)
    for i in range(10):
        name = f"images/chest-ct_{i:05d}.png"
        assert fc[name] == fa[name]
        assert fc[name.replace("images", "masks")] == fa[name.replace("images", "masks")]
    # another seed gives other images
    generate_phantoms(c, "chest-ct", n=10, size=SIZE, seed=10, workers=1, progress=False)
    assert _files(c)["images/chest-ct_00000.png"] != fa["images/chest-ct_00000.png"]
    # a smaller run into the same folder leaves no stale images behind
    generate_phantoms(a, "chest-ct", n=5, size=SIZE, seed=9, workers=1, progress=False)
    assert len(list((a / "images").glob("*.png"))) == 5
    assert len(list((a / "masks").glob("*.png"))) == 5
    assert len(_rows(a / "labels.csv")) == 5


def test_sixteen_bit_dataset(tmp_path):
    s = generate_phantoms(tmp_path, "brain-mri", n=6, size=48, seed=0, bit_depth=16,
                          workers=1, progress=False)
    assert s.n == 6 and s.size == 48 and sum(s.class_counts.values()) == 6
    for p in sorted((tmp_path / "images").glob("*.png")):
        img = _read(p)
        assert img.dtype == np.uint16 and img.shape == (48, 48) and img.max() > 20000
    for p in sorted((tmp_path / "masks").glob("*.png")):
        assert _read(p).dtype == np.uint8
    assert "65535" in json.loads((tmp_path / "dataset.json").read_text())["intensity"]
