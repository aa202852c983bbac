"""Mask samplers for sparse masked image modeling: random and region-aware.

The mask lives on the encoder's output grid: an input of ``H x W`` pixels and a
downsampling ratio (patch size) ``p`` give a ``(H/p) x (W/p)`` grid of cells; a masked
cell hides its ``p x p`` pixels. Every sampler here is vectorized over the batch (no
Python loop per image, no host-device synchronization) and takes a seeded
``torch.Generator`` so the same seed gives the same masks.

**Strategies** are registered by name in :data:`MASKINGS` (the way timm registers
models): each says whether it needs region masks, whether it reads them as a continuous
map, which of the :class:`MaskingParams` it uses, and its sampler call. Adding one is one
function and one :func:`register_masking` decorator here (plus its test and docs); the
command line, the pretraining config, the experiment and the plots read the registry.

Samplers (all return a :class:`MaskBatch`):

* :func:`random_masks` — exactly ``round(N * ratio)`` masked cells per image.
* :func:`region_masks` — the published method's targeted masking, made exact: cells whose
  region occupancy reaches ``threshold`` are *salient* and masked at ``ratio_salient``,
  the others at ``ratio_background``, with exact per-image counts.
* :func:`budget_masks` — beyond the paper: an exact overall count per image, with salient
  cells ``emphasis`` times as likely to be masked as background cells, from a binary
  region or from a continuous saliency map.
* :func:`loss_guided_masks` — the text-free baseline: an exact count, ``hard_fraction`` of
  it the cells of highest loss at the image's last visit (:mod:`mwm.pretrain.hardness`).

:func:`reference_random_masks` and :func:`reference_region_masks` state the same
distributions in a few readable lines (noise, a group offset, argsort, as MAE's
``random_masking`` reads); they are the specification the fast samplers are tested
against (same counts, same per-cell probabilities).

Counts use round-half-up on ``n * ratio`` computed in float64 with a small tolerance,
so 5 salient cells at 0.8 mask exactly 4 (the reference's ``floor(n * (1 - r))``
visible count kept 0 because ``5 * 0.2 = 0.999…``).

How the exact samplers stay cheap (a handful of tensor ops per batch, none per image):
each cell gets one random integer key that packs, from the top bit down, its group
(salient cells first), random bits, and its own cell index. Keys are unique within an
image, so one values-only sort per row gives a uniformly random order of the cells with
the salient ones first, and the cell index is read back from the low bits (no argsort).
Which ranks are masked depends only on the image's salient-cell count ``n``: ranks
``< round(n * ratio_salient)`` and ranks in ``[n, n + round((N - n) * ratio_background))``.
Those patterns are precomputed in Python for every ``n`` (an ``(N + 1, N)`` table, cached),
so the per-batch work is: draw keys, sort, look up each row's pattern, scatter it back
to the cells. :func:`random_masks` needs no order, only each row's k-th smallest key
(a partial sort): the cells with keys up to it are exactly k. On CPU the sort and the
partition run in NumPy (SIMD sort, ~10x faster than ``torch.sort`` for rows of a few
dozen keys); on other devices they are ``torch.sort`` and ``torch.kthvalue``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .config import check_ranges, opt
from .registry import Registry

DEFAULT_OCCUPANCY = 0.5
_ROUND_EPS = 1e-6  # absorbs float error in n * ratio before round-half-up
_TINY = float(torch.finfo(torch.float32).tiny)  # smallest positive normal float32


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


def _count(n: int, ratio: float) -> int:
    """:func:`exact_count` on Python numbers (same float64 arithmetic, same result)."""
    return math.floor(n * ratio + 0.5 + _ROUND_EPS)


def _check_ratio(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


# --------------------------------------------------------------------------- keys

@dataclass(frozen=True)
class _KeyLayout:
    """Bit layout of the packed sort keys for a grid of ``n_cells`` cells.

    int32 keys (grids up to 256 cells: >= 22 random bits, as many as float32 ``rand``)
    or int64 keys (larger grids: >= 40 random bits). Salient cells get the group bit
    subtracted, so they are negative and sort first; the low bits hold the cell index,
    which makes every key unique within a row.
    """

    dtype: torch.dtype
    group: int        # subtracted from the keys of salient cells
    random_mask: int  # the random bits kept from the generator's integers
    index_mask: int   # the low bits that hold the cell index


@functools.lru_cache(maxsize=None)
def _key_layout(n_cells: int) -> _KeyLayout:
    index_bits = max(1, (n_cells - 1).bit_length())
    if index_bits > 22:
        raise ValueError(f"a mask grid of {n_cells} cells is too large (at most 2**22)")
    top = 30 if index_bits <= 8 else 62  # bit of the group; sign bit stays clear
    return _KeyLayout(torch.int32 if top == 30 else torch.int64, 1 << top,
                      (1 << top) - (1 << index_bits), (1 << index_bits) - 1)


@functools.lru_cache(maxsize=64)
def _cell_index(n_cells: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.arange(n_cells, dtype=dtype, device=device)


def _random_keys(batch: int, n_cells: int, generator: torch.Generator | None,
                 device: torch.device) -> torch.Tensor:
    """(B, N) unique keys: random bits above the cell index, group bit clear."""
    layout = _key_layout(n_cells)
    total = batch * n_cells
    if layout.dtype == torch.int32:  # one 63-bit draw gives two keys' worth of bits
        words = torch.empty((total + 1) // 2, dtype=torch.int64, device=device)
        keys = words.random_(generator=generator).view(torch.int32)[:total]
    else:
        keys = torch.empty(total, dtype=torch.int64, device=device).random_(generator=generator)
    keys = keys.view(batch, n_cells).bitwise_and_(layout.random_mask)
    return keys.bitwise_or_(_cell_index(n_cells, layout.dtype, torch.device(device)))


def _cells_in_key_order(keys_bn: torch.Tensor) -> torch.Tensor:
    """(B, N) int64: the cell indices of each row ordered by increasing key."""
    if keys_bn.device.type == "cpu":
        ordered = torch.from_numpy(np.sort(keys_bn.numpy(), axis=1))
    else:
        ordered = torch.sort(keys_bn, dim=1).values
    return ordered.bitwise_and_(_key_layout(keys_bn.shape[1]).index_mask).long()


def _kth_smallest(keys_bn: torch.Tensor, k: int) -> torch.Tensor:
    """(B, 1): the k-th smallest key of each row (1 <= k <= N), by partial sort."""
    if keys_bn.device.type == "cpu":
        return torch.from_numpy(np.partition(keys_bn.numpy(), k - 1, axis=1)[:, k - 1:k])
    return keys_bn.kthvalue(k, dim=1, keepdim=True).values


def _k_smallest(keys_bn: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N) bool: the ``k`` cells of smallest key in each row (keys unique per row)."""
    if 0 < k < keys_bn.shape[1]:  # exactly k keys are <= the k-th smallest
        return keys_bn <= _kth_smallest(keys_bn, k)
    return torch.full(keys_bn.shape, k > 0, dtype=torch.bool, device=keys_bn.device)


@functools.lru_cache(maxsize=256)
def _rank_patterns(n_cells: int, ratio_salient: float, ratio_background: float,
                   ratio_empty: float, device: torch.device) -> torch.Tensor:
    """(N + 1, N) bool: row ``n`` says which ranks are masked when ``n`` cells are salient.

    Ranks ``[0, n)`` are the salient cells and ``[n, N)`` the background ones (in random
    order); the first ``round(n * ratio_salient)`` of the salient and the first
    ``round((N - n) * ratio_background)`` of the background ranks are masked (row 0, an
    empty region: the first ``round(N * ratio_empty)``).
    """
    rows = []
    for n in range(n_cells + 1):
        k_salient = _count(n, ratio_salient)
        k_background = _count(n_cells, ratio_empty) if n == 0 else _count(n_cells - n,
                                                                            ratio_background)
        rows.append([r < k_salient or n <= r < n + k_background for r in range(n_cells)])
    return torch.tensor(rows, dtype=torch.bool, device=device)


# --------------------------------------------------------------------------- random

def random_masks(batch: int, grid: tuple[int, int], ratio: float, *,
                 generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> MaskBatch:
    """Exactly ``round(N * ratio)`` masked cells per image, uniformly at random."""
    _check_ratio("ratio", ratio)
    device = torch.device(device)
    n_cells = grid[0] * grid[1]
    keys_bn = _random_keys(batch, n_cells, generator, device)  # drawn at every ratio alike
    return _no_regions(_k_smallest(keys_bn, _count(n_cells, ratio)), grid)


def _no_regions(masked_bn: torch.Tensor, grid: tuple[int, int]) -> MaskBatch:
    """The :class:`MaskBatch` of a sampler without regions (nothing salient, no fallback)."""
    none_bn, batch = torch.zeros_like(masked_bn), masked_bn.shape[0]
    return MaskBatch(masked_bn.view(batch, *grid), none_bn.view(batch, *grid), none_bn[:, 0])


# --------------------------------------------------------------------------- regions

def cell_occupancy(regions_bhw: torch.Tensor, patch: int) -> torch.Tensor:
    """Fraction of each grid cell covered by the region: (B, H, W) → (B, gh, gw) in [0, 1]."""
    gh, gw = grid_shape(regions_bhw.shape[-2], regions_bhw.shape[-1], patch)
    if regions_bhw.dtype == torch.bool:  # exact integer counts, cheaper than float pooling
        # Sum the p pixel rows of each band of cells first (whole rows at a time, which
        # vectorizes), then the p columns of each cell; int16 holds p * p up to p = 181.
        acc = torch.int16 if patch * patch <= torch.iinfo(torch.int16).max else torch.int32
        rows = regions_bhw.view(torch.uint8).reshape(-1, patch, regions_bhw.shape[-1])
        cells = rows.sum(1, dtype=acc).view(-1, gh, gw, patch).sum(3, dtype=acc)
        return cells.float().div_(patch * patch)
    return F.avg_pool2d(regions_bhw.float().unsqueeze(1), patch).squeeze(1)


def salient_cells(occupancy_bhw: torch.Tensor, threshold: float = DEFAULT_OCCUPANCY) -> torch.Tensor:
    """Cells whose occupancy reaches ``threshold``.

    A region that covers some pixels but no cell up to the threshold (thinner than a
    cell, or straddling cell borders) keeps its most-covered cell(s), so a non-empty
    region never vanishes from the grid.
    """
    # No cell reaches the threshold exactly when the peak is below it; then the cells at
    # the peak are kept. So the per-image level is min(peak, threshold), except that an
    # empty image (peak 0) must keep nothing: the level is clamped up to the smallest
    # positive normal float32 (subnormal occupancies, ~1e-38, count as empty).
    peak_b11 = occupancy_bhw.flatten(1).amax(1).view(-1, 1, 1)
    level_b11 = peak_b11.clamp(min=_TINY, max=threshold)
    return occupancy_bhw >= level_b11


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
    for name, value in (("ratio_salient", ratio_salient), ("ratio_background", ratio_background),
                        ("empty_ratio", fallback)):
        _check_ratio(name, value)
    batch, gh, gw = salient_bhw.shape
    n_cells = gh * gw
    device = salient_bhw.device
    salient_bn = salient_bhw.reshape(batch, n_cells).bool()
    n_salient_b = salient_bn.sum(1)
    # Salient keys get the group bit subtracted: they sort first, in random order, then
    # the background cells in random order; the pattern for each row's n masks the exact
    # per-group counts by rank (see the module docstring).
    keys_bn = torch.add(_random_keys(batch, n_cells, generator, device), salient_bn,
                        alpha=-_key_layout(n_cells).group)
    cells_bn = _cells_in_key_order(keys_bn)
    patterns = _rank_patterns(n_cells, float(ratio_salient), float(ratio_background),
                              float(fallback), device)
    masked_bn = torch.empty_like(salient_bn).scatter_(
        1, cells_bn, patterns.index_select(0, n_salient_b))
    return MaskBatch(masked_bn.view(batch, gh, gw), salient_bhw, n_salient_b == 0)


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
    n_cells = gh * gw
    u_bn = torch.rand(batch, n_cells, generator=generator, device=source.device)
    log_key_bn = u_bn.clamp_min_(1e-12).log_().div_(weight_bhw.reshape(batch, n_cells))
    chosen_bk = log_key_bn.topk(_count(n_cells, ratio), dim=1, sorted=False).indices  # k largest
    masked_bn = torch.zeros(batch, n_cells, dtype=torch.bool, device=source.device).scatter_(
        1, chosen_bk, True)
    empty_b = ~salient_bhw.flatten(1).any(1)
    return MaskBatch(masked_bn.view(batch, gh, gw), salient_bhw, empty_b)


# --------------------------------------------------------------------------- loss-guided

def loss_guided_masks(batch: int, grid: tuple[int, int], ratio: float, hard_fraction: float, *,
                      losses_bhw: torch.Tensor | None = None,
                      generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> MaskBatch:
    """Exactly ``k = round(N * ratio)`` masked cells per image: the ``round(k * hard_fraction)``
    of highest loss in ``losses_bhw`` (float (B, gh, gw), NaN = not measured, ranked last;
    None: nothing measured), the others uniformly from the rest. Ties break at random, so
    an image with nothing measured is masked uniformly, as :func:`random_masks`."""
    _check_ratio("ratio", ratio)
    _check_ratio("hard_fraction", hard_fraction)
    n_cells = grid[0] * grid[1]
    k = _count(n_cells, ratio)
    if losses_bhw is None:  # nothing measured
        losses_bhw = torch.full((batch, n_cells), float("nan"), device=device)
    hard_bn = _hardest(losses_bhw.flatten(1).float(), _count(k, hard_fraction), generator)
    # The hard cells sort first (as salient cells do): the k smallest are they + a uniform draw.
    keys_bn = torch.add(_random_keys(batch, n_cells, generator, losses_bhw.device), hard_bn,
                        alpha=-_key_layout(n_cells).group)
    return _no_regions(_k_smallest(keys_bn, k), grid)


def _hardest(losses_bn: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """(B, N) bool: each row's ``k`` highest losses (NaN lowest), ties in random order, from
    unique int64 keys: the loss's float32 bits as order-preserving int32, then random bits."""
    bits_bn = losses_bn.contiguous().view(torch.int32)
    order_bn = torch.where(bits_bn >= 0, bits_bn, bits_bn ^ 0x7FFFFFFF).masked_fill_(
        losses_bn.isnan(), torch.iinfo(torch.int32).min)  # negative floats: other bits flipped
    # the low 31 bits of unique random keys (random bits above the cell index) stay unique
    ties_bn = _random_keys(*losses_bn.shape, generator, losses_bn.device).long() & 0x7FFFFFFF
    return _k_smallest(((order_bn.long() << 31) | ties_bn).neg_(), k)


def upsample_cells(cells_bhw: torch.Tensor, patch: int) -> torch.Tensor:
    """Grid cells (B, gh, gw) → pixels (B, gh*p, gw*p), each cell repeated p x p."""
    return cells_bhw.repeat_interleave(patch, dim=1).repeat_interleave(patch, dim=2)


# --------------------------------------------------------------------------- reference

def reference_random_masks(batch: int, grid: tuple[int, int], ratio: float, *,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """The specification of :func:`random_masks`: bool (B, gh, gw), ``round(N * ratio)``
    cells per image, every set of that size equally likely."""
    n_cells = grid[0] * grid[1]
    noise_bn = torch.rand(batch, n_cells, generator=generator)
    rank_bn = noise_bn.argsort(dim=1).argsort(dim=1)          # each cell's place in the order
    return (rank_bn < _count(n_cells, ratio)).view(batch, *grid)


def reference_region_masks(salient_bhw: torch.Tensor, ratio_salient: float,
                           ratio_background: float, *, empty_ratio: float | None = None,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """The specification of :func:`masks_from_salient_cells`: bool (B, gh, gw).

    Noise in [0, 1) minus 1 for salient cells puts them first in a random order, then the
    background cells in a random order; the first ``round(n * ratio_salient)`` salient
    and the first ``round((N - n) * ratio_background)`` background cells are masked (an
    image without salient cells: the first ``round(N * empty_ratio)``).
    """
    fallback = ratio_background if empty_ratio is None else empty_ratio
    batch, gh, gw = salient_bhw.shape
    salient_bn = salient_bhw.reshape(batch, -1).bool()
    n_cells = salient_bn.shape[1]
    noise_bn = torch.rand(batch, n_cells, generator=generator) - salient_bn.float()
    rank_bn = noise_bn.argsort(dim=1).argsort(dim=1)
    masked = []
    for rank_n, n_salient in zip(rank_bn, salient_bn.sum(1).tolist()):
        k_salient = _count(n_salient, ratio_salient)
        k_background = _count(n_cells - n_salient, ratio_background) if n_salient else \
            _count(n_cells, fallback)
        masked.append((rank_n < k_salient)
                      | ((rank_n >= n_salient) & (rank_n < n_salient + k_background)))
    return torch.stack(masked).view(batch, gh, gw)


# --------------------------------------------------------------------------- registry

@dataclass(kw_only=True)
class MaskingParams:
    """Every masking parameter with its default and range; each strategy reads some."""

    ratio: float = opt(0.6, "overall mask ratio (random, budget, soft, loss-guided)", low=0.0,
                       high=1.0)
    ratio_salient: float = opt(0.8, "mask ratio inside the region (region)", low=0.0, high=1.0)
    ratio_background: float = opt(0.4, "mask ratio outside the region (region)", low=0.0,
                                  high=1.0)
    emphasis: float = opt(3.0, "budget/soft: how many times as likely a salient cell is "
                          "masked as a background cell", above=0.0)
    occupancy: float = opt(DEFAULT_OCCUPANCY, "fraction of a cell the region must cover to "
                           "make it salient", low=0.0, high=1.0)
    empty_ratio: float | None = opt(None, "region: ratio for images with an empty region "
                                    "(default: --ratio-background)", low=0.0, high=1.0)
    hard_fraction: float = opt(0.5, "loss-guided: share of the masked cells taken from those of "
                               "highest loss at the image's last visit", low=0.0, high=1.0)

    def __post_init__(self) -> None:
        check_ranges(self)


Sampler = Callable[[torch.Tensor, int, MaskingParams, "torch.Generator | None"], MaskBatch]


@dataclass(frozen=True)
class MaskingStrategy:
    """A registered masking strategy.

    ``sample(regions_bhw, patch, params, generator)``: the masks of a batch whose region
    masks (bool, or float saliency in [0, 1] when ``continuous``) are ``regions_bhw`` at
    the input size; ``patch`` is the mask cell size in pixels. ``needs_regions``: the
    strategy reads region masks; ``params``: the :class:`MaskingParams` fields it uses.
    ``reads_losses``: the trainer keeps each image's per-cell losses and passes those of
    the batch as ``sample(..., losses_bhw=)`` (float (B, gh, gw), NaN = not measured).
    """

    name: str
    sample: Sampler
    params: tuple[str, ...]
    needs_regions: bool
    continuous: bool
    help: str
    reads_losses: bool = False


MASKINGS: Registry[MaskingStrategy] = Registry("masking strategy")


def register_masking(name: str, *, params: tuple[str, ...], needs_regions: bool,
                     continuous: bool = False, reads_losses: bool = False,
                     help: str) -> Callable[[Sampler], Sampler]:
    """Register the decorated sampler as the masking strategy ``name``."""
    unknown = set(params) - {f for f in MaskingParams.__dataclass_fields__}
    if unknown:
        raise ValueError(f"masking {name!r}: unknown parameter(s) {sorted(unknown)}")

    def decorate(sample: Sampler) -> Sampler:
        MASKINGS.register(name, MaskingStrategy(name, sample, tuple(params), needs_regions,
                                                continuous, help, reads_losses))
        return sample
    return decorate


def default_masking(has_regions: bool) -> str:
    """The strategy used when none is named: region-aware with regions, else random."""
    return "region" if has_regions else "random"


@register_masking("random", params=("ratio",), needs_regions=False,
                  help="exactly --ratio of the cells, uniformly (SparK)")
def _sample_random(regions_bhw, patch, params, generator):
    grid = grid_shape(regions_bhw.shape[1], regions_bhw.shape[2], patch)
    return random_masks(regions_bhw.shape[0], grid, params.ratio, generator=generator,
                        device=regions_bhw.device)


@register_masking("region", params=("ratio_salient", "ratio_background", "occupancy",
                                    "empty_ratio"), needs_regions=True,
                  help="--ratio-salient of the region's cells, --ratio-background of the rest")
def _sample_region(regions_bhw, patch, params, generator):
    return region_masks(regions_bhw, patch, params.ratio_salient, params.ratio_background,
                        threshold=params.occupancy, empty_ratio=params.empty_ratio,
                        generator=generator)


@register_masking("budget", params=("ratio", "emphasis", "occupancy"), needs_regions=True,
                  help="exactly --ratio overall, salient cells --emphasis times as likely")
def _sample_budget(regions_bhw, patch, params, generator):
    return budget_masks(patch, params.ratio, params.emphasis, regions_bhw=regions_bhw,
                        threshold=params.occupancy, generator=generator)


@register_masking("soft", params=("ratio", "emphasis", "occupancy"), needs_regions=True,
                  continuous=True, help="budget weighted by continuous saliency maps given "
                  "as --regions")
def _sample_soft(regions_bhw, patch, params, generator):
    return budget_masks(patch, params.ratio, params.emphasis, saliency_bhw=regions_bhw.float(),
                        threshold=params.occupancy, generator=generator)


@register_masking("loss-guided", params=("ratio", "hard_fraction"), needs_regions=False,
                  reads_losses=True, help="exactly --ratio, --hard-fraction of it the cells "
                  "with the highest loss at the image's last visit, the rest uniformly")
def _sample_loss_guided(regions_bhw, patch, params, generator, losses_bhw=None):
    grid = grid_shape(regions_bhw.shape[1], regions_bhw.shape[2], patch)
    return loss_guided_masks(regions_bhw.shape[0], grid, params.ratio, params.hard_fraction,
                             losses_bhw=losses_bhw, generator=generator, device=regions_bhw.device)
