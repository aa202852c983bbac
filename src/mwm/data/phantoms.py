"""Synthetic "phantom" datasets: brain MRI, chest CT and chest X-ray look-alikes with lesions.

A phantom dataset is a small, fully synthetic, labelled dataset that exercises every
part of MWM (classification, segmentation, detection, text prompts) without real
patient data. :func:`generate_phantoms` writes one; :func:`render_phantom` draws one
sample in memory. The class of a sample depends on its lesion only (anatomy, pose, bias
field and noise come from independent random streams; :mod:`mwm.data.anatomy`); sample
``index`` of ``(modality, seed)`` is the same for any ``n``, number of workers and run,
and the same arguments write byte-identical files.

``findings="multi"`` adds, from random streams of their own, other findings present
independently and named anatomy, each with its own mask (:mod:`mwm.data.findings`).

The classes, the conventions (radiological orientation, intensity scales, masks) and the
files written are described in ``docs/phantoms.md``.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import re
import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from ..config import opt
from .findings import (FINDING_CAPTION_COLUMNS, FINDING_CAPTIONS_FILE, FINDING_MODES, FINDINGS,
                       FINDINGS_COLUMNS, FINDINGS_FILE,
                       MAX_EXTRA, PRESENCE_PROBABILITY, Finding, FindingMaps, check_findings,
                       draw_findings, finding_names, presence_rates)
from .phantom_captions import finding_caption, multi_caption, phantom_caption
from .phantom_coco import coco_dataset, coco_instance
from .phantom_files import clean_up

from mwm.files import safe_child, write_csv, write_json, write_png, write_text
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
DEFAULT_N, DEFAULT_SIZE = 200, 128
MIN_SIZE = 32
MIN_LESION_FRACTION = 0.01
MAX_LESION_FRACTION = 0.15
INTENSITY_CONVENTION = {
    8: "uint8, value = round(x * 255) for intensity x in [0, 1]",
    16: "uint16 on the full 16-bit scale, value = round(x * 65535) for intensity x in [0, 1]",
}
ORIENTATION = ("radiological: patient's left on the image right; anterior at the top "
               "(axial MRI/CT); PA chest radiograph with the head at the top")

_STEM_RE = re.compile(r"^(?:%s)_\d{5,}\.png$" % "|".join(re.escape(m) for m in MODALITIES))
_TAGS = {m: zlib.crc32(m.encode("ascii")) for m in MODALITIES}
_SPLIT_TAG = zlib.crc32(b"mwm-phantom-split")
_FINDINGS_TAG = zlib.crc32(b"mwm-phantom-findings")


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
    # multi-finding samples only (findings="multi"): every finding's final-frame mask
    # (bool, empty when absent) and a caption naming each present finding alone
    finding_masks: dict[str, np.ndarray] = field(default_factory=dict)
    finding_captions: dict[str, str] = field(default_factory=dict)

    @property
    def present(self) -> dict[str, bool]:
        return {name: bool(m.any()) for name, m in self.finding_masks.items()}

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


def _finding_streams(modality: str, seed: int, index: int) -> tuple:
    """Streams of the multi-finding additions, independent of the five above (their own
    entropy, so a single-finding sample is untouched): presence, caption, and per finding
    one for drawing it and one for its finding caption."""
    names = finding_names(modality)
    ss = np.random.SeedSequence([seed, _TAGS[modality], index, _FINDINGS_TAG])
    rngs = [np.random.default_rng(s) for s in ss.spawn(2 + 2 * len(names))]
    draw = dict(zip(names, rngs[2:2 + len(names)]))
    text = dict(zip(names, rngs[2 + len(names):]))
    return rngs[0], rngs[1], draw, text


def _stem(modality: str, index: int, width: int = 5) -> str:
    return f"{modality}_{index:0{width}d}"


def render_phantom(modality: str, size: int, seed: int, index: int,
                   bit_depth: int = 8, findings: str = FINDING_MODES[0]) -> Phantom:
    """Render sample ``index`` of the ``(modality, seed)`` phantom series, in memory.

    Pure: no files, no global state; the same arguments always give the same sample.
    ``findings="multi"`` adds the other findings of :mod:`mwm.data.findings` (the image
    is the single-finding one apart from their pixels).
    """
    _check_common(modality, size, bit_depth)
    check_findings(findings)
    seed = _check_int("seed", seed, 0)
    index = _check_int("index", index, 0)
    return _render(modality, int(size), seed, index, bit_depth, findings=findings)


def _render(modality: str, size: int, seed: int, index: int, bit_depth: int,
            label: str | None = None, width: int = 5, findings: str = FINDING_MODES[0],
            extras: Sequence[str] | None = None) -> Phantom:
    """Render one sample; ``label`` forces the class (tests use it to show the anatomy
    does not depend on the class), ``extras`` the extra findings of a multi-finding
    sample (tests use it to show each finding's pixels stay in its mask)."""
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
    lesions: list = []
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
    multi = None
    if findings == "multi":
        r_presence, r_caption, r_draw, r_finding_text = _finding_streams(modality, seed, index)
        multi = draw_findings(modality, anat, label, lesions, masks, centers, canonical,
                              matrix, img, r_presence, r_draw, extras)
        img = multi.image
    x = _anat.acquire(r_acq, modality, img)
    if bit_depth == 8:
        image = (x * 255.0 + 0.5).astype(np.uint8)
    else:
        image = (x * 65535.0 + 0.5).astype(np.uint16)
    caption = phantom_caption(r_text, modality, label, centers, anat)
    ph = Phantom(image, masks, label, caption, _stem(modality, index, width), modality, index)
    if multi is not None:
        _describe(ph, multi, anat, r_caption, r_finding_text)
    return ph


def _describe(ph: Phantom, multi: FindingMaps, anat, r_caption, r_finding_text) -> None:
    """The masks and captions of a multi-finding sample."""
    defs = FINDINGS[ph.modality]
    present = {f.name: multi.present(f.name) for f in defs}
    ph.finding_masks = multi.masks
    ph.caption = multi_caption(r_caption, ph.modality, ph.label, defs, present,
                               multi.centers, anat)
    ph.finding_captions = {
        f.name: finding_caption(r_finding_text[f.name], ph.modality, ph.label, f,
                                multi.centers.get(f.name, []), anat)
        for f in defs if f.kind == "finding" and present[f.name]}


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
    modality, size, seed, bit_depth, out_dir, width, findings, prefix = config
    ph = _render(modality, size, seed, index, bit_depth, width=width, findings=findings)
    if prefix:
        ph = replace(ph, stem=prefix + ph.stem)
    write_png(safe_child(out_dir, f"images/{ph.stem}.png"), ph.image)
    write_png(safe_child(out_dir, f"masks/{ph.stem}.png"), ph.mask)
    instances = [coco_instance(m) for m in ph.instance_masks]
    extra = None
    if ph.finding_masks:
        for name, m in ph.finding_masks.items():
            write_png(safe_child(out_dir, f"masks/{name}/{ph.stem}.png"),
                      m.astype(np.uint8) * np.uint8(255))
        extra = {"present": ph.present, "captions": ph.finding_captions}
    return ph.stem, ph.label, ph.caption, instances, extra


def _mp_context():
    methods = mp.get_all_start_methods()
    # forkserver/spawn: safe even when the parent already runs threads (torch, OpenCV)
    return mp.get_context("forkserver" if "forkserver" in methods else "spawn")


# --------------------------------------------------------------------------- generation


@dataclass(kw_only=True)
class PhantomConfig:
    """Settings of ``mwm phantoms`` (the arguments of :func:`generate_phantoms`)."""

    out: str = opt(help="output folder (created if missing)", positional=True)
    modality: str = opt(MODALITIES[0], "which anatomy and findings", choices=MODALITIES)
    n: int = opt(DEFAULT_N, "number of images", low=1)
    size: int = opt(DEFAULT_SIZE, "image side in pixels", low=MIN_SIZE)
    bit_depth: int = opt(BIT_DEPTHS[0], "PNG bit depth", choices=BIT_DEPTHS)
    class_folders: bool = opt(False, "also write classes/<split>/<class>/ links for "
                              "class-folder tools")
    seed: int = opt(0, "random seed", low=0)
    workers: int | None = opt(None, "worker processes (default: number of CPU cores)", low=1)
    findings: str = opt(FINDING_MODES[0], "single: the class lesion only; multi: also other "
                        "findings present independently and named anatomy, each with its own "
                        "mask (masks/<finding>/), findings.csv and finding_captions.csv",
                        choices=FINDING_MODES)
    quiet: bool = opt(False, "no progress bars")


def generate_phantoms(out_dir, modality: str = MODALITIES[0], n: int = DEFAULT_N,
                      size: int = DEFAULT_SIZE, seed: int = 0, *,
                      bit_depth: int = BIT_DEPTHS[0], workers: int | None = None,
                      class_folders: bool = False,
                      split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
                      findings: str = FINDING_MODES[0], stem_prefix: str = "",
                      progress: bool = True) -> PhantomSummary:
    """Write a phantom dataset of ``n`` images into ``out_dir`` (see the module docstring).

    ``stem_prefix`` starts every file name (``eval-brain-mri_00000.png``), so a second
    set can sit beside the first in one manifest without two images of one name.
    ``workers`` processes render and write the images (default ``os.cpu_count()``;
    ``1`` renders in this process); the result does not depend on it. ``findings="multi"``
    adds the findings of :mod:`mwm.data.findings` with their masks, ``findings.csv`` and
    ``finding_captions.csv`` (the files of ``"single"`` keep their format).
    """
    t0 = time.perf_counter()
    _check_common(modality, size, bit_depth)
    check_findings(findings)
    n = _check_int("n", n, 1)
    size = int(size)
    seed = _check_int("seed", seed, 0)
    fractions = _check_fractions(split_fractions)
    workers = (os.cpu_count() or 1) if workers is None else workers
    workers = min(_check_int("workers", workers, 1), n)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    for sub in ("images", "masks"):
        (out / sub).mkdir(exist_ok=True)
    width = max(5, len(str(n - 1)))
    config = (modality, size, seed, bit_depth, str(out), width, findings,
              _check_prefix(stem_prefix))
    results = _render_all(config, n, workers, progress)
    labels = [r[1] for r in results]
    splits = stratified_split(labels, fractions, seed, modality)
    prompt = PROMPTS[modality]
    records, next_ann = [], 1
    for i, (stem, label, caption, instances, extra) in enumerate(results):
        ids = list(range(next_ann, next_ann + len(instances)))
        next_ann += len(instances)
        records.append({"index": i, "stem": stem, "label": label, "caption": caption,
                        "instances": instances, "ann_ids": ids, "split": splits[i],
                        "findings": extra})

    split_map = _write_tables(out, modality, size, records)
    classes = CLASSES[modality]
    class_counts = {c: labels.count(c) for c in classes}
    split_counts = {s: len(split_map[s]) for s in SPLITS}
    files = {"images": "images/<stem>.png", "masks": "masks/<stem>.png (uint8 0/255, lesion union)",
             "manifest": "labels.csv", "captions": "captions.csv", "prompts": "prompts.json",
             "splits": "splits.json",
             "coco": "instances.json, instances_<split>.json (file_name relative to images/)",
             "class_folders": "classes/<split>/<class>/<stem>.png" if class_folders else None}
    meta = {
        "name": f"mwm-phantoms-{modality}",
        "generator": "mwm.data.phantoms",
        "generator_version": GENERATOR_VERSION,
        "modality": modality, "n": n, "size": size, "seed": seed, "bit_depth": bit_depth,
        **({"stem_prefix": stem_prefix} if stem_prefix else {}),
        "classes": list(classes), "lesion_classes": list(classes[1:]),
        "class_sampling": "uniform random per sample (including none)",
        "prompt": prompt,
        "class_counts": class_counts, "split_counts": split_counts,
        "split_fractions": list(fractions),
        "intensity": INTENSITY_CONVENTION[bit_depth],
        "orientation": ORIENTATION,
        "files": files,
    }
    if findings == "multi":
        meta["findings"] = _write_findings(out, modality, records)
        files.update(finding_masks="masks/<finding>/<stem>.png (uint8 0/255; all zeros when "
                     "absent)", findings=FINDINGS_FILE, finding_captions=FINDING_CAPTIONS_FILE)
    write_json(out / "dataset.json", meta)

    clean_up(out, records, class_folders, _STEM_RE, modality if findings == "multi" else None)
    return PhantomSummary(out, modality, n, size, seed, class_counts, split_counts,
                          time.perf_counter() - t0, bit_depth, workers)


def _check_prefix(stem_prefix: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", stem_prefix):
        raise ValueError(f"stem_prefix may hold letters, digits, '_' and '-' only, got "
                         f"{stem_prefix!r}")
    return stem_prefix


def _render_all(config: tuple, n: int, workers: int, progress: bool) -> list[tuple]:
    """(stem, label, caption, instances) of every image, rendered and written."""
    bar = dict(total=n, desc=f"phantoms {config[0]}", unit="img", enabled=progress)
    if workers == 1:
        return list(_progress((_produce(config, i) for i in range(n)), **bar))
    chunk = max(1, min(64, n // (workers * 8)))
    with _mp_context().Pool(workers, initializer=_init_worker, initargs=(config,)) as pool:
        return list(_progress(pool.imap(_work, range(n), chunksize=chunk), **bar))


def _write_tables(out: Path, modality: str, size: int, records: list[dict]) -> dict:
    """labels.csv, captions.csv, prompts.json, splits.json and the COCO files; the splits."""
    prompt = PROMPTS[modality]
    write_csv(out / "labels.csv",
              ({"image": f"images/{r['stem']}.png", "label": r["label"],
                "mask": f"masks/{r['stem']}.png", "prompt": prompt, "split": r["split"]}
               for r in records), ("image", "label", "mask", "prompt", "split"))
    write_csv(out / "captions.csv",
              ({"image": f"images/{r['stem']}.png", "caption": r["caption"]} for r in records),
              ("image", "caption"))
    write_json(out / "prompts.json", {r["stem"]: prompt for r in records})
    split_map = {s: [r["stem"] for r in records if r["split"] == s] for s in SPLITS}
    write_json(out / "splits.json", split_map)

    def coco(keep):  # written compactly (one line): polygons make indented JSON huge
        return _compact(coco_dataset(modality, CLASSES[modality], size, records, keep,
                                     GENERATOR_VERSION))

    write_text(out / "instances.json", coco(None))
    for s in SPLITS:
        write_text(out / f"instances_{s}.json",
                   coco({r["index"] for r in records if r["split"] == s}))
    return split_map


def _write_findings(out: Path, modality: str, records: list[dict]) -> dict:
    """findings.csv (one row per image and finding), finding_captions.csv (one per present
    finding); the findings section of dataset.json."""
    defs = FINDINGS[modality]
    write_csv(out / FINDINGS_FILE, (
        {"image": f"images/{r['stem']}.png", "finding": f.name, "kind": f.kind,
         "present": int(r["findings"]["present"][f.name]),
         "mask": f"masks/{f.name}/{r['stem']}.png", "phrase": f.phrase}
        for r in records for f in defs), FINDINGS_COLUMNS)
    write_csv(out / FINDING_CAPTIONS_FILE, (
        {"image": f"images/{r['stem']}.png", "finding": f.name,
         "caption": r["findings"]["captions"][f.name]}
        for r in records for f in defs if f.name in r["findings"]["captions"]),
        FINDING_CAPTION_COLUMNS)
    expected = presence_rates(modality, CLASSES[modality])
    return {"mode": "multi", "presence_probability": PRESENCE_PROBABILITY,
            "max_extra_per_image": MAX_EXTRA,
            "definitions": [_definition(f, expected[f.name], records) for f in defs]}


def _definition(f: Finding, expected: float, records: list[dict]) -> dict:
    present = {s: sum(r["findings"]["present"][f.name] for r in records if r["split"] == s)
               for s in SPLITS}
    return {"name": f.name, "kind": f.kind, "phrase": f.phrase, "synonyms": list(f.synonyms),
            "negations": list(f.negations), "classes": list(f.classes), "extra": f.extra,
            "look": f.look, "expected_rate": expected,
            "present": sum(present.values()), "present_by_split": present,
            "rate": round(sum(present.values()) / max(len(records), 1), 4)}


def _compact(obj) -> str:
    return json.dumps(obj, separators=(",", ":")) + "\n"
