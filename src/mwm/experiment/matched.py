"""The matched-ratio baseline: a strategy whose ``ratio`` is ``{match: NAME}`` masks, at
random (or with any masking that takes a ratio), the same overall share of cells as the
region strategy NAME does on this experiment's train images.

The ratio is resolved once the shared stages have made the regions
(:func:`resolve_matched`): NAME's own sampler (:data:`mwm.masking.MASKINGS`, so the
occupancy rule and the exact per-image counts are the library's) is run on every train
image's region, loaded as pretraining loads it (:class:`mwm.pretrain.data.RegionImageDataset`)
but without augmentation, on the mask grid the pretraining uses (input size / mask cell,
asked of the model as the trainer does). The ratio is the mean over images of the masked
share of cells, i.e. masked cells / (images x cells per image), an exact fraction: the
same regions always give the same number. It enters the cell's fingerprint as that number,
so regions that give another ratio rerun the matched cell.

Random crops in pretraining change each image's salient-cell count a little (a crop
enlarges the region relative to the view), so the region cell's *realized* ratio
(``train_log.csv``) can differ from the un-augmented one; ``views: N`` averages over N
augmented views of each image drawn as pretraining draws them instead. And a sampler
of exact counts masks ``round(N * ratio)`` of an image's N cells, so the matched cell
realizes the nearest multiple of 1/N (``grid_ratio``). Both are in results.
"""

from __future__ import annotations

import dataclasses

import torch

from ..masking import MASKINGS, MaskingParams, exact_count
from .config import ExperimentConfig, Strategy

BATCH = 64  # images per sampler call (region masks at the input size, float32)


def mask_cell(pretrain: dict) -> int:
    """The mask cell of a pretraining with these settings, in pixels: SparK's mask patch
    (default: the encoder's stride) or the ViT's patch, asked of the model as the trainer
    does (:func:`mwm.pretrain.train.pretrain_model`)."""
    from ..config import default_of
    from ..pretrain.config import PretrainConfig
    from ..pretrain.train import pretrain_model

    settings = {key: default_of(PretrainConfig, key) for key in ("model", "input_size")}
    model = pretrain_model({**settings, **pretrain})
    return int(getattr(model, "mask_patch", None) or model.patch_size)


def masked_cells(strategy: Strategy, samples: list, input_size: int, patch: int, *,
                 views: int = 0, seeds: tuple[int, ...] = (0,)) -> tuple[int, int]:
    """(masked cells, cells) that ``strategy``'s sampler gives the regions of ``samples``
    (their ``mask`` files) at ``input_size`` on a grid of ``patch``-pixel cells. Exact
    counts: the draw decides which cells, not how many.

    ``views = 0``: each image once, without augmentation. ``views = N``: N augmented views
    of each image, the crops and flips pretraining draws for seed ``seeds[k % S]`` at epoch
    ``k // S`` (k < N, S seeds): with N = seeds x epochs, every view the region cells train on.
    """
    from ..pretrain.data import NO_AUGMENT, Augment

    draws = [(NO_AUGMENT, seeds[0], 0)] if views == 0 else \
        [(Augment(), seeds[k % len(seeds)], k // len(seeds)) for k in range(views)]
    masked = cells = 0
    for augment, seed, epoch in draws:
        found = _masked_cells(strategy, samples, input_size, patch, augment, seed, epoch)
        masked, cells = masked + found[0], cells + found[1]
    return masked, cells


def _masked_cells(strategy: Strategy, samples: list, input_size: int, patch: int, augment,
                  seed: int, epoch: int) -> tuple[int, int]:
    from ..pretrain.data import RegionImageDataset

    entry = MASKINGS.get(strategy.masking)
    dataset = RegionImageDataset(samples, input_size, augment=augment, seed=seed,
                                 continuous=entry.continuous)
    dataset.set_epoch(epoch)
    params = MaskingParams(**strategy.params)
    generator = torch.Generator().manual_seed(0)
    masked = cells = 0
    for start in range(0, len(dataset), BATCH):
        regions_bhw = torch.stack([dataset[i][1]
                                   for i in range(start, min(start + BATCH, len(dataset)))])
        masked_bhw = entry.sample(regions_bhw, patch, params, generator).masked_bhw
        masked += int(masked_bhw.sum())
        cells += masked_bhw.numel()
    return masked, cells


def matched_ratio(target: Strategy, samples: list, input_size: int, patch: int, *,
                  views: int = 0, seeds: tuple[int, ...] = (0,)) -> dict:
    """What a strategy matching ``target`` records: the ratio and what it was computed from."""
    masked, cells = masked_cells(target, samples, input_size, patch, views=views, seeds=seeds)
    side = input_size // patch
    per_image = side * side
    ratio = masked / cells
    grid_count = int(exact_count(torch.tensor(per_image), ratio))
    return {"strategy": target.name, "regions": target.regions, "ratio": ratio,
            "images": len(samples), "views": views, "grid": [side, side],
            "masked_cells": masked, "grid_ratio": grid_count / per_image}


def resolve_matched(config: ExperimentConfig, prepared, log=print) -> ExperimentConfig:
    """``config`` with every ``ratio: {match: NAME}`` resolved from the prepared regions
    (unchanged when no strategy matches another)."""
    from ..config import default_of
    from ..data.layouts import open_dataset
    from ..pretrain.config import PretrainConfig

    targets = sorted({(s.match, s.match_views) for s in config.strategies if s.match is not None})
    if not targets:
        return config
    by_name = {s.name: s for s in config.strategies}
    patch = mask_cell(config.pretrain)
    size = int(config.pretrain.get("input_size", default_of(PretrainConfig, "input_size")))
    found = {}
    for name, views in targets:
        target = by_name[name]
        data = open_dataset(prepared.data, prepared.regions_for(target.regions),
                            require_masks=True)
        samples = [s for s in data.samples if s.split in (None, "train")]
        found[name, views] = matched_ratio(target, samples, size, patch, views=views,
                                           seeds=tuple(config.seeds))
    strategies = [s if s.match is None else dataclasses.replace(
        s, params={**s.params, "ratio": found[s.match, s.match_views]["ratio"]},
        matched=found[s.match, s.match_views]) for s in config.strategies]
    for strategy in strategies:
        if strategy.matched is not None:
            log(describe(strategy))
    return dataclasses.replace(config, strategies=strategies)


def describe(strategy: Strategy) -> str:
    m = strategy.matched
    side = m["grid"][0]
    views = f"{m['views']} augmented views of each" if m["views"] else "un-augmented"
    return (f"{strategy.name}: ratio {m['ratio']:.4f} = the mean overall mask ratio of "
            f"{m['strategy']} ({m['regions']} regions) on the {m['images']} train images "
            f"({views}, {side}x{side} grid); exact counts mask "
            f"{round(m['grid_ratio'] * side * side)} of {side * side} cells per image "
            f"({m['grid_ratio']:.4f})")
