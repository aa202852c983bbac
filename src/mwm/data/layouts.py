"""Dataset layouts: how images, masks, labels and prompts are found on disk.

Three layouts, all resolving to a list of :class:`Sample` (one per 2-D slice):

* **paired folders** — ``images/`` and ``masks/`` matched by file stem (any extensions,
  so ``a.dcm`` pairs with ``a.png``); NIfTI volumes pair slice by slice;
* **class folders** — ``<root>/<split>/<class>/<file>`` (``train``, ``val``, ``test``);
* **CSV manifest** — columns ``image,label,mask,prompt,split`` (any subset, ``image``
  required), paths relative to the CSV's folder.

Per-image prompts come from JSON (``{"name": "prompt"}``) or CSV (``image,prompt``),
keyed by slice name, file stem or file name; :func:`prompt_of` is the one rule that picks
an image's prompt.

Every problem (unreadable file, duplicate stem, missing mask or prompt, mask of
another size) raises :class:`~mwm.data.io.DataError` naming the file; a listing that
meets several unreadable files names them all in one error. Given a ``problems`` list
(``open_dataset(..., lenient=True)``, as ``mwm inspect`` uses it), the listing functions
record unreadable files and duplicate names there instead and go on.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field, replace
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

def expand_slices(files: Iterable[Path], axis: int = DEFAULT_AXIS, *,
                  problems: list[dict] | None = None) -> list[SliceRef]:
    """All 2-D slices of the given files, refusing two slices with the same name.

    A file whose slices cannot be listed (a 4-D NIfTI, a corrupt NIfTI or DICOM header)
    is an error; every such file is named in the one error. With a ``problems`` list they
    are recorded there instead (see :func:`problem`): unreadable files are left out and
    the slices of duplicated names kept.
    """
    found: list[dict] = []
    refs = _list_files(files, axis, found)
    _check_duplicates(refs, found)
    _settle(found, problems)
    return refs


def find_images(source: str | os.PathLike, axis: int = DEFAULT_AXIS, *,
                problems: list[dict] | None = None) -> list[SliceRef]:
    """Slices of an image file or of every image file in a folder (sorted by name)."""
    source = Path(source)
    if source.is_file():
        return expand_slices([source], axis, problems=problems)
    files = list_image_files(source)
    if not files:
        raise DataError(f"{source}: no image files found (looked for PNG, JPEG, TIFF, BMP, "
                        "DICOM .dcm, NIfTI .nii/.nii.gz).")
    return expand_slices(files, axis, problems=problems)


def paired_folders(images_dir: str | os.PathLike, masks_dir: str | os.PathLike, *,
                   axis: int = DEFAULT_AXIS, require_masks: bool = True,
                   problems: list[dict] | None = None) -> list[Sample]:
    """Pair ``images_dir`` with ``masks_dir`` by slice name (file stem)."""
    found: list[dict] = []  # both folders' problems, before any "no mask" error
    images = find_images(images_dir, axis, problems=found)
    masks = {ref.name: ref for ref in find_images(masks_dir, axis, problems=found)}
    _settle(found, problems)
    samples = []
    for ref in images:
        mask = masks.get(ref.name)
        if mask is None and require_masks:
            raise DataError(missing_mask(ref, masks_dir))
        samples.append(Sample(ref, mask))
    return samples


def missing_mask(ref: SliceRef, masks_dir: str | os.PathLike) -> str:
    """The message for an image without a mask in the paired mask folder."""
    return (f"{ref.path}: no mask named {ref.name}.* in {masks_dir}. Every image needs a "
            "mask with the same file stem (any extension).")


def class_folders(root: str | os.PathLike, axis: int = DEFAULT_AXIS, *,
                  problems: list[dict] | None = None) -> tuple[list[Sample], list[str]]:
    """Read ``root/<split>/<class>/*``; return the samples and the sorted class names."""
    root = Path(root)
    splits = [s for s in SPLITS if (root / s).is_dir()]
    if not splits:
        raise DataError(f"{root}: expected class folders under {', '.join(SPLITS)} "
                        "(e.g. train/<class>/image.png).")
    classes = sorted({d.name for s in splits for d in (root / s).iterdir()
                      if d.is_dir() and not d.name.startswith(".")})
    samples, found = [], []
    for split in splits:
        for label in classes:
            folder = root / split / label
            if folder.is_dir():
                refs = _list_files(list_image_files(folder), axis, found)
                samples += [Sample(ref, label=label, split=split) for ref in refs]
    _check_duplicates([s.image for s in samples], found)
    _settle(found, problems)
    if not samples and not found:
        raise DataError(f"{root}: class folders hold no image files.")
    return samples, classes


def read_manifest(csv_path: str | os.PathLike, axis: int = DEFAULT_AXIS, *,
                  problems: list[dict] | None = None) -> list[Sample]:
    """Read a CSV manifest; relative paths are taken from the CSV's folder."""
    csv_path = Path(csv_path)
    rows = _read_csv(csv_path)
    if rows and "image" not in rows[0]:
        raise DataError(f"{csv_path}: needs an 'image' column (columns may be "
                        f"{', '.join(MANIFEST_COLUMNS)}).")
    samples, found = [], []
    for line, row in enumerate(rows, start=2):
        samples += _manifest_row(csv_path, line, row, axis, found)
    _check_duplicates([s.image for s in samples], found)
    _settle(found, problems)
    return samples


def _manifest_row(csv_path: Path, line: int, row: dict[str, str], axis: int,
                  found: list[dict]) -> list[Sample]:
    """The samples of one manifest row (one per slice of its image)."""
    where = f"{csv_path}, line {line}"
    base = csv_path.parent
    image_path = _resolve(base, row.get("image"), where, "image")
    mask_path = _resolve(base, row.get("mask"), where, "mask") if row.get("mask") else None
    split = (row.get("split") or "").strip() or None
    if split is not None and split not in SPLITS:
        raise DataError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}.")
    image_refs = _list_files([image_path], axis, found)
    if not image_refs:
        return []
    mask_refs = _list_files([mask_path], axis, found) if mask_path else []
    if not mask_refs:  # no mask, or an unreadable one (recorded): the image goes without
        mask_refs = [None] * len(image_refs)
    elif len(mask_refs) != len(image_refs):
        raise DataError(f"{mask_path}: {len(mask_refs)} slices, but its image "
                        f"{image_path} has {len(image_refs)}.")
    label = (row.get("label") or "").strip() or None
    prompt = (row.get("prompt") or "").strip() or None
    return [Sample(image_ref, mask_ref, label, prompt, split)
            for image_ref, mask_ref in zip(image_refs, mask_refs)]


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
    prompt = _lookup(ref, prompts)
    if prompt is None:
        raise DataError(no_prompt(ref, source))
    return prompt


def no_prompt(ref: SliceRef, source: str | None = None, others: int = 0) -> str:
    """The message for an image left without a prompt: it names the three ways to give one."""
    where = f" in {source}" if source else ""
    more = f" (and {others} more image(s) without one)" if others else ""
    return (f"{ref.path}: no prompt for {ref.name!r}{where}{more}. Give one in any of three "
            "ways: a 'prompt' column in the CSV manifest; --prompt TEXT, used for every image "
            f'(over the manifest\'s column); or --prompts FILE with an entry "{ref.name}": '
            f'"<prompt>" (JSON) or a row {ref.name},<prompt> (CSV), which overrides both.')


def split_prompt(prompt: str | None) -> list[str]:
    """``"brain tumor|glioma"`` → an ensemble of two prompts."""
    if not prompt:
        raise DataError("empty prompt")
    return [p.strip() for p in prompt.split("|") if p.strip()]


def prompt_of(sample: Sample, prompts: Mapping[str, str] | None = None,
              default: str | None = None) -> str | None:
    """The one prompt rule: the prompt file's entry for the image (``--prompts``, by name),
    else ``default`` (``--prompt``, given explicitly), else the manifest's ``prompt`` column.
    An explicit ``--prompt`` beats the column: prompting a dataset for another finding (or a
    control prompt) must not silently localize the manifest's prompt instead. None when the
    image has no prompt at all."""
    return (_lookup(sample.image, prompts) if prompts else None) or default or sample.prompt


def attach_prompts(samples: list[Sample], prompts: Mapping[str, str] | None = None,
                   default: str | None = None, source: str = "the prompt file") -> list[Sample]:
    """Give every sample its prompt by :func:`prompt_of`; an image without one is an error
    naming it (and counting the others)."""
    out = [replace(sample, prompt=prompt_of(sample, prompts, default)) for sample in samples]
    missing = [sample for sample in out if sample.prompt is None]
    if missing:
        raise DataError(no_prompt(missing[0].image, source if prompts is not None else None,
                                  len(missing) - 1))
    return out


def _lookup(ref: SliceRef, prompts: Mapping[str, str]) -> str | None:
    for key in (ref.name, stem_of(ref.path), ref.path.name, str(ref.path)):
        if key in prompts:
            return prompts[key]
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


def problem(name: str, file: str | os.PathLike, reason: str) -> dict:
    """A problem of a listing, in the form of the commands' failure lists."""
    return {"name": name, "file": str(file), "reason": reason}


def _list_files(files: Iterable[Path], axis: int, found: list[dict]) -> list[SliceRef]:
    """The slices of ``files``; a file whose slices cannot be listed goes into ``found``."""
    refs = []
    for path in files:
        try:
            refs += list_slices(path, axis)
        except DataError as err:
            found.append(problem(stem_of(path), path, str(err)))
    return refs


def _check_duplicates(refs: list[SliceRef], found: list[dict]) -> None:
    paths: dict[str, list[str]] = {}
    for ref in refs:
        paths.setdefault(ref.name, []).append(str(ref.path))
    for name, files in paths.items():
        if len(files) > 1:
            found.append(problem(name, ", ".join(files), (
                f"duplicate image name {name!r} from {', '.join(files)}: images are paired "
                "with masks and prompts by file stem, so stems must be unique. Rename one of "
                "the files.")))


def _settle(found: list[dict], problems: list[dict] | None) -> None:
    """Record ``found`` in ``problems``, or without a list raise them as one error."""
    if problems is not None:
        problems.extend(found)
    elif len(found) == 1:
        raise DataError(found[0]["reason"])
    elif found:
        raise DataError(f"{len(found)} problems with the data (`mwm inspect` lists them all):\n  "
                        + "\n  ".join(p["reason"] for p in found))


# --------------------------------------------------------------------------- any layout

@dataclass
class Dataset:
    """What a dataset argument resolved to: its samples, layout and class names.

    ``masks`` is the folder masks are paired from by name (None: no such folder);
    ``problems`` the unreadable files and duplicate names of a lenient listing.
    """

    samples: list[Sample]
    layout: str
    classes: list[str]
    masks: Path | None = None
    problems: list[dict] = field(default_factory=list)

    def usable(self) -> list[Sample]:
        """The samples no problem names (a batch command runs these, listing the rest)."""
        names = {p["name"] for p in self.problems}
        files = {p["file"] for p in self.problems}
        return [s for s in self.samples if s.name not in names and str(s.image.path) not in files]


def open_dataset(source: str | os.PathLike, masks: str | os.PathLike | None = None, *,
                 axis: int = DEFAULT_AXIS, require_masks: bool = False,
                 lenient: bool = False) -> Dataset:
    """Resolve a dataset argument, whatever its layout.

    * a ``.csv`` file → CSV manifest;
    * a folder with ``labels.csv`` (as ``mwm phantoms`` writes) → that manifest;
      with ``masks``, each sample's mask is replaced by the one of the same name there
      (labels and splits are kept);
    * a folder with ``images/`` → paired with ``masks`` or its own ``masks/`` if present;
    * a folder with ``train/``, ``val/`` or ``test/`` → class folders;
    * any other folder or image file → plain images (paired with ``masks`` if given).

    Files whose slices cannot be listed and duplicate names are errors (one error names
    every unreadable file); ``lenient=True`` records them in ``Dataset.problems`` instead,
    leaving unreadable files out and keeping the slices of duplicated names.
    """
    source, problems = Path(source), [] if lenient else None
    manifest = source if source.is_file() and source.suffix.lower() == ".csv" else \
        source / "labels.csv" if source.is_dir() and (source / "labels.csv").is_file() else None
    if manifest is not None:
        samples = read_manifest(manifest, axis, problems=problems)
        if masks is not None:
            samples = replace_masks(samples, masks, axis=axis, require_masks=require_masks,
                                    problems=problems)
        return _with_classes(samples, "manifest", masks, problems)
    if source.is_dir() and (source / "images").is_dir():
        masks = masks or (source / "masks" if (source / "masks").is_dir() else None)
        source = source / "images"
    elif source.is_dir() and masks is None and any((source / s).is_dir() for s in SPLITS):
        samples, classes = class_folders(source, axis, problems=problems)
        return Dataset(samples, "class-folders", classes, None, problems or [])
    if masks is not None:
        samples = paired_folders(source, masks, axis=axis, require_masks=require_masks,
                                 problems=problems)
        return Dataset(samples, "paired", [], Path(masks), problems or [])
    if require_masks:
        raise DataError(f"{source}: region masks are required; pass the mask folder.")
    samples = [Sample(ref) for ref in find_images(source, axis, problems=problems)]
    return Dataset(samples, "images", [], None, problems or [])


def replace_masks(samples: list[Sample], masks: str | os.PathLike, *, axis: int = DEFAULT_AXIS,
                  require_masks: bool = True, problems: list[dict] | None = None) -> list[Sample]:
    """The same samples with masks taken from the folder ``masks`` (paired by name)."""
    by_name = {ref.name: ref for ref in find_images(masks, axis, problems=problems)}
    out = []
    for sample in samples:
        mask = by_name.get(sample.name)
        if mask is None and require_masks:
            raise DataError(missing_mask(sample.image, masks))
        out.append(replace(sample, mask=mask))
    return out


def _with_classes(samples: list[Sample], layout: str, masks: str | os.PathLike | None,
                  problems: list[dict] | None) -> Dataset:
    classes = sorted({s.label for s in samples if s.label is not None})
    return Dataset(samples, layout, classes, Path(masks) if masks is not None else None,
                   problems or [])
