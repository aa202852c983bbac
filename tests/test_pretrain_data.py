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


def test_binary_regions_stay_binary(tmp_path):
    sample = write_pair(tmp_path)
    _, region = RegionImageDataset([sample], 32, augment=NO_AUGMENT)[0]
    assert region.dtype == torch.bool
    assert 0 < int(region.sum()) < region.numel()  # the ramp binarized at half its maximum


def test_saliency_of_another_size_names_the_file(tmp_path):
    sample = write_pair(tmp_path, saliency_shape=(40, 64))
    with pytest.raises(DataError, match="map.png"):
        RegionImageDataset([sample], 32, augment=NO_AUGMENT, continuous=True)[0]
