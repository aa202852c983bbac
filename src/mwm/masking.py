"""Mask samplers for sparse masked image modeling: random and region-aware.

The mask lives on the encoder's output grid: an input of ``H x W`` pixels and a
downsampling ratio (patch size) ``p`` give a ``(H/p) x (W/p)`` grid of cells; a masked
cell hides its ``p x p`` pixels. Every sampler here is vectorized over the batch (no
Python loop per image, no host-device synchronization) and takes a seeded
``torch.Generator`` so the same seed gives the same masks.

Samplers (all return a :class:`MaskBatch`):

* :func:`random_masks` — exactly ``round(N * ratio)`` masked cells per image.
* :func:`region_masks` — the published method's targeted masking, made exact: cells whose
  region occupancy reaches ``threshold`` are *salient* and masked at ``ratio_salient``,
  the others at ``ratio_background``, with exact per-image counts.
* :func:`budget_masks` — beyond the paper: an exact overall count per image, with salient
  cells ``emphasis`` times as likely to be masked as background cells, from a binary
  region or from a continuous saliency map.

Counts use round-half-up on ``n * ratio`` computed in float64 with a small tolerance,
so 5 salient cells at 0.8 mask exactly 4 (the reference's ``floor(n * (1 - r))``
visible count kept 0 because ``5 * 0.2 = 0.999…``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

DEFAULT_OCCUPANCY = 0.5
_ROUND_EPS = 1e-6  # absorbs float error in n * ratio before round-half-up


@dataclass
class MaskBatch:
    """Masks for a batch and what they realized (tensors; no host sync to build them).

    ``masked_bhw``: bool (B, gh, gw), True = the cell is hidden from the encoder.
    ``salient_bhw``: bool (B, gh, gw), the cells counted as region (all False for random).
    ``empty_b``: bool (B,), images whose region was empty (fallback applied).
    """

    masked_bhw: torch.Tensor
    salient_bhw: torch.Tensor
    empty_b: torch.Tensor

    @property
    def active_b1hw(self) -> torch.Tensor:
        """Visible cells as (B, 1, gh, gw) bool, the form sparse layers consume."""
        return (~self.masked_bhw).unsqueeze(1)

    def ratios(self) -> dict[str, torch.Tensor]:
        """Realized mask ratios averaged over the batch: salient, background, overall.

        Salient/background ratios average over the images that have such cells.
        Returned as 0-dim tensors on the masks' device; call ``.item()`` when logging.
        """
        masked = self.masked_bhw.flatten(1).float()
        salient = self.salient_bhw.flatten(1).float()
        background = 1.0 - salient
        overall = masked.mean(1).mean()
        return {
            "salient": _group_ratio(masked, salient),
            "background": _group_ratio(masked, background),
            "overall": overall,
            "empty_fraction": self.empty_b.float().mean(),
        }


def _group_ratio(masked_bn: torch.Tensor, member_bn: torch.Tensor) -> torch.Tensor:
    count_b = member_bn.sum(1)
    ratio_b = (masked_bn * member_bn).sum(1) / count_b.clamp_min(1)
    has_b = (count_b > 0).float()
    return (ratio_b * has_b).sum() / has_b.sum().clamp_min(1)


def grid_shape(height: int, width: int, patch: int) -> tuple[int, int]:
    """The mask grid for an input size; the size must be divisible by the patch."""
    if height % patch or width % patch:
        raise ValueError(f"input size {height}x{width} is not divisible by the encoder's "
                         f"downsampling ratio {patch}; use a multiple of {patch}.")
    return height // patch, width // patch


def exact_count(n: torch.Tensor, ratio: float | torch.Tensor) -> torch.Tensor:
    """``round(n * ratio)`` (half up), exact for ratios such as 0.8 on any n."""
    ratio = torch.as_tensor(ratio, dtype=torch.float64, device=n.device)
    return torch.floor(n.to(torch.float64) * ratio + 0.5 + _ROUND_EPS).to(torch.long)


def _check_ratio(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


# --------------------------------------------------------------------------- random

def random_masks(batch: int, grid: tuple[int, int], ratio: float, *,
                 generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> MaskBatch:
    """Exactly ``round(N * ratio)`` masked cells per image, uniformly at random."""
    _check_ratio("ratio", ratio)
    n_cells = grid[0] * grid[1]
    scores_bn = torch.rand(batch, n_cells, generator=generator, device=device)
    k = exact_count(torch.tensor(n_cells, device=device), ratio)
    masked_bn = _rank(scores_bn) < k
    none = torch.zeros(batch, *grid, dtype=torch.bool, device=device)
    return MaskBatch(masked_bn.view(batch, *grid), none, torch.zeros(batch, dtype=torch.bool,
                                                                     device=device))


def _rank(scores_bn: torch.Tensor) -> torch.Tensor:
    """Rank of each score within its row (0 = smallest): one sort, then a scatter."""
    order_bn = scores_bn.argsort(dim=1)
    positions = torch.arange(scores_bn.shape[1], device=scores_bn.device).expand_as(order_bn)
    return torch.empty_like(order_bn).scatter_(1, order_bn, positions)


# --------------------------------------------------------------------------- regions

def cell_occupancy(regions_bhw: torch.Tensor, patch: int) -> torch.Tensor:
    """Fraction of each grid cell covered by the region: (B, H, W) → (B, gh, gw) in [0, 1]."""
    gh, gw = grid_shape(regions_bhw.shape[-2], regions_bhw.shape[-1], patch)
    if regions_bhw.dtype == torch.bool:  # exact integer counts, cheaper than float pooling
        cells = regions_bhw.reshape(-1, gh, patch, gw, patch).sum((2, 4), dtype=torch.int32)
        return cells.float() / (patch * patch)
    return F.avg_pool2d(regions_bhw.float().unsqueeze(1), patch).squeeze(1)


def salient_cells(occupancy_bhw: torch.Tensor, threshold: float = DEFAULT_OCCUPANCY) -> torch.Tensor:
    """Cells whose occupancy reaches ``threshold``.

    A region that covers some pixels but no cell up to the threshold (thinner than a
    cell, or straddling cell borders) keeps its most-covered cell(s), so a non-empty
    region never vanishes from the grid.
    """
    salient = occupancy_bhw >= threshold
    peak_b11 = occupancy_bhw.flatten(1).amax(1).view(-1, 1, 1)
    vanished_b11 = (peak_b11 > 0) & ~salient.flatten(1).any(1).view(-1, 1, 1)
    return salient | (vanished_b11 & (occupancy_bhw == peak_b11))


def region_masks(regions_bhw: torch.Tensor, patch: int, ratio_salient: float,
                 ratio_background: float, *, threshold: float = DEFAULT_OCCUPANCY,
                 empty_ratio: float | None = None,
                 generator: torch.Generator | None = None) -> MaskBatch:
    """Mask salient cells at ``ratio_salient`` and the rest at ``ratio_background``.

    ``regions_bhw``: region masks in pixels (bool or 0/1), the size of the model input.
    Counts are exact per image: ``round(n_salient * ratio_salient)`` salient and
    ``round(n_background * ratio_background)`` background cells are masked. Images with
    an empty region are masked uniformly at ``empty_ratio`` (default:
    ``ratio_background``, close to the overall ratio when regions are small) and flagged
    in ``empty_b``.
    """
    for name, value in (("ratio_salient", ratio_salient), ("ratio_background", ratio_background)):
        _check_ratio(name, value)
    salient_bhw = salient_cells(cell_occupancy(regions_bhw, patch), threshold)
    return masks_from_salient_cells(salient_bhw, ratio_salient, ratio_background,
                                    empty_ratio=empty_ratio, generator=generator)


def masks_from_salient_cells(salient_bhw: torch.Tensor, ratio_salient: float,
                             ratio_background: float, *, empty_ratio: float | None = None,
                             generator: torch.Generator | None = None) -> MaskBatch:
    """:func:`region_masks` for regions already on the grid (bool (B, gh, gw))."""
    fallback = ratio_background if empty_ratio is None else empty_ratio
    _check_ratio("empty_ratio", fallback)
    batch, gh, gw = salient_bhw.shape
    salient_bn = salient_bhw.flatten(1)
    empty_b = ~salient_bn.any(1)
    n_salient_b = salient_bn.sum(1)
    n_cells = gh * gw
    k_salient_b = exact_count(n_salient_b, ratio_salient)
    k_background_b = torch.where(empty_b, exact_count(torch.full_like(n_salient_b, n_cells), fallback),
                                 exact_count(n_cells - n_salient_b, ratio_background))
    # Salient cells sort before background cells (key + 2); ranks inside each group then
    # decide which cells are masked, with one random permutation per group and image.
    u_bn = torch.rand(batch, n_cells, generator=generator, device=salient_bhw.device)
    rank_bn = _rank(u_bn + 2.0 * (~salient_bn))
    masked_salient = salient_bn & (rank_bn < k_salient_b[:, None])
    masked_background = ~salient_bn & ((rank_bn - n_salient_b[:, None]) < k_background_b[:, None])
    masked_bn = masked_salient | masked_background
    return MaskBatch(masked_bn.view(batch, gh, gw), salient_bhw, empty_b)


# --------------------------------------------------------------------------- budget

def budget_masks(patch: int, ratio: float, emphasis: float, *,
                 regions_bhw: torch.Tensor | None = None,
                 saliency_bhw: torch.Tensor | None = None,
                 threshold: float = DEFAULT_OCCUPANCY,
                 generator: torch.Generator | None = None) -> MaskBatch:
    """Exactly ``round(N * ratio)`` masked cells per image, weighted towards the region.

    Each cell has a weight: ``emphasis`` for salient cells and 1 for background cells
    (binary ``regions_bhw``), or ``1 + (emphasis - 1) * s`` with ``s`` the cell's mean
    saliency in [0, 1] (continuous ``saliency_bhw``). Cells are drawn without
    replacement with probability proportional to weight (Efraimidis–Spirakis keys
    ``u ** (1 / w)``), so a salient cell is ``emphasis`` times as likely as a background
    cell to be the next one masked. ``emphasis = 1`` is random masking.
    """
    _check_ratio("ratio", ratio)
    if emphasis <= 0:
        raise ValueError(f"emphasis must be positive, got {emphasis}")
    if (regions_bhw is None) == (saliency_bhw is None):
        raise ValueError("give exactly one of regions_bhw (binary) or saliency_bhw (continuous)")
    source = regions_bhw if regions_bhw is not None else saliency_bhw
    occupancy_bhw = cell_occupancy(source, patch)
    if regions_bhw is not None:
        salient_bhw = salient_cells(occupancy_bhw, threshold)
        weight_bhw = torch.where(salient_bhw, float(emphasis), 1.0)
    else:
        level_bhw = occupancy_bhw.clamp(0, 1)
        salient_bhw = salient_cells(level_bhw, threshold)
        weight_bhw = 1.0 + (emphasis - 1.0) * level_bhw
    batch, gh, gw = occupancy_bhw.shape
    u_bn = torch.rand(batch, gh * gw, generator=generator, device=source.device)
    log_key_bn = torch.log(u_bn.clamp_min(1e-12)) / weight_bhw.flatten(1)
    k = exact_count(torch.tensor(gh * gw, device=source.device), ratio)
    masked_bn = _rank(-log_key_bn) < k  # the k largest keys
    empty_b = ~salient_bhw.flatten(1).any(1)
    return MaskBatch(masked_bn.view(batch, gh, gw), salient_bhw, empty_b)


def upsample_cells(cells_bhw: torch.Tensor, patch: int) -> torch.Tensor:
    """Grid cells (B, gh, gw) → pixels (B, gh*p, gw*p), each cell repeated p x p."""
    return cells_bhw.repeat_interleave(patch, dim=1).repeat_interleave(patch, dim=2)
