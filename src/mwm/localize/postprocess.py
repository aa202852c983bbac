"""Saliency map → binary region mask.

A vision-language model gives one saliency map per image (float in [0, 1], or an 8/16-bit
PNG of it). This module turns it into a bool region mask ``(H, W)`` of the same size:

1. **binarize** (:func:`binarize`) with a fixed threshold, Otsu's threshold or 2-cluster
   k-means — or refine it with a dense CRF guided by the image (:mod:`mwm.localize.crf`);
2. keep the **k largest connected components** (:func:`keep_largest_components`);
3. **fill holes** (:func:`fill_holes`);
4. optionally replace each component by its **bounding box**, scaled about its centre
   (:func:`expand_boxes`).

:func:`postprocess` runs the pipeline in one call; :class:`PostprocessConfig` holds its
parameters and round-trips through a plain dict (saved as JSON next to the outputs);
:func:`postprocess_folder` runs it over a folder of maps.

The saliency scale, components and boxes are the ground-floor helpers of
:mod:`mwm.regions` (their conventions are stated there); in addition, a **constant map**
(no contrast, e.g. all zeros) gives an **empty** mask, whatever the method or threshold:
it carries no localization. See ``docs/postprocess-and-metrics.md``.

:func:`postprocess_folder` also gives an **empty** mask to every image that ``mwm localize
--abstain`` found without the prompt's finding (``presence.csv``, ``docs/presence.md``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..config import default_of, opt
from ..regions import (CONNECTIVITIES, as_unit_saliency, check_box_ratio, check_connectivity,
                       expand_boxes,
                       fill_holes, keep_largest_components)

from .crf import ANCHORS, CRFParams

BINARIZE_METHODS = ("threshold", "otsu", "kmeans")
#: How ``top_k`` ranks components: by pixel count, or by saliency mass (sum of the map).
RANKS = ("area", "mass")


# --------------------------------------------------------------------------- binarize

def binarize(saliency: Any, method: str = "threshold", threshold: float = 0.3) -> np.ndarray:
    """Saliency map → bool mask.

    * ``"threshold"``: foreground where the value (on the [0, 1] scale) is ``> threshold``;
    * ``"otsu"``: the map is quantized to 256 levels (``round(p * 255)``) and split at
      Otsu's threshold ``t`` (maximal between-class variance, first maximum), foreground
      ``level > t`` — the same result as OpenCV's ``THRESH_OTSU`` on the 8-bit map;
    * ``"kmeans"``: 1-D k-means with two clusters on the map values, centres initialized
      at the minimum and maximum (deterministic), Lloyd iterations until the assignment is
      stable; foreground = the cluster with the higher centre (a value exactly midway
      between the centres goes to the lower cluster).

    A constant map gives an empty mask for every method.
    """
    p = as_unit_saliency(saliency)
    level = binarize_level(p, method, threshold)
    if level is None:
        return np.zeros(p.shape, dtype=bool)
    if method == "otsu":  # compare 8-bit levels with Otsu's t, as OpenCV does
        return np.rint(p * 255.0) > round(level * 255.0 - 0.5)
    return p > level


def binarize_level(saliency: Any, method: str = "threshold", threshold: float = 0.3
                   ) -> float | None:
    """The cut of :func:`binarize` on the [0, 1] scale (foreground ``p > level``).

    Otsu's cut lies between two 8-bit levels, so its level is ``(t + 0.5) / 255``.
    ``None`` for a constant (or empty) map, which has no foreground.
    """
    if method not in BINARIZE_METHODS:
        raise ValueError(f"method must be one of {BINARIZE_METHODS}, got {method!r}")
    p = as_unit_saliency(saliency)
    if p.size == 0 or p.max() == p.min():
        return None
    if method == "threshold":
        threshold = float(threshold)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        return threshold
    if method == "otsu":
        return (otsu_level(np.rint(p * 255.0).astype(np.uint8)) + 0.5) / 255.0
    low, high = kmeans_1d(p)
    return (low + high) / 2.0


def anchor_at_half(p: np.ndarray, level: float) -> np.ndarray:
    """Rescale a [0, 1] map piecewise linearly so that ``level`` becomes 0.5 (0 and 1 stay)."""
    level = min(max(float(level), 1e-6), 1.0 - 1e-6)
    low = 0.5 * p / level
    high = 0.5 + 0.5 * (p - level) / (1.0 - level)
    return np.where(p <= level, low, high).astype(np.float32)


def otsu_level(levels: np.ndarray) -> int:
    """Otsu's threshold of 8-bit values: foreground is ``levels > otsu_level(levels)``."""
    levels = np.asarray(levels)
    if levels.dtype != np.uint8:
        raise ValueError(f"otsu_level needs uint8 values, got {levels.dtype}")
    hist = np.bincount(levels.ravel(), minlength=256).astype(np.float64)
    prob = hist / max(hist.sum(), 1.0)
    omega = np.cumsum(prob)                       # weight of class "<= t"
    mu = np.cumsum(prob * np.arange(256))         # first moment of class "<= t"
    mu_total = mu[-1]
    denom = omega * (1.0 - omega)
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma_b = np.where(denom > 0, (mu_total * omega - mu) ** 2 / denom, -1.0)
    return int(np.argmax(sigma_b))                # first maximum


def kmeans_1d(values: np.ndarray, max_iter: int = 100) -> tuple[float, float]:
    """Centres (low, high) of 2-cluster k-means on ``values``, initialized at min and max."""
    v = np.asarray(values, dtype=np.float64).ravel()
    low, high = float(v.min()), float(v.max())
    if low == high:
        return low, high
    fg = v > (low + high) / 2.0
    for _ in range(max_iter):
        low, high = float(v[~fg].mean()), float(v[fg].mean())
        new_fg = v > (low + high) / 2.0
        if np.array_equal(new_fg, fg):
            break
        fg = new_fg
    return low, high


# --------------------------------------------------------------------------- pipeline

@dataclass(frozen=True)
class PostprocessConfig:
    """Parameters of :func:`postprocess`; ``to_dict``/``from_dict`` round-trip via JSON.

    ``crf`` None = binarize with ``method``/``threshold``; otherwise a
    :class:`~mwm.localize.crf.CRFParams` and the dense CRF replaces binarization (with
    ``crf.anchor = "binarization"`` the CRF starts from the ``method`` cut: the map is
    rescaled so that cut becomes 0.5, the CRF's own decision point).
    """

    method: str = opt("kmeans", "binarization: a fixed threshold, Otsu, or 2-cluster k-means on "
                      "the map values", choices=BINARIZE_METHODS)
    threshold: float = opt(0.3, "for --method threshold: foreground where saliency > T",
                           low=0.0, high=1.0)
    top_k: int | None = opt(None, "keep the K largest connected components (0 or none = all)",
                            low=0)
    fill: bool = opt(True, "fill holes")
    box_ratio: float | None = opt(None, "replace each component by its box scaled by R about "
                                  "its centre", low=1.0)
    crf: "CRFParams | None" = opt(None, "dense CRF parameters (instead of binarization)",
                                  cli=False)
    connectivity: int = opt(8, "pixel connectivity of components", choices=CONNECTIVITIES)
    rank: str = opt("area", "how --top-k ranks components: pixel count or saliency mass",
                    choices=RANKS)

    def __post_init__(self) -> None:
        if self.rank not in RANKS:
            raise ValueError(f"rank must be one of {RANKS}, got {self.rank!r}")
        if self.method not in BINARIZE_METHODS:
            raise ValueError(f"method must be one of {BINARIZE_METHODS}, got {self.method!r}")
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.top_k == 0:
            object.__setattr__(self, "top_k", None)  # 0 = every component, one spelling
        if self.top_k is not None and (isinstance(self.top_k, bool)
                                       or not isinstance(self.top_k, (int, np.integer))):
            raise ValueError(f"top_k must be an integer or None, got {self.top_k!r}")
        if self.box_ratio is not None:
            check_box_ratio(self.box_ratio)
        check_connectivity(self.connectivity)
        object.__setattr__(self, "crf", _crf_params(self.crf))

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["crf"] = None if self.crf is None else self.crf.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PostprocessConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown postprocess parameter(s): {', '.join(unknown)}")
        return cls(**dict(data))

    def apply(self, saliency: Any, image: Any = None) -> np.ndarray:
        """Run :func:`postprocess` with these parameters."""
        return _pipeline(as_unit_saliency(saliency), self, image)[1]


def _crf_params(crf: Any) -> "CRFParams | None":
    if crf is None or crf is False:
        return None
    if crf is True:
        return CRFParams()
    if isinstance(crf, CRFParams):
        return crf
    if isinstance(crf, Mapping):
        return CRFParams.from_dict(crf)
    raise ValueError(f"crf must be None, True, a CRFParams or a dict, got {type(crf).__name__}")


def postprocess(saliency: Any, *, image: Any = None, **settings: Any) -> np.ndarray:
    """Saliency map → bool region mask of the same size, in one call; ``settings`` are
    :class:`PostprocessConfig` fields (its defaults otherwise).

    Binarize (``method``, ``threshold``) — or, when ``crf`` is given (True, a
    :class:`~mwm.localize.crf.CRFParams` or a dict of its fields), refine with a dense CRF
    guided by ``image`` (uint8 RGB ``(H, W, 3)`` or gray ``(H, W)``) — then keep the
    ``top_k`` largest components (None/0 = all; ``rank="mass"``: largest saliency
    sum instead of largest area), fill holes if ``fill``, and if
    ``box_ratio`` is set replace the components by their boxes scaled by it.
    A constant map gives an empty mask.
    """
    return PostprocessConfig(**settings).apply(saliency, image)


def _pipeline(p: np.ndarray, config: PostprocessConfig,
              image: Any) -> tuple[np.ndarray, np.ndarray]:
    """(region mask before boxes, final mask) for a [0, 1] map."""
    if config.crf is not None:
        if image is None:
            raise ValueError("the dense CRF needs the image (uint8 RGB or gray) the map "
                             "was computed on; pass image=...")
        from .crf import dense_crf

        level = binarize_level(p, config.method, config.threshold)
        if level is None:
            region = np.zeros(p.shape, dtype=bool)
        else:
            unary_map = anchor_at_half(p, level) if config.crf.anchor == "binarization" else p
            region = dense_crf(unary_map, image, config.crf)
    else:
        region = binarize(p, config.method, config.threshold)
    region = keep_largest_components(region, config.top_k, config.connectivity,
                                     p if config.rank == "mass" else None)
    if config.fill:
        region = fill_holes(region)
    final = region
    if config.box_ratio is not None:
        final = expand_boxes(region, config.box_ratio, config.connectivity)
    return region, final


# --------------------------------------------------------------------------- folders

@dataclass(kw_only=True)
class PostprocessRun:
    """Settings of ``mwm postprocess``: the folders, and the postprocessing (the fields of
    :class:`PostprocessConfig`, with the dense CRF as flags)."""

    saliency: str = opt(help="folder of saliency maps (PNG, as `mwm localize` writes)",
                        positional=True)
    out: str = opt(help="the mask folder")
    post: PostprocessConfig = opt(factory=PostprocessConfig, flatten=True)
    boxes_out: str | None = opt(None, "also write the (scaled) boxes here", metavar="DIR")
    crf: bool = opt(False, "dense CRF guided by the image instead of binarization (needs "
                    "--images)")
    crf_iterations: int = opt(default_of(CRFParams, "iterations"), "mean-field iterations", low=0)
    crf_anchor: str = opt(default_of(CRFParams, "anchor"), "the CRF's decision point: the map's "
                          "0.5 "
                          "(as published) or the --method cut", choices=ANCHORS)
    images: str | None = opt(None, "the images the maps were made from (CRF)", metavar="DIR")
    quiet: bool = opt(False, "no progress bars")

    def postprocess_config(self) -> PostprocessConfig:
        if not self.crf:
            return self.post
        return dataclasses.replace(self.post, crf={"iterations": self.crf_iterations,
                                                   "anchor": self.crf_anchor})


def postprocess_folder(saliency_dir: str | os.PathLike, out_dir: str | os.PathLike,
                       config: PostprocessConfig | Mapping[str, Any] | None = None, *,
                       images_dir: str | os.PathLike | None = None,
                       boxes_dir: str | os.PathLike | None = None,
                       presence: str | os.PathLike | None = None,
                       progress: bool = True) -> dict[str, Any]:
    """Postprocess every saliency map in ``saliency_dir``.

    Writes ``out_dir/<name>.png`` (uint8 0/255, the map's size) = :func:`postprocess` of
    the map with ``config``. If ``boxes_dir`` is given, also writes there the boxes of the
    region mask (before any box step) scaled by ``config.box_ratio`` (1 = tight boxes when
    unset). ``images_dir`` is required for the CRF; images pair with maps by name (file
    stem, any extension). A map that fails (unreadable, wrong size, missing image) is
    recorded in ``failures`` and the others go on. When ``mwm localize`` wrote the folder,
    only the maps its manifest lists are read (:func:`~mwm.runlog.stage_outputs`): other
    files there are ``ignored``, a listed map that is missing is a failure.

    ``presence``: a ``presence.csv`` (``mwm localize --abstain``; default: the one the
    maps folder's manifest lists, if any); an image marked absent there gets an all-zero
    mask (and no boxes) of its map's size, whatever its map, and the table is copied
    into ``out_dir`` (listed in ``outputs``) for ``mwm evaluate``.

    Returns ``{"n_maps", "n_written", "n_failed", "failures": [{"name", "file",
    "reason"}], "outputs", "ignored", "out_dir", "boxes_dir", "config", "n_absent",
    "absent", "presence"}`` (``absent``: the names given an empty mask as absent).
    """
    from ..errors import DataError
    from ..data.layouts import find_images
    from ..files import write_bytes
    from ..progress import progress as progress_bar
    from .presence import PRESENCE_CSV, listed_presence, read_presence

    if config is None:
        config = PostprocessConfig()
    elif isinstance(config, Mapping):
        config = PostprocessConfig.from_dict(config)
    if config.crf is not None and images_dir is None:
        raise ValueError("the dense CRF needs the images: pass images_dir (images are "
                         "paired with saliency maps by file stem).")
    if config.crf is not None:
        from .crf import INSTALL_HINT, crf_available

        if not crf_available():
            raise ImportError(INSTALL_HINT)
    maps, ignored, failures = _listed_maps(saliency_dir)
    images = {ref.name: ref for ref in find_images(images_dir)} if config.crf is not None else {}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if boxes_dir is not None:
        Path(boxes_dir).mkdir(parents=True, exist_ok=True)
    if presence is None:
        presence = listed_presence(saliency_dir, ("localize",))
    decided = read_presence(presence) if presence is not None else {}
    absent_names = {name for name, (_, present) in decided.items() if not present}

    written: list[str] = []
    absent: list[str] = []
    for ref in progress_bar(maps, total=len(maps), desc="postprocess", unit="map",
                            enabled=progress):
        try:
            is_absent = ref.name in absent_names
            written.append(_write_region(ref, config, is_absent, images, images_dir, out_dir,
                                         boxes_dir))
            if is_absent:
                absent.append(ref.name)
        except (DataError, ValueError, OSError, ImportError) as err:
            failures.append({"name": ref.name, "file": str(ref.path),
                             "reason": f"{type(err).__name__}: {err}"})
    outputs = list(written)
    if presence is not None:
        write_bytes(out_dir / PRESENCE_CSV, Path(presence).read_bytes())
        outputs.append(PRESENCE_CSV)
    return {"n_maps": len(maps), "n_written": len(written), "n_failed": len(failures),
            "failures": failures, "outputs": outputs, "ignored": ignored, "out_dir": str(out_dir),
            "boxes_dir": None if boxes_dir is None else str(boxes_dir),
            "config": config.to_dict(), "n_absent": len(absent), "absent": absent,
            "presence": None if presence is None else str(presence)}


def _write_region(ref, config: PostprocessConfig, absent: bool, images, images_dir, out_dir: Path,
                  boxes_dir) -> str:
    """Write one map's region mask (empty when ``absent``) and boxes; the mask's file name."""
    from ..data.io import read_image
    from ..files import safe_child, write_png

    p = as_unit_saliency(read_image(ref).pixels)
    if absent:  # abstained: no region, whatever the map shows
        region = final = np.zeros(p.shape, dtype=bool)
    else:
        image = _crf_image(ref.name, images, images_dir, p.shape) if config.crf is not None \
            else None
        region, final = _pipeline(p, config, image)
    targets = [(safe_child(out_dir, f"{ref.name}.png"), final)]
    if boxes_dir is not None:
        box_ratio = config.box_ratio if config.box_ratio is not None else 1.0
        targets.append((safe_child(boxes_dir, f"{ref.name}.png"),
                        expand_boxes(region, box_ratio, config.connectivity)))
    for path, mask in targets:
        write_png(path, mask.astype(np.uint8) * 255)
    return targets[0][0].name


def _listed_maps(saliency_dir) -> tuple[list, list[str], list[dict[str, str]]]:
    """The maps to read: those ``mwm localize`` listed, when it wrote the folder (else every
    image); the names of the other files; failures for listed maps that are missing."""
    from ..data.io import is_image_file
    from ..data.layouts import find_images
    from ..runlog import stage_outputs

    maps = find_images(saliency_dir)
    listed = stage_outputs(saliency_dir, ("localize",))
    if listed is None:
        return maps, [], []
    listed = {name for name in listed if is_image_file(name)}  # not presence.csv / .json
    kept = [ref for ref in maps if ref.path.name in listed]
    ignored = sorted(ref.path.name for ref in maps if ref.path.name not in listed)
    present = {ref.path.name for ref in kept}
    missing = [{"name": Path(name).stem, "file": str(Path(saliency_dir) / name),
                "reason": "listed by `mwm localize` but missing: re-run it to finish the maps"}
               for name in sorted(listed - present)]
    return kept, ignored, missing


def _crf_image(name: str, images: Mapping[str, Any], images_dir: Any,
               shape: tuple[int, int]) -> np.ndarray:
    from ..errors import DataError
    from ..data.io import read_image
    from .crf import image_to_rgb8

    ref = images.get(name)
    if ref is None:
        raise DataError(f"no image named {name}.* in {images_dir}; the CRF needs the image "
                        "each saliency map was computed on.")
    rgb = image_to_rgb8(read_image(ref))
    if rgb.shape[:2] != tuple(shape):
        raise DataError(f"{ref.path}: image is {rgb.shape[1]}x{rgb.shape[0]} (WxH) but its "
                        f"saliency map is {shape[1]}x{shape[0]}; they must have the same size.")
    return rgb
