"""Synthetic "phantom" datasets: brain MRI, chest CT and chest X-ray look-alikes with lesions.

A phantom dataset is a small, fully synthetic, labelled dataset that exercises every
part of MWM (classification, segmentation, detection, text prompts) without real
patient data. :func:`generate_phantoms` writes one; :func:`render_phantom` draws one
sample in memory.

Modalities and classes
----------------------
========== ============================================================================
modality   classes (``none`` = no lesion) and what tells them apart
========== ============================================================================
brain-mri  ``glioma`` — irregular lobulated intra-axial mass inside one hemisphere, bright
           heterogeneous rim around a dark necrotic core;
           ``meningioma`` — round/ovoid homogeneous bright extra-axial mass whose base
           touches the inner table of the skull;
           ``pituitary`` — small round moderately bright mass at the midline just below
           the image centre (sellar region).
chest-ct   ``nodule`` — small round solid soft-tissue nodule inside a lung;
           ``mass`` — larger lobulated solid mass with spiculated margins inside a lung;
           ``ground-glass`` — large faint hazy area inside a lung, vessels still visible.
chest-xray ``nodule`` — small round well-defined opacity anywhere in a lung;
           ``mass`` — larger dense round opacity in the upper half of a lung;
           ``consolidation`` — large patchy hazy opacity with air bronchograms in the
           lower part of a lung.
========== ============================================================================

The class of each sample is drawn **uniformly at random** from its own random generator
(``none`` included), so class counts vary slightly around ``n / 4``. A lesion image
usually has one lesion, sometimes (15 %) two of the same class (not for ``pituitary``
nor chest ``mass``); all lesions together cover 1.3-10 % of the image (always within
1-15 %).

The class depends on the lesion only: the anatomy, pose, bias field and noise come from
random streams that are independent of the class, and a lesion changes pixels only
within its mask (see :mod:`mwm.data.anatomy`), so a classifier cannot take a shortcut
through the rest of the image.

Determinism
-----------
Sample ``index`` of ``(modality, seed)`` is drawn from
``np.random.SeedSequence([seed, crc32(modality), index])`` (spawned into independent
streams for anatomy, class, lesion, acquisition and caption), so it is identical for
any ``n``, any number of workers and any run. Output files contain no timestamps: the
same arguments produce byte-identical files.

Conventions
-----------
* Orientation: radiological. The patient's **left is on the image right**; anterior is
  at the top of the axial slices (brain MRI, chest CT); the chest radiograph is a PA
  view with the head at the top. Captions name the patient's side, derived from each
  lesion's centroid in the final image.
* Intensity: the generator works with intensities in ``[0, 1]`` (brighter = higher
  signal / attenuation). 8-bit images store ``round(x * 255)``; 16-bit images use the
  **full 16-bit scale**, ``round(x * 65535)``, so ``image16 / 257 ~= image8``.
* Masks: ``masks/<stem>.png`` is uint8 0/255, the union of the lesion masks (all zeros for
  ``none``). Each instance mask is the lesion's footprint: the lesion's intensity was
  drawn only inside it (up to one pixel of interpolation at its edge).

Files written into ``out_dir``
------------------------------
``images/<stem>.png``, ``masks/<stem>.png`` (stems ``<modality>_00042``), ``labels.csv``
(``image,label,mask,prompt,split`` — MWM's CSV manifest), ``captions.csv``
(``image,caption``), ``prompts.json`` (``{stem: prompt}``), ``splits.json``,
``instances.json`` plus ``instances_{train,val,test}.json`` (COCO; ``file_name`` is
``<stem>.png`` relative to ``images/``; image ids are ``index + 1``; categories are the
lesion classes, ids from 1), ``dataset.json`` (parameters, counts, conventions) and, with
``class_folders=True``, ``classes/<split>/<class>/<stem>.png`` (hard links to the images
where the file system allows, else copies). Stale generator files (``<modality>_NNNNN.png``
of a previous, larger run) in ``images/``, ``masks/`` and ``classes/`` are removed so that
the folders always match the manifests.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import re
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from mwm.files import (atomic_path, safe_child, write_bytes, write_csv, write_json, write_png,
                       write_text)
from mwm.progress import progress as _progress

from . import anatomy as _anat

GENERATOR_VERSION = "1.0"

MODALITIES = ("brain-mri", "chest-ct", "chest-xray")
CLASSES: dict[str, tuple[str, ...]] = {
    "brain-mri": ("none", "glioma", "meningioma", "pituitary"),
    "chest-ct": ("none", "nodule", "mass", "ground-glass"),
    "chest-xray": ("none", "nodule", "mass", "consolidation"),
}
PROMPTS: dict[str, str] = {
    "brain-mri": "brain tumor",
    "chest-ct": "lung nodule",
    "chest-xray": "lung lesion",
}
SPLITS = ("train", "val", "test")
BIT_DEPTHS = (8, 16)
MIN_SIZE = 32
MIN_LESION_FRACTION = 0.01
MAX_LESION_FRACTION = 0.15
INTENSITY_CONVENTION = {
    8: "uint8, value = round(x * 255) for intensity x in [0, 1]",
    16: "uint16 on the full 16-bit scale, value = round(x * 65535) for intensity x in [0, 1]",
}
ORIENTATION = ("radiological: patient's left on the image right; anterior at the top "
               "(axial MRI/CT); PA chest radiograph with the head at the top")

_TAGS = {m: zlib.crc32(m.encode("ascii")) for m in MODALITIES}
_SPLIT_TAG = zlib.crc32(b"mwm-phantom-split")
_STEM_RE = re.compile(r"^(?:%s)_\d{5,}\.png$" % "|".join(re.escape(m) for m in MODALITIES))


@dataclass
class Phantom:
    """One rendered sample."""

    image: np.ndarray                 # uint8 or uint16 (H, W)
    instance_masks: list[np.ndarray]  # bool (H, W), one per lesion; empty for "none"
    label: str
    caption: str
    stem: str
    modality: str = ""
    index: int = 0

    @property
    def mask(self) -> np.ndarray:
        """Union of the instance masks as uint8 0/255."""
        union = np.zeros(self.image.shape, np.uint8)
        for m in self.instance_masks:
            union[m] = 255
        return union

    @property
    def prompt(self) -> str:
        return PROMPTS[self.modality]


@dataclass
class PhantomSummary:
    out_dir: Path
    modality: str
    n: int
    size: int
    seed: int
    class_counts: dict[str, int]
    split_counts: dict[str, int]
    seconds: float
    bit_depth: int = 8
    workers: int = 1

    @property
    def images_per_second(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else float("inf")


# --------------------------------------------------------------------------- validation


def _check_common(modality, size, bit_depth) -> None:
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; valid: {', '.join(MODALITIES)}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise ValueError(f"size must be an integer >= {MIN_SIZE}, got {size!r}")
    if bit_depth not in BIT_DEPTHS or isinstance(bit_depth, bool):
        raise ValueError(f"bit_depth must be one of {BIT_DEPTHS}, got {bit_depth!r}")


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_fractions(fractions) -> tuple[float, float, float]:
    try:
        fr = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        raise ValueError(f"split_fractions must be three numbers (train, val, test), "
                         f"got {fractions!r}") from None
    if len(fr) != 3 or any(not math.isfinite(f) or f < 0 for f in fr) or fr[0] <= 0 \
            or abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(f"split_fractions must be three non-negative numbers (train, val, "
                         f"test) summing to 1 with train > 0, got {fractions!r}")
    return fr  # type: ignore[return-value]


# --------------------------------------------------------------------------- rendering


def _streams(modality: str, seed: int, index: int) -> list[np.random.Generator]:
    """Independent generators: anatomy, class, lesion, acquisition, caption."""
    ss = np.random.SeedSequence([seed, _TAGS[modality], index])
    return [np.random.default_rng(s) for s in ss.spawn(5)]


def _stem(modality: str, index: int, width: int = 5) -> str:
    return f"{modality}_{index:0{width}d}"


def render_phantom(modality: str, size: int, seed: int, index: int,
                   bit_depth: int = 8) -> Phantom:
    """Render sample ``index`` of the ``(modality, seed)`` phantom series, in memory.

    Pure: no files, no global state; the same arguments always give the same sample.
    """
    _check_common(modality, size, bit_depth)
    seed = _check_int("seed", seed, 0)
    index = _check_int("index", index, 0)
    return _render(modality, int(size), seed, index, bit_depth)


def _render(modality: str, size: int, seed: int, index: int, bit_depth: int,
            label: str | None = None, width: int = 5) -> Phantom:
    """Render one sample; ``label`` forces the class (tests use it to show the anatomy
    does not depend on the class)."""
    r_anat, r_class, r_lesion, r_acq, r_text = _streams(modality, seed, index)
    anat = _anat.ANATOMY[modality](r_anat, size)
    classes = CLASSES[modality]
    drawn = classes[int(r_class.integers(len(classes)))]
    label = drawn if label is None else label
    if label not in classes:
        raise ValueError(f"unknown class {label!r} for {modality}; valid: {', '.join(classes)}")
    matrix = anat.warp_matrix(size)
    canonical = anat.image
    masks: list[np.ndarray] = []
    centers: list[tuple[float, float]] = []
    if label != "none":
        for _attempt in range(6):
            canonical, lesions = _anat.draw_lesions(r_lesion, modality, label, anat, size)
            masks, centers = [], []
            for les in lesions:
                m = cv2.warpAffine(les.mask.astype(np.float32), matrix, (size, size),
                                   flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                                   borderValue=0.0) >= 0.5
                if m.any():
                    masks.append(m)
            if masks:
                frac = np.logical_or.reduce(masks).sum() / float(size * size)
                if MIN_LESION_FRACTION <= frac <= MAX_LESION_FRACTION:
                    break
        if not masks:  # pragma: no cover - would be a bug in the lesion painters
            raise RuntimeError(f"could not place a {label} lesion in {modality} sample {index}")
        for m in masks:
            ys, xs = np.nonzero(m)
            centers.append(tuple(anat.to_canonical(np.array([xs.mean(), ys.mean()]), size)))
    img = cv2.warpAffine(canonical, matrix, (size, size), flags=cv2.INTER_LINEAR,
                         borderMode=anat.border, borderValue=anat.border_value)
    x = _anat.acquire(r_acq, modality, img)
    if bit_depth == 8:
        image = (x * 255.0 + 0.5).astype(np.uint8)
    else:
        image = (x * 65535.0 + 0.5).astype(np.uint16)
    caption = _caption(r_text, modality, label, centers, anat)
    return Phantom(image, masks, label, caption, _stem(modality, index, width), modality, index)


# --------------------------------------------------------------------------- captions

_MODALITY_WORDS = {
    "brain-mri": ["Axial T1-weighted brain MRI", "Axial contrast-enhanced T1 MRI of the brain",
                  "Post-contrast axial brain MRI", "Axial MR image of the brain"],
    "chest-ct": ["Axial chest CT", "Axial CT image of the chest", "Contrast-enhanced chest CT",
                 "Axial computed tomography of the thorax"],
    "chest-xray": ["Frontal chest radiograph", "PA chest X-ray", "Posteroanterior chest radiograph",
                   "Frontal chest X-ray"],
}
_NONE = {
    "brain-mri": ["Axial T1-weighted brain MRI without focal lesion.",
                  "Brain MRI with no mass or abnormal enhancement.",
                  "Normal axial brain MRI; ventricles and midline structures are unremarkable.",
                  "Unremarkable axial MR image of the brain, no focal abnormality."],
    "chest-ct": ["Axial chest CT with clear lungs and no nodule or mass.",
                 "Chest CT without focal pulmonary lesion.",
                 "Normal axial CT of the chest; the lungs are clear.",
                 "Unremarkable chest CT slice, no pulmonary nodule, mass or opacity."],
    "chest-xray": ["Frontal chest radiograph with clear lungs.",
                   "PA chest X-ray without focal opacity.",
                   "Normal frontal chest radiograph; no nodule, mass or consolidation.",
                   "Unremarkable chest X-ray, lungs clear."],
}
# per class: (descriptions, plural descriptions, diagnoses, plural diagnoses)
_FINDINGS = {
    ("brain-mri", "glioma"): (
        ["an irregular heterogeneously enhancing mass with a necrotic center",
         "a lobulated ring-enhancing intra-axial lesion with central necrosis",
         "an ill-defined heterogeneous intra-axial mass"],
        ["two irregular ring-enhancing intra-axial lesions",
         "two heterogeneous lobulated intra-axial masses"],
        ["high-grade glioma", "a glioma", "a glial neoplasm"],
        ["multifocal glioma", "multifocal high-grade glioma"]),
    ("brain-mri", "meningioma"): (
        ["a round homogeneously enhancing extra-axial mass",
         "a well-circumscribed dural-based mass",
         "an ovoid extra-axial lesion with homogeneous enhancement"],
        ["two round homogeneously enhancing extra-axial masses",
         "two well-circumscribed dural-based lesions"],
        ["meningioma", "a meningioma", "an extra-axial meningioma"],
        ["multiple meningiomas", "meningiomas"]),
    ("brain-mri", "pituitary"): (
        ["a small round enhancing lesion", "a small well-defined mass",
         "a rounded moderately enhancing nodule"],
        ["two small round enhancing lesions"],
        ["pituitary adenoma", "a pituitary macroadenoma", "a pituitary tumor"],
        ["pituitary adenomas"]),
    ("chest-ct", "nodule"): (
        ["a small round solid pulmonary nodule", "a well-circumscribed solid nodule",
         "a small rounded soft-tissue nodule"],
        ["two small solid pulmonary nodules", "two well-circumscribed solid nodules"],
        ["a pulmonary nodule", "a solitary pulmonary nodule", "a solid lung nodule"],
        ["multiple pulmonary nodules", "pulmonary nodules"]),
    ("chest-ct", "mass"): (
        ["an irregular spiculated mass", "a large lobulated mass with spiculated margins",
         "a spiculated soft-tissue mass"],
        ["two spiculated masses"],
        ["a lung mass suspicious for malignancy", "primary lung cancer",
         "bronchogenic carcinoma"],
        ["synchronous lung cancers"]),
    ("chest-ct", "ground-glass"): (
        ["a hazy ground-glass opacity", "an ill-defined area of ground-glass attenuation",
         "a patchy ground-glass opacity with preserved vessels"],
        ["two hazy ground-glass opacities", "two patchy areas of ground-glass attenuation"],
        ["ground-glass opacity", "an inflammatory or infectious process",
         "a ground-glass lesion"],
        ["multifocal ground-glass opacities", "multifocal inflammation"]),
    ("chest-xray", "nodule"): (
        ["a small round opacity", "a well-defined pulmonary nodule",
         "a small rounded nodular opacity"],
        ["two small round opacities", "two well-defined nodular opacities"],
        ["a pulmonary nodule", "a solitary lung nodule", "a nodule"],
        ["multiple pulmonary nodules", "pulmonary nodules"]),
    ("chest-xray", "mass"): (
        ["a large dense rounded opacity", "a well-defined dense mass",
         "a large round soft-tissue density"],
        ["two large dense opacities"],
        ["a lung mass", "a pulmonary mass", "bronchogenic carcinoma"],
        ["lung masses"]),
    ("chest-xray", "consolidation"): (
        ["a patchy hazy airspace opacity", "an ill-defined consolidation with air bronchograms",
         "a confluent airspace opacity"],
        ["two patchy airspace opacities", "patchy consolidations"],
        ["pneumonia", "lobar pneumonia", "consolidation"],
        ["multifocal pneumonia", "multilobar pneumonia"]),
}
_TEMPLATES = [
    "{mod} showing {desc} {loc}, consistent with {dx}.",
    "{mod} demonstrates {desc} {loc}; findings suggest {dx}.",
    "{desc_cap} {loc} on {mod_l}, compatible with {dx}.",
    "{mod}: {desc} {loc}, most likely {dx}.",
]


def _side(u: float, dead: float) -> str | None:
    """Patient side from the canonical column (radiological: image right = patient left)."""
    if u > dead:
        return "left"
    if u < -dead:
        return "right"
    return None


def _location(modality: str, label: str, uv: tuple[float, float], anat, rng) -> str:
    u, v = uv
    if modality == "brain-mri":
        if label == "pituitary":
            return str(rng.choice(["in the sellar region at the midline",
                                   "in the midline sellar region",
                                   "at the midline in the region of the sella"]))
        lobe = ("frontal" if v < -0.3 else "occipital" if v > 0.38
                else "temporal" if abs(u) > 0.45 else "parietal")
        side = _side(u, 0.1)
        if label == "meningioma":
            if side is None:
                return f"along the {'anterior' if v < 0 else 'posterior'} falx at the midline"
            return f"along the {side} {lobe} convexity"
        if side is None:
            return f"in the {lobe} lobe near the midline"
        return f"in the {side} {lobe} lobe"
    side = "left" if u > 0 else "right"
    if modality == "chest-ct":
        if v < -0.2:
            part = "anterior"
        elif v > 0.2:
            part = "posterior"
        else:
            part = "peripheral" if abs(u) > 0.45 else "central"
        return f"in the {part} {side} lung"
    lv, av = anat.info["lv"], anat.info["av"]
    rel = (v - (lv - av)) / (2 * av)
    zone = "upper" if rel < 0.38 else "mid" if rel < 0.62 else "lower"
    return f"in the {side} {zone} zone"


def _caption(rng: np.random.Generator, modality: str, label: str,
             centers: Sequence[tuple[float, float]], anat) -> str:
    if label == "none":
        return str(rng.choice(_NONE[modality]))
    desc1, desc2, dx1, dx2 = _FINDINGS[(modality, label)]
    plural = len(centers) > 1
    desc = str(rng.choice(desc2 if plural else desc1))
    dx = str(rng.choice(dx2 if plural else dx1))
    locs: list[str] = []
    for c in centers:
        loc = _location(modality, label, c, anat, rng)
        if loc not in locs:
            locs.append(loc)
    loc = locs[0] if len(locs) == 1 else locs[0] + " and " + locs[1].replace("in the ", "the ", 1)
    mod = str(rng.choice(_MODALITY_WORDS[modality]))
    template = str(rng.choice(_TEMPLATES))
    return template.format(mod=mod, mod_l=mod[0].lower() + mod[1:], desc=desc,
                           desc_cap=desc[0].upper() + desc[1:], loc=loc, dx=dx)


# --------------------------------------------------------------------------- COCO


def coco_instance(mask: np.ndarray) -> dict:
    """bbox [x, y, w, h], area and segmentation (polygons, or RLE when degenerate)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    bbox = [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
    m8 = mask.astype(np.uint8)
    contours, _ = cv2.findContours(m8, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for c in contours:
        if len(c) < 3 or cv2.contourArea(c) <= 0:
            polygons = []
            break
        polygons.append([int(p) for p in c.reshape(-1)])
    if polygons:
        segmentation: list | dict = polygons
    else:
        from pycocotools import mask as mask_utils

        rle = mask_utils.encode(np.asfortranarray(m8))
        segmentation = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
    return {"bbox": bbox, "area": int(m8.sum()), "segmentation": segmentation}


def _coco(modality: str, size: int, records: list[dict], keep: set[int] | None) -> dict:
    classes = CLASSES[modality]
    categories = [{"id": i, "name": c, "supercategory": modality}
                  for i, c in enumerate(classes[1:], start=1)]
    cat_id = {c["name"]: c["id"] for c in categories}
    images, annotations = [], []
    for rec in records:
        if keep is not None and rec["index"] not in keep:
            continue
        images.append({"id": rec["index"] + 1, "file_name": rec["stem"] + ".png",
                       "width": size, "height": size})
        for ann_id, inst in zip(rec["ann_ids"], rec["instances"]):
            annotations.append({"id": ann_id, "image_id": rec["index"] + 1,
                                "category_id": cat_id[rec["label"]], "bbox": inst["bbox"],
                                "area": inst["area"], "segmentation": inst["segmentation"],
                                "iscrowd": 0})
    return {"info": {"description": f"MWM synthetic {modality} phantoms",
                     "version": GENERATOR_VERSION},
            "images": images, "annotations": annotations, "categories": categories}


# --------------------------------------------------------------------------- splits


def stratified_split(labels: Sequence[str], fractions: Sequence[float], seed: int,
                     modality: str = "") -> list[str]:
    """Seeded per-class split; every split with a positive fraction gets at least one image
    when there are enough images."""
    fr = np.asarray(fractions, dtype=float)
    rng = np.random.default_rng([seed, _SPLIT_TAG, _TAGS.get(modality, 0)])
    out = [""] * len(labels)
    by_class: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        by_class.setdefault(lab, []).append(i)
    assigned: dict[str, dict[str, list[int]]] = {}
    for lab in sorted(by_class):
        idx = np.asarray(by_class[lab])
        idx = idx[rng.permutation(idx.size)]
        exact = fr * idx.size
        counts = np.floor(exact).astype(int)
        # largest remainders first; ties broken at random so no split is favoured
        order = np.lexsort((rng.random(len(fr)), -(exact - counts)))
        for j in order[: idx.size - counts.sum()]:
            counts[j] += 1
        bounds = np.concatenate([[0], np.cumsum(counts)])
        assigned[lab] = {s: list(idx[bounds[j]:bounds[j + 1]]) for j, s in enumerate(SPLITS)}
    # make every split with a positive fraction non-empty when possible
    wanted = [s for s, f in zip(SPLITS, fr) if f > 0]
    for s in wanted:
        if any(assigned[lab][s] for lab in assigned) or len(labels) < len(wanted):
            continue
        lab, donor = max(((lab, d) for lab in sorted(assigned) for d in wanted if d != s),
                         key=lambda t: len(assigned[t[0]][t[1]]))
        if len(assigned[lab][donor]) <= 1:
            continue
        assigned[lab][s].append(assigned[lab][donor].pop())
    for lab, parts in assigned.items():
        for s, idxs in parts.items():
            for i in idxs:
                out[int(i)] = s
    return out


# --------------------------------------------------------------------------- workers

_CONFIG: tuple | None = None


def _init_worker(config: tuple) -> None:
    global _CONFIG
    _CONFIG = config
    cv2.setNumThreads(1)


def _work(index: int) -> tuple:
    assert _CONFIG is not None
    return _produce(_CONFIG, index)


def _produce(config: tuple, index: int) -> tuple:
    modality, size, seed, bit_depth, out_dir, width = config
    ph = _render(modality, size, seed, index, bit_depth, width=width)
    write_png(safe_child(out_dir, f"images/{ph.stem}.png"), ph.image)
    write_png(safe_child(out_dir, f"masks/{ph.stem}.png"), ph.mask)
    instances = [coco_instance(m) for m in ph.instance_masks]
    return ph.stem, ph.label, ph.caption, instances


def _mp_context():
    methods = mp.get_all_start_methods()
    # forkserver/spawn: safe even when the parent already runs threads (torch, OpenCV)
    return mp.get_context("forkserver" if "forkserver" in methods else "spawn")


# --------------------------------------------------------------------------- generation


def generate_phantoms(out_dir, modality: str = "brain-mri", n: int = 200, size: int = 128,
                      seed: int = 0, *, bit_depth: int = 8, workers: int | None = None,
                      class_folders: bool = False,
                      split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
                      progress: bool = True) -> PhantomSummary:
    """Write a phantom dataset of ``n`` images into ``out_dir`` (see the module docstring).

    ``workers`` processes render and write the images (default ``os.cpu_count()``;
    ``1`` renders in this process); the result does not depend on it.
    """
    t0 = time.perf_counter()
    _check_common(modality, size, bit_depth)
    n = _check_int("n", n, 1)
    size = int(size)
    seed = _check_int("seed", seed, 0)
    fractions = _check_fractions(split_fractions)
    if workers is None:
        workers = os.cpu_count() or 1
    workers = _check_int("workers", workers, 1)
    workers = min(workers, n)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    for sub in ("images", "masks"):
        (out / sub).mkdir(exist_ok=True)
    width = max(5, len(str(n - 1)))
    config = (modality, size, seed, bit_depth, str(out), width)
    bar = dict(total=n, desc=f"phantoms {modality}", unit="img", enabled=progress)
    if workers == 1:
        results = list(_progress((_produce(config, i) for i in range(n)), **bar))
    else:
        chunk = max(1, min(64, n // (workers * 8)))
        with _mp_context().Pool(workers, initializer=_init_worker, initargs=(config,)) as pool:
            results = list(_progress(pool.imap(_work, range(n), chunksize=chunk), **bar))

    stems = [r[0] for r in results]
    labels = [r[1] for r in results]
    splits = stratified_split(labels, fractions, seed, modality)
    prompt = PROMPTS[modality]
    records, next_ann = [], 1
    for i, (stem, label, caption, instances) in enumerate(results):
        ids = list(range(next_ann, next_ann + len(instances)))
        next_ann += len(instances)
        records.append({"index": i, "stem": stem, "label": label, "caption": caption,
                        "instances": instances, "ann_ids": ids, "split": splits[i]})

    write_csv(out / "labels.csv",
              ({"image": f"images/{r['stem']}.png", "label": r["label"],
                "mask": f"masks/{r['stem']}.png", "prompt": prompt, "split": r["split"]}
               for r in records), ("image", "label", "mask", "prompt", "split"))
    write_csv(out / "captions.csv",
              ({"image": f"images/{r['stem']}.png", "caption": r["caption"]} for r in records),
              ("image", "caption"))
    write_json(out / "prompts.json", {s: prompt for s in stems})
    split_map = {s: [r["stem"] for r in records if r["split"] == s] for s in SPLITS}
    write_json(out / "splits.json", split_map)
    # COCO files are written compactly (one line): polygons make indented JSON huge
    write_text(out / "instances.json", _compact(_coco(modality, size, records, None)))
    for s in SPLITS:
        keep = {r["index"] for r in records if r["split"] == s}
        write_text(out / f"instances_{s}.json", _compact(_coco(modality, size, records, keep)))

    classes = CLASSES[modality]
    class_counts = {c: labels.count(c) for c in classes}
    split_counts = {s: len(split_map[s]) for s in SPLITS}
    write_json(out / "dataset.json", {
        "name": f"mwm-phantoms-{modality}",
        "generator": "mwm.data.phantoms",
        "generator_version": GENERATOR_VERSION,
        "modality": modality, "n": n, "size": size, "seed": seed, "bit_depth": bit_depth,
        "classes": list(classes), "lesion_classes": list(classes[1:]),
        "class_sampling": "uniform random per sample (including none)",
        "prompt": prompt,
        "class_counts": class_counts, "split_counts": split_counts,
        "split_fractions": list(fractions),
        "intensity": INTENSITY_CONVENTION[bit_depth],
        "orientation": ORIENTATION,
        "files": {"images": "images/<stem>.png", "masks": "masks/<stem>.png (uint8 0/255, lesion union)",
                  "manifest": "labels.csv", "captions": "captions.csv", "prompts": "prompts.json",
                  "splits": "splits.json",
                  "coco": "instances.json, instances_<split>.json (file_name relative to images/)",
                  "class_folders": "classes/<split>/<class>/<stem>.png" if class_folders else None},
    })

    keep_names = {f"{s}.png" for s in stems}
    _remove_stale(out / "images", keep_names)
    _remove_stale(out / "masks", keep_names)
    if class_folders:
        wanted = {(r["split"], r["label"], r["stem"] + ".png") for r in records}
        _remove_stale_classes(out / "classes", wanted)
        for r in records:
            src = out / "images" / f"{r['stem']}.png"
            dst = safe_child(out, f"classes/{r['split']}/{r['label']}/{r['stem']}.png")
            _link_or_copy(src, dst)
    elif (out / "classes").is_dir():
        _remove_stale_classes(out / "classes", set())

    return PhantomSummary(out, modality, n, size, seed, class_counts, split_counts,
                          time.perf_counter() - t0, bit_depth, workers)


def _compact(obj) -> str:
    return json.dumps(obj, separators=(",", ":")) + "\n"


def _remove_stale(folder: Path, keep: set[str]) -> None:
    if not folder.is_dir():
        return
    for entry in os.scandir(folder):
        if entry.is_file() and _STEM_RE.match(entry.name) and entry.name not in keep:
            os.unlink(entry.path)


def _remove_stale_classes(root: Path, keep: set[tuple[str, str, str]]) -> None:
    if not root.is_dir():
        return
    for split_dir in root.iterdir():
        if not split_dir.is_dir():
            continue
        for class_dir in split_dir.iterdir():
            if not class_dir.is_dir():
                continue
            for entry in os.scandir(class_dir):
                if (entry.is_file() and _STEM_RE.match(entry.name)
                        and (split_dir.name, class_dir.name, entry.name) not in keep):
                    os.unlink(entry.path)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` atomically (copy where links are not possible)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        if dst.exists() and os.path.samefile(src, dst):
            return
    except OSError:
        pass
    try:
        with atomic_path(dst) as tmp:
            tmp.unlink()
            os.link(src, tmp)
    except OSError:
        write_bytes(dst, src.read_bytes())
