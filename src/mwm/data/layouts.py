"""Dataset layouts: how images, masks, labels and prompts are found on disk.

Three layouts, all resolving to a list of :class:`Sample` (one per 2-D slice):

* **paired folders** — ``images/`` and ``masks/`` matched by file stem (any extensions,
  so ``a.dcm`` pairs with ``a.png``); NIfTI volumes pair slice by slice;
* **class folders** — ``<root>/<split>/<class>/<file>`` (``train``, ``val``, ``test``);
* **CSV manifest** — columns ``image,label,mask,prompt,split`` (any subset, ``image``
  required), paths relative to the CSV's folder.

Per-image prompts come from JSON (``{"name": "prompt"}``) or CSV (``image,prompt``),
keyed by slice name, file stem or file name.

Every problem (unreadable file, duplicate stem, missing mask or prompt, mask of
another size) raises :class:`~mwm.data.io.DataError` naming the file.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Mapping

from ..errors import DataError
from .io import DEFAULT_AXIS, SliceRef, is_image_file, list_image_files, list_slices, stem_of

SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ("image", "label", "mask", "prompt", "split")


@dataclass(frozen=True)
class Sample:
    """One 2-D image of a dataset and what is known about it."""

    image: SliceRef
    mask: SliceRef | None = None
    label: str | None = None
    prompt: str | None = None
    split: str | None = None

    @property
    def name(self) -> str:
        return self.image.name


# --------------------------------------------------------------------------- folders

def expand_slices(files: Iterable[Path], axis: int = DEFAULT_AXIS) -> list[SliceRef]:
    """All 2-D slices of the given files, refusing two slices with the same name."""
    refs = [ref for path in files for ref in list_slices(path, axis)]
    _refuse_duplicates(refs)
    return refs


def find_images(source: str | os.PathLike, axis: int = DEFAULT_AXIS) -> list[SliceRef]:
    """Slices of an image file or of every image file in a folder (sorted by name)."""
    source = Path(source)
    if source.is_file():
        return expand_slices([source], axis)
    files = list_image_files(source)
    if not files:
        raise DataError(f"{source}: no image files found (looked for PNG, JPEG, TIFF, BMP, "
                        "DICOM .dcm, NIfTI .nii/.nii.gz).")
    return expand_slices(files, axis)


def paired_folders(images_dir: str | os.PathLike, masks_dir: str | os.PathLike, *,
                   axis: int = DEFAULT_AXIS, require_masks: bool = True) -> list[Sample]:
    """Pair ``images_dir`` with ``masks_dir`` by slice name (file stem)."""
    images = find_images(images_dir, axis)
    masks = {ref.name: ref for ref in find_images(masks_dir, axis)}
    samples = []
    for ref in images:
        mask = masks.get(ref.name)
        if mask is None and require_masks:
            raise DataError(f"{ref.path}: no mask named {ref.name}.* in {masks_dir}. Every "
                            "image needs a mask with the same file stem (any extension).")
        samples.append(Sample(ref, mask))
    return samples


def class_folders(root: str | os.PathLike, axis: int = DEFAULT_AXIS) -> tuple[list[Sample], list[str]]:
    """Read ``root/<split>/<class>/*``; return the samples and the sorted class names."""
    root = Path(root)
    splits = [s for s in SPLITS if (root / s).is_dir()]
    if not splits:
        raise DataError(f"{root}: expected class folders under {', '.join(SPLITS)} "
                        "(e.g. train/<class>/image.png).")
    classes = sorted({d.name for s in splits for d in (root / s).iterdir()
                      if d.is_dir() and not d.name.startswith(".")})
    samples = []
    for split in splits:
        for label in classes:
            folder = root / split / label
            if folder.is_dir():
                refs = expand_slices(list_image_files(folder), axis)
                samples += [Sample(ref, label=label, split=split) for ref in refs]
    _refuse_duplicates([s.image for s in samples])
    if not samples:
        raise DataError(f"{root}: class folders hold no image files.")
    return samples, classes


def read_manifest(csv_path: str | os.PathLike, axis: int = DEFAULT_AXIS) -> list[Sample]:
    """Read a CSV manifest; relative paths are taken from the CSV's folder."""
    csv_path = Path(csv_path)
    rows = _read_csv(csv_path)
    if rows and "image" not in rows[0]:
        raise DataError(f"{csv_path}: needs an 'image' column (columns may be "
                        f"{', '.join(MANIFEST_COLUMNS)}).")
    base = csv_path.parent
    samples = []
    for line, row in enumerate(rows, start=2):
        where = f"{csv_path}, line {line}"
        image_path = _resolve(base, row.get("image"), where, "image")
        mask_path = _resolve(base, row.get("mask"), where, "mask") if row.get("mask") else None
        split = (row.get("split") or "").strip() or None
        if split is not None and split not in SPLITS:
            raise DataError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}.")
        image_refs = list_slices(image_path, axis)
        mask_refs = list_slices(mask_path, axis) if mask_path else [None] * len(image_refs)
        if len(mask_refs) != len(image_refs):
            raise DataError(f"{mask_path}: {len(mask_refs)} slices, but its image "
                            f"{image_path} has {len(image_refs)}.")
        for image_ref, mask_ref in zip(image_refs, mask_refs):
            samples.append(Sample(image_ref, mask_ref, (row.get("label") or "").strip() or None,
                                  (row.get("prompt") or "").strip() or None, split))
    _refuse_duplicates([s.image for s in samples])
    return samples


# --------------------------------------------------------------------------- prompts

def load_prompts(path: str | os.PathLike) -> dict[str, str]:
    """Per-image prompts from JSON ``{"name": "prompt"}`` or CSV with image,prompt columns."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prompt file not found.")
    if path.suffix.lower() == ".json":
        try:
            mapping = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err}).") from err
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            raise DataError(f'{path}: expected an object {{"image name": "prompt", ...}}.')
        return {str(k): v for k, v in mapping.items()}
    rows = _read_csv(path)
    if rows and not {"image", "prompt"} <= set(rows[0]):
        raise DataError(f"{path}: a prompt CSV needs 'image' and 'prompt' columns.")
    return {row["image"]: row["prompt"] for row in rows}


def prompt_for(ref: SliceRef, prompts: Mapping[str, str], source: str = "the prompt file") -> str:
    """The prompt for a slice, looked up by slice name, file stem, file name or path."""
    for key in (ref.name, stem_of(ref.path), ref.path.name, str(ref.path)):
        if key in prompts:
            return prompts[key]
    raise DataError(f"{ref.path}: no prompt for {ref.name!r} in {source}. Add an entry "
                    f'"{ref.name}": "<prompt>" or pass one prompt for all images with --prompt.')


def split_prompt(prompt: str | None) -> list[str]:
    """``"brain tumor|glioma"`` → an ensemble of two prompts."""
    if not prompt:
        raise DataError("empty prompt")
    return [p.strip() for p in prompt.split("|") if p.strip()]


def attach_prompts(samples: list[Sample], prompts: Mapping[str, str] | None = None,
                   default: str | None = None, source: str = "the prompt file") -> list[Sample]:
    """Give every sample a prompt: its own (manifest), the mapping's, else ``default``."""
    out = []
    for sample in samples:
        prompt = sample.prompt or _lookup(sample.image, prompts or {}) or default
        if prompt is None:
            if prompts is not None:
                prompt_for(sample.image, prompts, source)  # raises the precise message
            raise DataError(f"{sample.image.path}: no prompt. Pass --prompt TEXT or --prompts FILE.")
        out.append(replace(sample, prompt=prompt))
    return out


def _lookup(ref: SliceRef, prompts: Mapping[str, str]) -> str | None:
    try:
        return prompt_for(ref, prompts)
    except DataError:
        return None


# --------------------------------------------------------------------------- helpers

def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise DataError(f"{path}: file not found.")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            rows = [{(k or "").strip(): (v or "") for k, v in row.items()} for row in reader]
    except (csv.Error, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable CSV file ({err}).") from err
    return rows


def _resolve(base: Path, value: str | None, where: str, column: str) -> Path:
    if not value or not value.strip():
        raise DataError(f"{where}: empty {column!r} cell.")
    path = Path(value.strip())
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise DataError(f"{where}: {column} file {path} not found.")
    if not is_image_file(path):
        raise DataError(f"{where}: {path} is not an image file MWM can read.")
    return path


def _refuse_duplicates(refs: list[SliceRef]) -> None:
    counts = Counter(ref.name for ref in refs)
    dupes = [name for name, count in counts.items() if count > 1]
    if dupes:
        paths = [str(ref.path) for ref in refs if ref.name == dupes[0]]
        raise DataError(f"duplicate image name {dupes[0]!r} from {', '.join(paths)}: images are "
                        "paired with masks and prompts by file stem, so stems must be unique. "
                        "Rename one of the files.")


# --------------------------------------------------------------------------- any layout

@dataclass
class Dataset:
    """What a dataset argument resolved to: its samples, layout and class names."""

    samples: list[Sample]
    layout: str
    classes: list[str]


def open_dataset(source: str | os.PathLike, masks: str | os.PathLike | None = None, *,
                 axis: int = DEFAULT_AXIS, require_masks: bool = False) -> Dataset:
    """Resolve a dataset argument, whatever its layout.

    * a ``.csv`` file → CSV manifest;
    * a folder with ``labels.csv`` (as ``mwm phantoms`` writes) → that manifest;
      with ``masks``, each sample's mask is replaced by the one of the same name there
      (labels and splits are kept);
    * a folder with ``images/`` → paired with ``masks`` or its own ``masks/`` if present;
    * a folder with ``train/``, ``val/`` or ``test/`` → class folders;
    * any other folder or image file → plain images (paired with ``masks`` if given).
    """
    source = Path(source)
    manifest = source if source.is_file() and source.suffix.lower() == ".csv" else \
        source / "labels.csv" if source.is_dir() and (source / "labels.csv").is_file() else None
    if manifest is not None:
        samples = read_manifest(manifest, axis)
        if masks is not None:
            samples = replace_masks(samples, masks, axis=axis, require_masks=require_masks)
        return _with_classes(samples, "manifest")
    if source.is_dir() and (source / "images").is_dir():
        masks = masks or (source / "masks" if (source / "masks").is_dir() else None)
        source = source / "images"
    elif source.is_dir() and masks is None and any((source / s).is_dir() for s in SPLITS):
        samples, classes = class_folders(source, axis)
        return Dataset(samples, "class-folders", classes)
    if masks is not None:
        return Dataset(paired_folders(source, masks, axis=axis, require_masks=require_masks),
                       "paired", [])
    if require_masks:
        raise DataError(f"{source}: region masks are required; pass the mask folder.")
    return Dataset([Sample(ref) for ref in find_images(source, axis)], "images", [])


def replace_masks(samples: list[Sample], masks: str | os.PathLike, *, axis: int = DEFAULT_AXIS,
                  require_masks: bool = True) -> list[Sample]:
    """The same samples with masks taken from the folder ``masks`` (paired by name)."""
    by_name = {ref.name: ref for ref in find_images(masks, axis)}
    out = []
    for sample in samples:
        mask = by_name.get(sample.name)
        if mask is None and require_masks:
            raise DataError(f"{sample.image.path}: no mask named {sample.name}.* in {masks}.")
        out.append(replace(sample, mask=mask))
    return out


def _with_classes(samples: list[Sample], layout: str) -> Dataset:
    classes = sorted({s.label for s in samples if s.label is not None})
    return Dataset(samples, layout, classes)
