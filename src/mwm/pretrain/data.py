"""Pretraining data: images with their region masks, jointly augmented.

Each item is ``(image_3ss, region_ss)``: the model input standardized with the
dataset's mean/std, and the region mask (bool) cropped and flipped **with the same
random parameters**, so the region stays on the anatomy it marks.

Augmentation randomness comes from a generator seeded by ``(seed, epoch, index)``:
an item is the same whatever worker loads it and whether the run was resumed, which
is what makes a resumed run repeat the uninterrupted loss curve.

Normalization statistics are computed once (:func:`dataset_stats`) as the true mean
and standard deviation over all pixels of up to ``max_images`` images resized to the
input size (not the mean of per-image standard deviations), then stored in the
checkpoint and reused downstream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError

from ..data.io import read_mask, read_slice, to_model_input
from ..data.layouts import Sample


@dataclass(frozen=True)
class Augment:
    """Joint augmentation of image and region.

    ``scale``: area fraction range of the random resized crop (1, 1 = no crop);
    ``ratio``: aspect ratio range of the crop; ``flip``: horizontal flip probability.
    """

    scale: tuple[float, float] = (0.67, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5


NO_AUGMENT = Augment(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=0.0)


def crop_box(height: int, width: int, aug: Augment, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A random resized crop ``(top, left, h, w)``; the whole image if no try fits."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*aug.scale)
        log_ratio = rng.uniform(math.log(aug.ratio[0]), math.log(aug.ratio[1]))
        aspect = math.exp(log_ratio)
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return 0, 0, height, width


def _interpolation(shape: tuple[int, ...], size: int) -> int:
    return cv2.INTER_AREA if max(shape[:2]) > size else cv2.INTER_LINEAR


def resize_image(image_hwc: np.ndarray, size: int) -> np.ndarray:
    """Resize an (H, W, C) image to ``size`` x ``size`` (area when shrinking, else linear)."""
    image = cv2.resize(np.ascontiguousarray(image_hwc), (size, size),
                       interpolation=_interpolation(image_hwc.shape, size))
    return image[..., None] if image.ndim == 2 else image


def square_resize(image_hwc: np.ndarray, region_hw: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize image (:func:`resize_image`) and region to ``size`` x ``size``.

    A bool region becomes its **occupancy**: float32, the fraction of each output pixel
    the region covers at the source resolution (:func:`region_occupancy`), so a region
    thinner than the resize step never vanishes. A float saliency map is resized with the
    image's interpolation (it stays continuous).
    """
    image = resize_image(image_hwc, size)
    if region_hw.dtype == bool:
        return image, region_occupancy(region_hw, size)
    return image, cv2.resize(region_hw.astype(np.float32), (size, size),
                             interpolation=_interpolation(image_hwc.shape, size))


def region_occupancy(region_hw: np.ndarray, size: int) -> np.ndarray:
    """A bool (H, W) region → (size, size) float32 in [0, 1]: the covered fraction per pixel.

    Shrinking is an area average (every region pixel adds to the output pixels it falls
    in: nearest neighbour dropped a 3-px box in 6 of 16 1024-px images at 224 px);
    enlarging is nearest neighbour (the fractions are kept, nothing new is made up).
    Done in two steps because OpenCV averages areas only when no axis is enlarged.
    """
    height, width = region_hw.shape
    occupancy = region_hw.astype(np.float32)
    shrunk = (min(width, size), min(height, size))
    if shrunk != (width, height):
        occupancy = cv2.resize(occupancy, shrunk, interpolation=cv2.INTER_AREA)
    if shrunk != (size, size):
        occupancy = cv2.resize(occupancy, (size, size), interpolation=cv2.INTER_NEAREST)
    return occupancy


def read_saliency(ref, shape: tuple[int, int]) -> np.ndarray:
    """A saliency map as float32 in [0, 1] (the value range of its file type)."""
    saliency = to_model_input(read_slice(ref))[0]
    if saliency.shape != tuple(shape):
        raise DataError(f"{ref.path}: saliency map is {saliency.shape[1]}x{saliency.shape[0]} but "
                        f"its image is {shape[1]}x{shape[0]}; maps must match their image's size "
                        "(`mwm localize` writes them so).")
    return saliency.astype(np.float32)


class SeededImages(Dataset):
    """What every MWM image dataset shares: its samples, a square input size, the
    standardization, and randomness seeded by ``(seed, epoch, index)`` (so an item is the
    same in any worker and after a resume)."""

    def __init__(self, samples: list[Sample], input_size: int, *,
                 mean: tuple[float, ...] = (0.5, 0.5, 0.5), std: tuple[float, ...] = (0.25, 0.25, 0.25),
                 seed: int = 0):
        self.samples = samples
        self.input_size = input_size
        self.mean = np.asarray(mean, np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(3, 1, 1)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def standardized(self, image_hwc: np.ndarray) -> torch.Tensor:
        """A resized (S, S, 3) image in [0, 1] → standardized (3, S, S) float32 tensor."""
        image_chw = (image_hwc.transpose(2, 0, 1) - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(image_chw, dtype=np.float32))


def pixel_stats(images_hwc) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std over all pixels of the (resized) images: the true pooled
    statistics, not the mean of per-image ones."""
    total, total_sq, count = np.zeros(3), np.zeros(3), 0
    for image_hwc in images_hwc:
        flat = image_hwc.reshape(-1, 3).astype(np.float64)
        total += flat.sum(0)
        total_sq += (flat ** 2).sum(0)
        count += flat.shape[0]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 1e-12))
    return tuple(float(m) for m in mean), tuple(float(v) for v in std)


class RegionImageDataset(SeededImages):
    """Samples (with optional region masks) → ``(image_3ss float, region_ss float)``.

    The region is the covered fraction of each input pixel (:func:`region_occupancy`);
    the samplers' cell occupancy is then the region's share of the cell at the source
    resolution. A sample without a mask gets an empty region (the sampler's documented
    fallback); :meth:`empty_regions` lists them, with the samples whose mask is empty.
    With ``continuous=True`` the "mask" files are saliency maps read as float32 in [0, 1]
    (8-bit PNG / 255) instead of being binarized: ``--masking soft`` samples from them.
    With ``views=True`` an item also says where its crop lies in the source image,
    ``view_5`` = float64 ``(top, left, height, width, flip)`` as fractions of the source
    height and width (flip 1.0 = mirrored after the crop): ``--masking loss-guided`` keeps
    each cell's loss in the source image's frame (:mod:`mwm.pretrain.hardness`).
    """

    def __init__(self, samples: list[Sample], input_size: int, *, augment: Augment = Augment(),
                 mean: tuple[float, ...] = (0.5, 0.5, 0.5), std: tuple[float, ...] = (0.25, 0.25, 0.25),
                 seed: int = 0, continuous: bool = False, views: bool = False):
        if not samples:
            raise DataError("no images to pretrain on")
        super().__init__(samples, input_size, mean=mean, std=std, seed=seed)
        self.augment = augment
        self.continuous = continuous
        self.views = views

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image (H, W, 3) float in [0, 1] and region (H, W) bool (float if continuous)."""
        sample = self.samples[index]
        image = read_slice(sample.image)
        pixels_chw = to_model_input(image)
        if sample.mask is None:
            region = np.zeros(image.shape, dtype=np.float32 if self.continuous else bool)
        elif self.continuous:
            region = read_saliency(sample.mask, image.shape)
        else:
            region = read_mask(sample.mask, shape=image.shape)
        return pixels_chw.transpose(1, 2, 0), region

    def empty_regions(self) -> list[dict[str, str]]:
        """The samples whose region is empty (no mask file, a mask without foreground, a
        saliency map of zeros), as ``{"name", "file", "reason"}`` rows. Reads every mask
        once (the images are not read)."""
        rows = []
        for sample in self.samples:
            if sample.mask is None:
                rows.append({"name": sample.name, "file": str(sample.image.path),
                             "reason": "no region mask"})
            elif not self._mask_pixels(sample).any():
                rows.append({"name": sample.name, "file": str(sample.mask.path),
                             "reason": "saliency map is all zero" if self.continuous
                             else "mask has no foreground"})
        return rows

    def _mask_pixels(self, sample: Sample) -> np.ndarray:
        if self.continuous:
            return to_model_input(read_slice(sample.mask))[0]
        return read_mask(sample.mask)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        rng = self.rng(index)
        image_hwc, region_hw = self.load(index)
        height, width = region_hw.shape
        top, left, h, w = crop_box(height, width, self.augment, rng)
        image_hwc = image_hwc[top:top + h, left:left + w]
        region_hw = region_hw[top:top + h, left:left + w]
        flip = rng.random() < self.augment.flip
        if flip:
            image_hwc, region_hw = image_hwc[:, ::-1], region_hw[:, ::-1]
        image_hwc, region_hw = square_resize(np.ascontiguousarray(image_hwc),
                                             np.ascontiguousarray(region_hw), self.input_size)
        item = (self.standardized(image_hwc), torch.from_numpy(region_hw))
        if not self.views:
            return item
        view_5 = torch.tensor([top / height, left / width, h / height, w / width, float(flip)],
                              dtype=torch.float64)
        return (*item, view_5)


def dataset_stats(dataset: RegionImageDataset, max_images: int = 1000,
                  seed: int = 0) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std over all pixels of up to ``max_images`` resized images."""
    n = len(dataset)
    order = np.random.default_rng(seed).permutation(n)[:max_images] if n > max_images else range(n)
    return pixel_stats(resize_image(dataset.load(int(index))[0], dataset.input_size)
                       for index in order)
