"""Image–caption pairs for contrastive training: reading, preprocessing, augmentation.

``pairs`` is either

* a CSV file with ``image`` and ``caption`` columns (paths relative to the CSV's folder;
  an optional ``split`` column keeps only the ``train`` rows when any row has one), or
* a folder with ``captions.csv`` (as ``mwm phantoms`` writes): when the folder also
  holds ``labels.csv`` with a ``split`` column, only its **train** images are used, and
  its ``label`` and ``prompt`` columns are attached to the pairs.

A folder written with several findings per image (``mwm phantoms --findings multi``) may
also hold ``findings.csv`` (image, finding, kind, present, mask, phrase: one row per image
and finding) and ``finding_captions.csv`` (image, finding, caption: one caption per
present finding). ``captions="findings"`` trains on the finding captions (plus the general
caption of every image without any present finding, so lesion-free images are still
seen), ``"both"`` on the finding captions and all general captions; either way every
pair carries its image's present findings (:class:`FindingTable`), which the swap-finding
negatives and the phrase loss of :mod:`mwm.clip.train` read.

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

from ..data.findings import FINDING_CAPTIONS_FILE, FINDINGS_FILE
from ..data.io import is_image_file, read_image, to_model_input

NO_FINDING_LABELS = ("", "none", "normal", "healthy", "no finding", "no lesion")
#: ``captions``: which captions of a folder to train on.
CAPTION_SOURCES = ("general", "findings", "both")
FINDINGS_NAME, FINDING_CAPTIONS_NAME = FINDINGS_FILE, FINDING_CAPTIONS_FILE  # one spelling


@dataclass(frozen=True)
class CaptionPair:
    """One training pair: an image file, its caption, and optional label/prompt.

    ``finding``: the finding a per-finding caption names (None for a general caption);
    ``findings``: the findings present in the image, when the folder lists them
    (``findings.csv``; None = not known)."""

    image: Path
    caption: str
    label: str | None = None
    prompt: str | None = None
    finding: str | None = None
    findings: tuple[str, ...] | None = None


@dataclass(frozen=True)
class FindingTable:
    """``findings.csv`` of a folder: the findings, their phrases, and who has which.

    ``names``: the findings in order of first appearance; ``phrases``: one text phrase per
    finding (its most frequent ``phrase`` cell; the finding's name when none is given);
    ``kinds``: its ``kind`` cell (e.g. finding / anatomy); ``present``: image key (the
    normalized path) → the findings present in it."""

    names: tuple[str, ...]
    phrases: tuple[str, ...]
    kinds: tuple[str, ...]
    present: dict[str, frozenset[str]]

    def phrase(self, finding: str) -> str:
        return self.phrases[self.names.index(finding)]


# --------------------------------------------------------------------------- reading

def read_pairs(pairs: str | os.PathLike, split: str = "train",
               captions: str = "general") -> list[CaptionPair]:
    """Resolve a CSV or a phantom-style folder to a list of :class:`CaptionPair`.

    ``captions`` (folders only): ``general`` (``captions.csv``), ``findings``
    (``finding_captions.csv``, plus the general caption of images without a present
    finding) or ``both``. A folder with ``findings.csv`` gives every pair its image's
    present findings."""
    if captions not in CAPTION_SOURCES:
        raise ValueError(f"captions must be one of {', '.join(CAPTION_SOURCES)}, got {captions!r}")
    source = Path(pairs)
    if source.is_dir():
        general = _read_folder(source, split)
        return _with_findings(source, general, captions, split)
    if captions != "general":
        raise DataError(f"{source}: --captions {captions} needs a folder with "
                        f"{FINDING_CAPTIONS_NAME} (as `mwm phantoms --findings multi` writes), "
                        "not a CSV file; use --captions general.")
    return _read_csv(source, split)


def _read_folder(source: Path, split: str) -> list[CaptionPair]:
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


def read_findings(folder: str | os.PathLike) -> FindingTable | None:
    """``findings.csv`` of a folder as a :class:`FindingTable` (None when it has none)."""
    from collections import Counter

    path = Path(folder) / FINDINGS_NAME
    if not path.is_file():
        return None
    rows = _read_rows(path, ("image", "finding", "present"))
    names: list[str] = []
    phrases: dict[str, Counter] = {}
    kinds: dict[str, str] = {}
    present: dict[str, set[str]] = {}
    for line, row in enumerate(rows, start=2):
        name = row["finding"].strip()
        if not name or not row["image"].strip():
            raise DataError(f"{path}, line {line}: empty 'image' or 'finding' cell.")
        flag = row["present"].strip().lower()
        if flag not in ("0", "1", "true", "false", "yes", "no"):
            raise DataError(f"{path}, line {line}: 'present' must be 0 or 1, got {flag!r}.")
        if name not in phrases:
            names.append(name)
            phrases[name] = Counter()
            kinds[name] = (row.get("kind") or "").strip()
        phrase = (row.get("phrase") or "").strip()
        if phrase:
            phrases[name][phrase] += 1
        found = present.setdefault(_key(path.parent, row["image"]), set())
        if flag in ("1", "true", "yes"):
            found.add(name)
    if not names:
        raise DataError(f"{path}: no findings listed.")
    # most frequent phrase; ties broken by the first seen (Counter keeps insertion order)
    best = tuple(phrases[n].most_common(1)[0][0] if phrases[n] else n for n in names)
    return FindingTable(tuple(names), best, tuple(kinds[n] for n in names),
                        {k: frozenset(v) for k, v in present.items()})


def _with_findings(source: Path, general: list[CaptionPair], captions: str,
                   split: str) -> list[CaptionPair]:
    """The general pairs and/or the finding-caption pairs, each with its image's findings."""
    import dataclasses

    table = read_findings(source)
    if table is None and captions == "general":
        return general
    per_finding = source / FINDING_CAPTIONS_NAME
    if captions != "general" and not per_finding.is_file():
        raise DataError(f"{per_finding}: not found; --captions {captions} trains on one caption "
                        "per present finding (image,finding,caption columns, as `mwm phantoms "
                        "--findings multi` writes). Use --captions general for this folder.")
    if table is None:
        raise DataError(f"{source / FINDINGS_NAME}: not found; --captions {captions} needs the "
                        "findings of every image (image,finding,present columns) next to "
                        f"{FINDING_CAPTIONS_NAME}.")

    def found(pair: CaptionPair) -> tuple[str, ...] | None:
        have = table.present.get(_pair_key(pair))
        return None if have is None else tuple(n for n in table.names if n in have)

    general = [dataclasses.replace(p, findings=found(p)) for p in general]
    if captions == "general":
        return general
    by_image = {_pair_key(p): p for p in general}   # the split's images only
    extra = []
    for line, row in enumerate(_read_rows(per_finding, ("image", "finding", "caption")), start=2):
        base = by_image.get(_key(source, row["image"]))
        if base is None:
            continue  # another split (or an image without a general caption)
        name, text = row["finding"].strip(), row["caption"].strip()
        where = f"{per_finding}, line {line}"
        if name not in table.names:
            raise DataError(f"{where}: finding {name!r} is not in {FINDINGS_NAME} "
                            f"({', '.join(table.names)}).")
        if not text:
            raise DataError(f"{where}: empty 'caption' for {row['image'].strip()}.")
        extra.append(dataclasses.replace(base, caption=text, finding=name))
    if not extra:
        raise DataError(f"{per_finding}: no {split} rows; nothing to train on with "
                        f"--captions {captions}.")
    if captions == "both":
        return general + extra
    # "findings": lesion-free images keep their general caption (they have no finding one)
    named = {_key(source, str(p.image)) for p in extra}
    return extra + [p for p in general if _key(source, str(p.image)) not in named]


def _read_csv(source: Path, split: str) -> list[CaptionPair]:
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


def _pair_key(pair: CaptionPair) -> str:
    """The table key of a pair's image: its path already holds the folder (:func:`_pair`),
    so joining the folder again would break relative folders (``ph/ph/images/...``)."""
    return os.path.normpath(str(pair.image))


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


def lesion_free(pair: CaptionPair, table: FindingTable | None = None) -> bool:
    """A general caption of an image without findings: with a findings table, no present
    finding other than anatomy (kind ``anatomy``); else a no-finding label."""
    if pair.finding is not None:
        return False
    if pair.findings is not None and table is not None:
        return all(table.kinds[table.names.index(n)] == "anatomy" for n in pair.findings)
    return not is_finding(pair.label)


def swap_finding(caption: str, old: str, new: str) -> str | None:
    """``caption`` with the phrase ``old`` (whole words, any case) replaced by ``new``;
    None when ``caption`` does not contain ``old``."""
    pattern = re.compile(r"\b" + r"\s+".join(map(re.escape, old.split())) + r"\b",
                         re.IGNORECASE)
    if not old.strip() or not pattern.search(caption):
        return None
    return pattern.sub(lambda _: new, caption)
