"""Pretraining data: binary regions stay binary, saliency maps stay continuous (soft masking)."""

import numpy as np
import pytest
import torch

from mwm.data.io import DataError, SliceRef
from mwm.data.layouts import Sample
from mwm.files import write_png
from mwm.pretrain.data import Augment, RegionImageDataset

NO_AUGMENT = Augment(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=0.0)


def write_pair(tmp_path, saliency_shape=(48, 64)):
    image = (np.arange(48 * 64).reshape(48, 64) % 251).astype(np.uint8)
    ramp = np.tile(np.linspace(0, 255, saliency_shape[1]).round().astype(np.uint8), (saliency_shape[0], 1))
    write_png(tmp_path / "img.png", image)
    write_png(tmp_path / "map.png", ramp)
    return Sample(SliceRef(tmp_path / "img.png"), SliceRef(tmp_path / "map.png"))


def test_saliency_maps_are_read_continuous_for_soft_masking(tmp_path):
    sample = write_pair(tmp_path)
    soft = RegionImageDataset([sample], 32, augment=NO_AUGMENT, continuous=True)
    _, region = soft[0]
    assert region.dtype == torch.float32 and region.shape == (32, 32)
    values = torch.unique(region)
    assert len(values) > 10  # a ramp, not a binary mask
    assert 0.0 <= float(region.min()) < 0.1 and 0.9 < float(region.max()) <= 1.0
    # left to right the map rises, as in the file
    assert bool((region[:, 1:] >= region[:, :-1] - 1e-6).all())


def test_binary_regions_become_their_occupancy(tmp_path):
    sample = write_pair(tmp_path)
    _, region = RegionImageDataset([sample], 32, augment=NO_AUGMENT)[0]
    assert region.dtype == torch.float32 and region.shape == (32, 32)
    assert float(region.min()) == 0.0 and float(region.max()) == 1.0
    # the covered share is kept: the ramp binarized at half its maximum covers half
    # the columns, at the source size and after the area resize alike
    assert abs(float(region.mean()) - 32 / 64) < 1e-6


@pytest.mark.parametrize("source, size", [(1024, 224), (512, 64)])
def test_thin_regions_never_vanish_when_shrunk(tmp_path, source, size):
    """A 3 x 60 px box survives any shrink and any position (nearest neighbour lost it in
    6 of 16 1024-px images at 224 px, 10 of 16 512-px images at 64 px)."""
    rng = np.random.default_rng(0)
    write_png(tmp_path / "img.png", np.full((source, source), 100, np.uint8))
    samples = []
    for i in range(16):
        mask = np.zeros((source, source), np.uint8)
        top, left = rng.integers(0, source - 60, size=2)
        mask[top:top + 3, left:left + 60] = 255
        write_png(tmp_path / f"mask{i}.png", mask)
        samples.append(Sample(SliceRef(tmp_path / "img.png"), SliceRef(tmp_path / f"mask{i}.png")))
    dataset = RegionImageDataset(samples, size, augment=NO_AUGMENT)
    for i in range(16):
        region = dataset[i][1]
        assert float(region.sum()) * (source / size) ** 2 == pytest.approx(180, rel=1e-3)
    assert dataset.empty_regions() == []


def test_empty_regions_are_listed_with_their_reason(tmp_path):
    write_png(tmp_path / "img.png", np.full((16, 16), 100, np.uint8))
    write_png(tmp_path / "blank.png", np.zeros((16, 16), np.uint8))
    samples = [Sample(SliceRef(tmp_path / "img.png"), None),
               Sample(SliceRef(tmp_path / "img.png"), SliceRef(tmp_path / "blank.png"))]
    rows = RegionImageDataset(samples, 16, augment=NO_AUGMENT).empty_regions()
    assert [row["reason"] for row in rows] == ["no region mask", "mask has no foreground"]
    assert rows[1]["file"].endswith("blank.png")


def test_saliency_of_another_size_names_the_file(tmp_path):
    sample = write_pair(tmp_path, saliency_shape=(40, 64))
    with pytest.raises(DataError, match="map.png"):
        RegionImageDataset([sample], 32, augment=NO_AUGMENT, continuous=True)[0]
