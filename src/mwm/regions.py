"""Region helpers on the ground floor: masks, saliency scale, components and boxes.

Shared by the metrics (:mod:`mwm.metrics`), the postprocessing of saliency maps
(:mod:`mwm.localize.postprocess`), the dense CRF and SAM refinement, so none of them
imports another for these basics.

Conventions (see ``docs/postprocess-and-metrics.md``):

* saliency scale: ``uint8`` maps are divided by 255, ``uint16`` by 65535, ``bool`` is
  0/1, float maps must already lie in [0, 1] (:func:`as_unit_saliency`);
* a mask is any 2-D array, non-zero = foreground (:func:`as_mask`);
* connected components are 8-connected by default (``connectivity=4`` available);
  holes are background regions not 4-connected to the image border;
* component order (for ties and for the list of boxes) is the raster order of each
  component's first pixel: top-most row first, then left-most pixel in that row;
* boxes are ``(x0, y0, x1, y1)`` with exclusive ends (``mask[y0:y1, x0:x1]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

CONNECTIVITIES = (4, 8)
Box = tuple[int, int, int, int]


# --------------------------------------------------------------------------- inputs

def as_unit_saliency(saliency: Any) -> np.ndarray:
    """A saliency map as float64 ``(H, W)`` in [0, 1].

    ``uint8`` → /255, ``uint16`` → /65535, ``bool`` → 0/1, floats kept (they must be finite
    and within [0, 1]). A ``(H, W, 1)`` array or a gray image stored as three equal
    channels is accepted; a colour-mapped rendering (channels differ) is refused.
    """
    arr = np.asarray(saliency)
    if arr.ndim == 3 and arr.shape[2] in (1, 3, 4):
        channels = arr[:, :, :3] if arr.shape[2] == 4 else arr
        if not all(np.array_equal(channels[:, :, 0], channels[:, :, c])
                   for c in range(1, channels.shape[2])):
            raise ValueError(
                f"saliency map must be gray (H, W); got {arr.shape[2]} channels that differ "
                "(a colour-mapped rendering?). Save the raw map as a gray PNG.")
        arr = channels[:, :, 0]
    if arr.ndim != 2:
        raise ValueError(f"saliency map must be 2-D (H, W), got shape {arr.shape}")
    if arr.dtype == np.bool_:
        return arr.astype(np.float64)
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float64) / 65535.0
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"saliency map must be float in [0, 1], uint8, uint16 or bool; "
                         f"got {arr.dtype}")
    out = arr.astype(np.float64)
    if out.size and not np.all(np.isfinite(out)):
        raise ValueError("saliency map holds NaN or infinite values")
    if out.size and (out.min() < -1e-6 or out.max() > 1.0 + 1e-6):
        raise ValueError(f"float saliency map must lie in [0, 1], got values in "
                         f"[{out.min():.4g}, {out.max():.4g}]")
    return np.clip(out, 0.0, 1.0)


def as_mask(mask: Any, name: str = "mask") -> np.ndarray:
    """A 2-D bool array (non-zero = foreground)."""
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (H, W), got shape {arr.shape}")
    return arr if arr.dtype == np.bool_ else arr != 0


def check_connectivity(connectivity: int) -> int:
    if connectivity not in CONNECTIVITIES:
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
    return int(connectivity)


# --------------------------------------------------------------------------- components

@dataclass(frozen=True)
class Components:
    """Connected components of a mask, in raster order of their first pixel.

    ``labels`` is the label image (0 = background); ``ids[i]`` is the label of the i-th
    component, ``areas[i]`` its pixel count, ``boxes[i]`` its tight box
    ``(x0, y0, x1, y1)`` with exclusive ends.
    """

    labels: np.ndarray
    ids: np.ndarray
    areas: np.ndarray
    boxes: np.ndarray  # (n, 4) int64

    def __len__(self) -> int:
        return int(self.ids.size)


def connected_components(mask: Any, connectivity: int = 8) -> Components:
    """Label the components of ``mask`` (OpenCV) and order them by their first pixel."""
    import cv2

    mask = as_mask(mask)
    connectivity = check_connectivity(connectivity)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(
        mask.astype(np.uint8), connectivity=connectivity, ltype=cv2.CV_32S)
    if n <= 1:
        return Components(labels, np.zeros(0, np.int64), np.zeros(0, np.int64),
                          np.zeros((0, 4), np.int64))
    # OpenCV's label numbering depends on its scan algorithm; order explicitly by the
    # raster index of each component's first pixel so ties are broken the same everywhere.
    found, first = np.unique(labels.ravel(), return_index=True)
    ids = found[found > 0]
    first = first[found > 0]
    ids = ids[np.argsort(first, kind="stable")]
    x, y, w, h, area = (stats[ids, i].astype(np.int64) for i in range(5))
    boxes = np.stack([x, y, x + w, y + h], axis=1)
    return Components(labels, ids.astype(np.int64), area, boxes)


def keep_largest_components(mask: Any, k: int | None, connectivity: int = 8,
                            weights: Any = None) -> np.ndarray:
    """Keep exactly the ``k`` largest connected components (all of them if fewer).

    Equal areas are broken by raster order of the components' first pixels (the
    component whose top-most, then left-most, pixel comes first wins). ``k`` None or
    ``<= 0`` keeps every component. With ``weights`` (an array of the mask's shape, e.g.
    the saliency map), a component's size is the sum of its pixels' weights instead of
    its area ("saliency mass").
    """
    mask = as_mask(mask)
    if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer))):
        raise ValueError(f"k must be an integer or None, got {k!r}")
    if k is None or k <= 0:
        return mask.copy()
    comps = connected_components(mask, connectivity)
    if len(comps) <= k:
        return mask.copy()
    size = comps.areas
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != mask.shape:
            raise ValueError(f"weights have shape {w.shape}, the mask {mask.shape}")
        size = np.bincount(comps.labels.ravel(), weights=w.ravel(),
                           minlength=int(comps.labels.max()) + 1)[comps.ids]
    # stable sort by decreasing size keeps the raster order among equal sizes
    order = np.argsort(-size, kind="stable")[: int(k)]
    keep = np.zeros(int(comps.labels.max()) + 1, dtype=bool)
    keep[comps.ids[order]] = True
    return keep[comps.labels]


def fill_holes(mask: Any) -> np.ndarray:
    """Fill background regions enclosed by the mask (not 4-connected to the border)."""
    from scipy import ndimage

    return ndimage.binary_fill_holes(as_mask(mask))


# --------------------------------------------------------------------------- boxes

def component_boxes(mask: Any, connectivity: int = 8) -> list[Box]:
    """Tight box ``(x0, y0, x1, y1)`` (exclusive ends) of each connected component."""
    return [tuple(int(v) for v in box) for box in connected_components(mask, connectivity).boxes]


def scale_box(box: Box, ratio: float, shape: tuple[int, int]) -> Box:
    """Scale a box about its centre by ``ratio`` and clamp it to an image of ``shape``.

    Each side moves out by ``round_half_up((ratio * w - w) / 2)`` pixels horizontally
    (``h`` vertically), so the growth is the same on both sides and the new width is
    ``w + 2 * margin`` (``ratio * w`` rounded to a size of the same parity as ``w``).
    Clamping cuts the box at the image border; it does not shift it.
    """
    ratio = check_box_ratio(ratio)
    x0, y0, x1, y1 = (int(v) for v in box)
    height, width = int(shape[0]), int(shape[1])
    mx = _margin(x1 - x0, ratio)
    my = _margin(y1 - y0, ratio)
    return max(0, x0 - mx), max(0, y0 - my), min(width, x1 + mx), min(height, y1 + my)


def expanded_boxes(mask: Any, ratio: float = 1.0, connectivity: int = 8) -> list[Box]:
    """The boxes :func:`expand_boxes` fills, one per component (raster order)."""
    mask = as_mask(mask)
    return [scale_box(b, ratio, mask.shape) for b in component_boxes(mask, connectivity)]


def expand_boxes(mask: Any, ratio: float = 1.0, connectivity: int = 8) -> np.ndarray:
    """Union of each component's bounding box scaled by ``ratio`` (see :func:`scale_box`).

    ``ratio=1`` gives the tight boxes.
    """
    mask = as_mask(mask)
    return boxes_to_mask(expanded_boxes(mask, ratio, connectivity), mask.shape)


def boxes_to_mask(boxes: Any, shape: tuple[int, int]) -> np.ndarray:
    """Bool mask of ``shape``, true inside any of the boxes."""
    out = np.zeros((int(shape[0]), int(shape[1])), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        out[max(0, int(y0)):max(0, int(y1)), max(0, int(x0)):max(0, int(x1))] = True
    return out


def check_box_ratio(ratio: float) -> float:
    ratio = float(ratio)
    if not math.isfinite(ratio) or ratio < 1.0:
        raise ValueError(f"box ratio must be a finite number >= 1, got {ratio}")
    return ratio


def _margin(size: int, ratio: float) -> int:
    # round half up; the epsilon absorbs binary representation error (5 * 1.2 - 5 = 0.999..)
    return int(math.floor((size * ratio - size) / 2.0 + 0.5 + 1e-9))
