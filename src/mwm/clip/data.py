"""Image–caption pairs for contrastive training: reading, preprocessing, augmentation.

``pairs`` is either

* a CSV file with ``image`` and ``caption`` columns (paths relative to the CSV's folder;
  an optional ``split`` column keeps only the ``train`` rows when any row has one), or
* a folder with ``captions.csv`` (as ``mwm phantoms`` writes): when the folder also
  holds ``labels.csv`` with a ``split`` column, only its **train** images are used, and
  its ``label`` and ``prompt`` columns are attached to the pairs.

Preprocessing matches the localization adapters: ``to_model_input`` (float32 (3, H, W)
in [0, 1]) → zero-pad to a centred square → resize to the model's input size. The
model's mean/std normalisation is applied later, on the batch.

Augmentation (training only, on the batch, see :func:`augment_batch`): a random
resized crop that keeps 80–100 % of the side, a mild brightness/contrast jitter and,
with probability ``hflip``, a horizontal flip **with the words "left" and "right"
swapped in the caption** so that side statements stay true (MWM's images follow the
radiological convention, but a flip mirrors the anatomy whatever the convention).
"""

from __future__ import annotations

import csv
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch

import numpy as np

from ..errors import DataError

from ..data.io import is_image_file, read_image, to_model_input

NO_FINDING_LABELS = ("", "none", "normal", "healthy", "no finding", "no lesion")


@dataclass(frozen=True)
class CaptionPair:
    """One training pair: an image file, its caption, and optional label/prompt."""

    image: Path
    caption: str
    label: str | None = None
    prompt: str | None = None


# --------------------------------------------------------------------------- reading

def read_pairs(pairs: str | os.PathLike, split: str = "train") -> list[CaptionPair]:
    """Resolve a CSV or a phantom-style folder to a list of :class:`CaptionPair`."""
    source = Path(pairs)
    if source.is_dir():
        captions_csv = source / "captions.csv"
        if not captions_csv.is_file():
            raise DataError(f"{captions_csv}: caption file not found. A pairs folder needs "
                            "captions.csv with image,caption columns (as `mwm phantoms` "
                            "writes), or pass a CSV file with those columns.")
        rows = _read_rows(captions_csv, ("image", "caption"))
        labels_csv = source / "labels.csv"
        meta = _read_rows(labels_csv, ("image",)) if labels_csv.is_file() else []
        by_image = {_key(source, r["image"]): r for r in meta}
        out = []
        wanted = split if any((r.get("split") or "").strip() for r in meta) else None
        for line, row in enumerate(rows, start=2):
            info = by_image.get(_key(source, row["image"]), {})
            if wanted and (info.get("split") or "").strip() != wanted:
                continue
            out.append(_pair(source, row, f"{captions_csv}, line {line}", info))
        if not out:
            raise DataError(f"{captions_csv}: no {wanted or ''} pairs to train on"
                            + (f" (labels.csv has no rows with split={wanted})." if wanted else "."))
        return out
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise DataError(f"{source}: pairs must be a CSV file (image,caption columns) or a "
                            "folder with captions.csv.")
        rows = _read_rows(source, ("image", "caption"))
        wanted = split if any((r.get("split") or "").strip() for r in rows) else None
        out = [_pair(source.parent, row, f"{source}, line {line}", row)
               for line, row in enumerate(rows, start=2)
               if not wanted or (row.get("split") or "").strip() == wanted]
        if not out:
            raise DataError(f"{source}: no image,caption rows to train on.")
        return out
    raise DataError(f"{source}: not found. Pass a CSV with image,caption columns or a folder "
                    "with captions.csv.")


def _key(base: Path, value: str) -> str:
    path = Path(value.strip())
    return os.path.normpath(str(path if path.is_absolute() else base / path))


def _pair(base: Path, row: dict, where: str, info: dict) -> CaptionPair:
    value = (row.get("image") or "").strip()
    caption = (row.get("caption") or "").strip()
    if not value:
        raise DataError(f"{where}: empty 'image' cell.")
    if not caption:
        raise DataError(f"{where}: empty 'caption' for {value}. Every image needs a caption.")
    path = Path(value)
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise DataError(f"{where}: image file {path} not found.")
    if not is_image_file(path):
        raise DataError(f"{where}: {path} is not an image file MWM can read.")
    label = (info.get("label") or "").strip() or None
    prompt = (info.get("prompt") or "").strip() or None
    return CaptionPair(path, caption, label, prompt)


def _read_rows(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    if not path.is_file():
        raise DataError(f"{path}: file not found.")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            fields = [(f or "").strip() for f in (reader.fieldnames or [])]
            missing = [c for c in required if c not in fields]
            if missing:
                raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found "
                                f"{', '.join(fields) or 'no header'}.")
            return [{(k or "").strip(): (v or "") for k, v in row.items()} for row in reader]
    except (csv.Error, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable CSV file ({err}).") from err


# --------------------------------------------------------------------------- images

def square_pad(chw: np.ndarray) -> np.ndarray:
    """Zero-pad a (C, H, W) array to a centred square (extra pixel at the bottom/right)."""
    c, h, w = chw.shape
    side = max(h, w)
    if h == w:
        return chw
    out = np.zeros((c, side, side), dtype=chw.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    out[:, top:top + h, left:left + w] = chw
    return out


def prepare_image(path: Path, size: int) -> np.ndarray:
    """Image file → float32 (3, size, size) in [0, 1]: model input, padded, resized."""
    import cv2

    chw = square_pad(to_model_input(read_image(path)))
    if chw.shape[1] != size:
        interp = cv2.INTER_AREA if chw.shape[1] > size else cv2.INTER_LINEAR
        hwc = cv2.resize(np.ascontiguousarray(chw.transpose(1, 2, 0)), (size, size),
                         interpolation=interp)
        chw = hwc.reshape(size, size, -1).transpose(2, 0, 1)
    return np.ascontiguousarray(chw, dtype=np.float32)


def load_images(paths: Sequence[Path], size: int, workers: int = 1, *,
                progress: bool = False) -> "torch.Tensor":  # noqa: F821
    """Preload images as one float16 tensor (N, C, size, size); C = 1 when all are gray."""
    import torch

    from ..progress import progress as bar

    def one(path: Path) -> np.ndarray:
        try:
            return prepare_image(path, size)
        except DataError:
            raise
        except Exception as err:  # pragma: no cover - read_image already wraps most errors
            raise DataError(f"{path}: cannot be prepared for training ({err}).") from err

    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            arrays = list(bar(pool.map(one, paths), total=len(paths), desc="load images",
                              unit="img", enabled=progress))
    else:
        arrays = [one(p) for p in bar(paths, total=len(paths), desc="load images", unit="img",
                                      enabled=progress)]
    gray = all(np.array_equal(a[0], a[1]) and np.array_equal(a[0], a[2]) for a in arrays)
    stack = np.stack([a[:1] if gray else a for a in arrays])
    return torch.from_numpy(stack).to(torch.float16)


# --------------------------------------------------------------------------- augmentation

_SIDE = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def swap_sides(text: str) -> str:
    """Swap the words "left" and "right" (case kept): the caption of a mirrored image."""
    def repl(match: re.Match) -> str:
        word = match.group(0)
        other = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return other.upper()
        if word[0].isupper():
            return other.capitalize()
        return other
    return _SIDE.sub(repl, text)


def augment_batch(images: "torch.Tensor", captions: list[str], generator: "torch.Generator", *,
                  min_scale: float = 0.8, hflip: float = 0.5, jitter: float = 0.1
                  ) -> tuple["torch.Tensor", list[str]]:  # noqa: F821
    """Random resized crop + intensity jitter + left/right-aware horizontal flip.

    ``images``: float (B, C, S, S) in [0, 1]. The crop side is ``sqrt(U(min_scale, 1))``
    of the image side (so 80–100 % of the area by default), placed uniformly inside the
    image and resized back to S (bilinear). A flipped image gets its caption's "left" and
    "right" swapped.
    """
    import torch
    import torch.nn.functional as F

    b = images.shape[0]
    u = lambda: torch.rand(b, generator=generator)  # noqa: E731
    side = torch.sqrt(min_scale + (1.0 - min_scale) * u())
    cx = (1.0 - side) * (2.0 * u() - 1.0)
    cy = (1.0 - side) * (2.0 * u() - 1.0)
    flip = u() < hflip
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = side * torch.where(flip, -1.0, 1.0)
    theta[:, 1, 1] = side
    theta[:, 0, 2] = cx
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid.to(images.device), mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    if jitter > 0:
        contrast = 1.0 + jitter * (2.0 * u() - 1.0)
        bright = 0.5 * jitter * (2.0 * u() - 1.0)
        out = (out * contrast.view(b, 1, 1, 1).to(out) + bright.view(b, 1, 1, 1).to(out))
        out = out.clamp(0.0, 1.0)
    captions = [swap_sides(c) if f else c for c, f in zip(captions, flip.tolist())]
    return out, captions


def is_finding(label: str | None) -> bool:
    """True for a label that names a finding (not a no-finding class such as 'none')."""
    return label is not None and label.strip().lower() not in NO_FINDING_LABELS
