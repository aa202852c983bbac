"""The truth of ``mwm segment``: label maps from masks or from integer label PNGs, the
dataset, and the splits.

* **Masks** (:class:`MaskLabels`): a sample's mask (:func:`~mwm.data.io.read_mask`'s 0/1
  and 0/255 rules) is class 1 (``binary``) or its label's class (``classes``).
* **Label maps** (:class:`LabelMaps`): ``<image name>.png`` in one folder, uint8 or uint16,
  the image's size, read raw: 0 = background, k > 0 = class k. Names from the folder's
  ``classes.json`` (``{"1": "edema", "2": "tumor"}``), else ``class_<k>`` for the values
  found; ``binary``: any non-zero value is ``lesion``. Every map is checked (present, its
  image's size, every value named) before a run starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..data.io import SliceRef, read_mask, read_slice, to_model_input
from ..data.layouts import Sample, open_dataset
from ..errors import DataError
from ..pretrain.data import SeededImages, resize_image

if TYPE_CHECKING:
    from .segment import SegmentConfig

__all__ = ["CLASSES_FILE", "LabelMaps", "MaskLabels", "SegmentDataset", "split_samples"]

SPLITS = ("train", "val", "test")
CLASSES_FILE = "classes.json"


class MaskLabels:
    """Truth from the samples' masks (:func:`read_mask`'s rules): the mask's pixels are
    class 1 (binary) or the class of the sample's label."""

    def __init__(self, classes: list[str], binary: bool):
        self.classes, self.binary = classes, binary
        self.index = {c: i for i, c in enumerate(classes)}

    def read(self, sample: Sample) -> np.ndarray:
        """(H, W) uint8 class indices at the mask's own size."""
        value = 1 if self.binary else self.index.get(sample.label or "", 0)
        return (np.asarray(read_mask(sample.mask)) > 0).astype(np.uint8) * value


class LabelMaps:
    """Truth from a folder of integer label PNGs ``<image name>.png``, read raw: value 0 is
    the background, value k > 0 class k. ``lut[value]`` is the class index of a value."""

    def __init__(self, folder: Path, classes: list[str], lut: np.ndarray):
        self.folder, self.classes, self.lut = folder, classes, lut

    def path(self, sample: Sample) -> Path:
        return self.folder / f"{sample.name}.png"

    def read(self, sample: Sample) -> np.ndarray:
        """(H, W) class indices (uint8; uint16 past 255 classes) at the map's own size."""
        return self.lut[read_label_map(self.path(sample))]

    @classmethod
    def open(cls, folder: str | Path, samples: list[Sample], labels: str) -> LabelMaps:
        """Check that every sample has a map of its image's size whose values are named,
        then the classes: ``classes.json``'s names (or ``class_<value>`` for the values
        found), or ``background, lesion`` for ``labels == "binary"``."""
        folder = Path(folder)
        if not folder.is_dir():
            raise DataError(f"--label-maps {folder}: no such folder.")
        names = read_class_names(folder)
        values = scan_label_maps(folder, samples, names)
        if labels == "binary":
            lut = (np.arange(max(values, default=0) + 1) > 0).astype(np.uint8)
            return cls(folder, ["background", "lesion"], lut)
        named = sorted(names) if names is not None else sorted(v for v in values if v > 0)
        if not named:
            raise DataError(f"--label-maps {folder}: no class: every map is all background "
                            f"(0) and no {CLASSES_FILE} names one; --labels classes needs "
                            "classes.")
        lut = np.zeros(max([*named, *values]) + 1, np.uint8 if len(named) < 256 else np.uint16)
        for index, value in enumerate(named, start=1):
            lut[value] = index
        titles = [names[v] if names is not None else f"class_{v}" for v in named]
        return cls(folder, ["background", *titles], lut)


def read_label_map(path: Path) -> np.ndarray:
    """A label PNG's raw values, (H, W) integer; a palette PNG gives its indices (OpenCV
    would give the palette's colours)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.mode == "P":
                return np.asarray(image)
    except OSError:  # not an image PIL reads: read_slice says what is wrong
        pass
    pixels = read_slice(SliceRef(path)).pixels
    if pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16):
        kind = f"{pixels.shape[2]}-channel" if pixels.ndim == 3 else str(pixels.dtype)
        raise DataError(f"{path}: a label map must be a single-channel uint8 or uint16 PNG "
                        f"(one integer per pixel); this one is {kind}. Save the class values "
                        "as a greyscale PNG.")
    return pixels


def read_class_names(folder: Path) -> dict[int, str] | None:
    """``{value: class name}`` of ``folder/classes.json`` (``{"1": "edema", ...}``), or
    None when there is none. Key 0 (the background) is ignored."""
    path = folder / CLASSES_FILE
    if not path.is_file():
        return None
    fix = 'Write it as {"1": "edema", "2": "tumor"}: label value → class name.'
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        names = {int(k): str(v) for k, v in raw.items()}
    except (ValueError, AttributeError) as err:
        raise DataError(f"{path}: not a JSON object of integer values to names ({err}). "
                        f"{fix}") from err
    names.pop(0, None)
    bad = [k for k in names if k < 0 or k > 65535]
    taken = [n for n in set(names.values()) if list(names.values()).count(n) > 1]
    if bad or taken or "background" in names.values():
        problem = (f"values {bad} are not uint16 labels" if bad else
                   f"names {sorted(taken)} are given twice" if taken else
                   "'background' is value 0's name and cannot name a class")
        raise DataError(f"{path}: {problem}. {fix}")
    return names


def scan_label_maps(folder: Path, samples: list[Sample],
                    names: dict[int, str] | None) -> set[int]:
    """The values found in the samples' maps; a missing map, a map of another size than
    its image, or a value ``names`` lacks is an error naming the file."""
    missing = [s.name for s in samples if not (folder / f"{s.name}.png").is_file()]
    if missing:
        shown = ", ".join(f"{name}.png" for name in missing[:5])
        raise DataError(f"--label-maps {folder}: {len(missing)} of {len(samples)} images with a "
                        f"split have no label map (first: {shown}). Write <image name>.png "
                        "there for each (0 = background, k = class k), or leave those images "
                        "out of the dataset (a CSV manifest lists the images to use).")
    found: set[int] = set()
    for sample in samples:
        path = folder / f"{sample.name}.png"
        values = read_label_map(path)
        size = read_slice(sample.image).pixels.shape[:2]
        if values.shape != size:
            raise DataError(f"{path}: label map is {values.shape[1]}x{values.shape[0]} (WxH) "
                            f"but its image {sample.image.path} is {size[1]}x{size[0]}. A label "
                            "map must have its image's size (resize nearest-neighbour).")
        present = {int(v) for v in np.unique(values)}
        unknown = sorted(present - set(names) - {0}) if names is not None else []
        if unknown:
            raise DataError(f"{path}: value {unknown[0]} has no name in "
                            f"{folder / CLASSES_FILE} (it names {sorted(names)}). Add "
                            f'"{unknown[0]}": "<class name>" there, or fix the map.')
        found |= present
    return found


# --------------------------------------------------------------------------- data

class SegmentDataset(SeededImages):
    """Samples → ``(standardized image (3, S, S), label map (S, S) int64)``."""

    def __init__(self, samples: list[Sample], labels: MaskLabels | LabelMaps, input_size: int,
                 *, mean, std, augment: bool = False, seed: int = 0):
        super().__init__(samples, input_size, mean=mean, std=std, seed=seed)
        self.labels = labels
        self.augment = augment

    def image(self, i: int) -> np.ndarray:
        """(S, S, 3) float32 in [0, 1]."""
        image = to_model_input(read_slice(self.samples[i].image)).transpose(1, 2, 0)
        return resize_image(image, self.input_size)

    def target(self, i: int) -> np.ndarray:
        import cv2

        truth = self.labels.read(self.samples[i])
        truth = cv2.resize(truth, (self.input_size,) * 2, interpolation=cv2.INTER_NEAREST)
        return truth.astype(np.int64)

    def __getitem__(self, i: int):
        image, target = self.image(i), self.target(i)
        if self.augment and self.rng(i).random() < 0.5:
            image, target = image[:, ::-1], target[:, ::-1]
        return self.standardized(image), torch.from_numpy(np.ascontiguousarray(target))


def split_samples(cfg: SegmentConfig) -> tuple[dict[str, list[Sample]], MaskLabels | LabelMaps]:
    """``({split: samples}, their labels)``; class 0 is the background. Training needs a
    ``train`` split; every run needs ``val`` or ``test``."""
    data = open_dataset(cfg.data)
    if cfg.label_maps:
        usable = [s for s in data.samples if s.split in SPLITS]
        if not usable:
            raise DataError(f"{cfg.data}: no image has a split; give every image a split "
                            "(train/val/test).")
    else:
        usable = [s for s in data.samples if s.mask is not None]
        if not usable:
            raise DataError(f"{cfg.data}: no image has a mask; segmentation needs masks (a "
                            "phantom folder, or a CSV manifest with a 'mask' column) or "
                            "--label-maps.")
    splits = {name: [s for s in usable if s.split == name] for name in SPLITS}
    if not splits["train"] and not cfg.eval_only:
        raise DataError(f"{cfg.data}: no image with a truth in the 'train' split; give every "
                        "image a split (train/val/test).")
    if not splits["val"] and not splits["test"]:
        raise DataError(f"{cfg.data}: no 'val' or 'test' split to evaluate on.")
    usable = [s for name in SPLITS for s in splits[name]]
    if cfg.label_maps:
        return splits, LabelMaps.open(cfg.label_maps, usable, cfg.labels)
    if cfg.labels == "binary":
        return splits, MaskLabels(["background", "lesion"], binary=True)
    lesions = sorted({s.label for s in usable if s.label and s.label != "none"})
    if not lesions:
        raise DataError(f"{cfg.data}: --labels classes needs lesion labels; no sample has one. "
                        "Use --labels binary.")
    return splits, MaskLabels(["background", *lesions], binary=False)


