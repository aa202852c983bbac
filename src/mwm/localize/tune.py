"""``mwm localize --tune``: grid search of M2IB parameters on validation masks.

Each combination of ``beta`` x ``layer`` x ``noise_scale`` x ``standardize`` (with the
published formula: ``beta`` x ``layer``) computes saliency maps for
the same validation images, applies **the same postprocessing the run will use**, and
is scored by the mean DSC against the validation masks. The table and the best
parameters are written; the run then uses the best ones.

Unlike the reference search (3 single images, a fixed 0.3 threshold without the
postprocessing, a no-op variance parameter), every scored parameter changes the maps
and the score is the quantity the run produces.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..data.io import read_mask, read_slice, to_model_input
from ..data.layouts import Sample, split_prompt
from ..files import write_csv, write_json
from ..metrics import dice
from ..progress import progress as progress_bar
from .crf import model_input_to_rgb8
from .postprocess import PostprocessConfig

def default_grid(depth: int, published: bool = False) -> dict[str, tuple]:
    """beta x layer x noise_scale x standardize (``published``: beta x layer).

    Layers: 7, 8, 9 for a 12-block ViT (depth-5 .. depth-3, the published search). A
    shallow model (fewer than 6 blocks, such as the scratch presets of ``mwm clip train``)
    has no such middle: its last two blocks are searched instead. With a mean-pooled ViT
    the last block's output reaches the embedding token by token, so its map keeps every
    token that carries the prompt (measured in ``benchmarks/results/localization.md``).
    Their averaged map is a third candidate: for the phantom CLIP, block D-2 found the
    small lesions and block D-1 the large ones. ``standardize`` on (MWM's default) is
    tried before off (the published formula), so a tie keeps MWM's default.

    ``published``: the published search's distinct points (its variance parameter has no
    effect), with the published formula (raw activations, noise scale 1) kept.
    """
    if depth >= 6:
        layers = tuple(sorted({depth - k for k in (5, 4, 3)}))
    else:
        layers = tuple(sorted({max(0, depth - 2), depth - 1}))
        if len(layers) == 2:
            layers = layers + (layers,)
    grid = {"beta": (0.1, 1.0, 2.0), "layer": layers}
    if not published:
        grid.update(noise_scale=(0.5, 1.0, 2.0), standardize=(True, False))
    return grid


def pick_validation(samples: list[Sample], n_images: int, seed: int = 0) -> list[Sample]:
    """A seeded subset of ``n_images`` validation samples (all of them if fewer)."""
    if len(samples) <= n_images:
        return list(samples)
    return sorted(random.Random(seed).sample(samples, n_images), key=lambda s: s.name)


def tune(samples: list[Sample], saliency_fn: Callable, base_config, post: PostprocessConfig,
         out_dir: str | Path, *, depth: int = 12, grid: dict[str, Sequence] | None = None,
         progress: bool = True, posts: Sequence[PostprocessConfig] | None = None
         ) -> tuple[object, list[dict]]:
    """Score every grid point; write ``tune_table.csv`` and ``tune_best.json``.

    ``saliency_fn(images, prompts, names, config) -> maps``; ``base_config`` is an
    ``M2IBConfig`` whose grid fields are replaced point by point. Returns the best
    config and the table rows (sorted as evaluated).

    ``posts``: further postprocessing candidates. Each grid point's maps (computed once)
    are then scored with ``post`` and with each of them; every row gets a
    ``postprocess`` column (its index: 0 = ``post``, 1.. = ``posts``) and the best row
    names the postprocessing to use with the best config (also in ``tune_best.json``).
    """
    grid = grid or default_grid(depth)
    images, prompts, truths = [], [], []
    for sample in samples:
        image = read_slice(sample.image)
        images.append(to_model_input(image))
        prompts.append(split_prompt(sample.prompt))
        truths.append(read_mask(sample.mask, shape=image.shape))
    # The dense CRF follows the image: CRF candidates get it as the model saw it.
    needs_image = any(c.crf is not None for c in (post, *(posts or ())))
    guides = [model_input_to_rgb8(im) if needs_image else None for im in images]
    keys = list(grid)
    points = list(itertools.product(*(grid[k] for k in keys)))
    candidates = [post, *(posts or ())]
    extra = ["postprocess"] if posts else []
    rows = []
    for values in progress_bar(points, total=len(points), desc="tune", unit="combo",
                               enabled=progress):
        config = replace(base_config, **dict(zip(keys, values)))
        maps = saliency_fn(images, prompts, [s.name for s in samples], config)
        for index, candidate in enumerate(candidates):
            scores = [dice(candidate.apply(m, rgb), t) for m, rgb, t in zip(maps, guides, truths)]
            rows.append({**dict(zip(keys, values)), **({"postprocess": index} if posts else {}),
                         "dice_mean": float(np.mean(scores)), "dice_std": float(np.std(scores)),
                         "n_images": len(scores)})
    best_row = max(rows, key=lambda r: r["dice_mean"])  # first maximum on ties
    best = replace(base_config, **{k: best_row[k] for k in keys})
    out_dir = Path(out_dir)
    write_csv(out_dir / "tune_table.csv", rows,
              [*keys, *extra, "dice_mean", "dice_std", "n_images"])
    write_json(out_dir / "tune_best.json", {"best": {k: best_row[k] for k in keys},
                                            "dice_mean": best_row["dice_mean"],
                                            "postprocess": candidates[
                                                best_row.get("postprocess", 0)].to_dict(),
                                            "images": [s.name for s in samples]})
    return best, rows
