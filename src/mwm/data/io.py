"""Reading medical images and region masks into arrays.

Every file format MWM accepts goes through this module:

* PNG / JPEG / TIFF / BMP (8- or 16-bit, gray or RGB; float TIFF) via OpenCV;
* DICOM via pydicom (rescale slope/intercept applied, MONOCHROME1 inverted,
  multi-frame files as one slice per frame, the stored window kept);
* NIfTI via nibabel (reoriented to the closest canonical RAS+ orientation, sliced
  along any axis, each slice upright with anterior/superior at the top).

A file may hold several 2-D slices; each slice has a *name* derived from the file
stem (``scan`` → ``scan`` for a 2-D file, ``scan_f003`` for DICOM frame 3,
``scan_z042`` for NIfTI slice 42 along the third axis). Names are the keys that
pair images with masks and prompts everywhere in MWM.

See ``docs/data.md`` for the normalization and mask binarization rules.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import DataError

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
LOSSY_SUFFIXES = (".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = RASTER_SUFFIXES + DICOM_SUFFIXES + NIFTI_SUFFIXES
AXIS_LETTERS = "xyz"
#: NIfTI slicing axis when none is given: 2, axial slices of a RAS volume.
DEFAULT_AXIS = 2
NORMALIZATIONS = ("auto", "dtype", "percentile", "minmax")
PERCENTILES = (0.5, 99.5)


def suffix_of(path: str | os.PathLike) -> str:
    """Lower-case file suffix, treating ``.nii.gz`` as one suffix."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def stem_of(path: str | os.PathLike) -> str:
    """File name without its (possibly double) suffix: ``a/b.nii.gz`` → ``b``."""
    name = Path(path).name
    suffix = suffix_of(path)
    return name[: len(name) - len(suffix)] if suffix else name


def is_image_file(path: str | os.PathLike) -> bool:
    return suffix_of(path) in IMAGE_SUFFIXES and not Path(path).name.startswith(".")


@dataclass(frozen=True)
class SliceRef:
    """One 2-D slice of a file: the whole file, a DICOM frame or a NIfTI slice."""

    path: Path
    index: int | None = None  # frame / slice index in multi-slice files
    axis: int | None = None   # NIfTI slicing axis (0, 1, 2); None for DICOM frames

    @property
    def name(self) -> str:
        stem = stem_of(self.path)
        if self.index is None:
            return stem
        tag = "f" if self.axis is None else AXIS_LETTERS[self.axis]
        return f"{stem}_{tag}{self.index:03d}"


@dataclass
class Image2D:
    """A 2-D image as stored: raw values, before any normalization.

    ``pixels`` is (H, W) or (H, W, 3) RGB. ``kind`` records where the values come from
    (``uint8``, ``uint16``, ``float``, ``dicom``, ``nifti``) and selects the default
    normalization; ``window`` is the (centre, width) stored in a DICOM file, if any.
    """

    pixels: np.ndarray
    name: str
    source: Path
    kind: str
    window: tuple[float, float] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.pixels.shape[0]), int(self.pixels.shape[1])


# --------------------------------------------------------------------------- listing

def list_slices(path: str | os.PathLike, axis: int = DEFAULT_AXIS) -> list[SliceRef]:
    """The 2-D slices a file holds (one for ordinary 2-D images)."""
    path = Path(path)
    suffix = suffix_of(path)
    if suffix in NIFTI_SUFFIXES:
        shape = _nifti_volume(str(path), _mtime(path)).shape
        if len(shape) == 2:
            return [SliceRef(path)]
        _check_axis(path, axis)
        return [SliceRef(path, i, axis) for i in range(shape[axis])]
    if suffix in DICOM_SUFFIXES:
        frames = _dicom_frame_count(path)
        return [SliceRef(path)] if frames == 1 else [SliceRef(path, i) for i in range(frames)]
    _check_suffix(path)
    return [SliceRef(path)]


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder. Pass the folder that holds the images.")
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


def iter_images(path: str | os.PathLike, axis: int = DEFAULT_AXIS) -> Iterator[Image2D]:
    """Every 2-D slice of a file as an :class:`Image2D`."""
    for ref in list_slices(path, axis):
        yield read_slice(ref)


# --------------------------------------------------------------------------- reading

def read_image(path: str | os.PathLike | SliceRef) -> Image2D:
    """Read a single-slice image (or one slice given as a :class:`SliceRef`)."""
    if isinstance(path, SliceRef):
        return read_slice(path)
    refs = list_slices(path)
    if len(refs) != 1:
        raise DataError(
            f"{path}: holds {len(refs)} slices; read them one by one with iter_images() "
            "(on the command line every slice becomes its own image, named <stem>_f<frame> for "
            "DICOM frames or <stem>_<x|y|z><slice> for NIfTI slices).")
    return read_slice(refs[0])


def read_slice(ref: SliceRef) -> Image2D:
    if not ref.path.is_file():
        raise DataError(f"{ref.path}: file not found. Check the path.")
    suffix = suffix_of(ref.path)
    try:
        if suffix in NIFTI_SUFFIXES:
            return _read_nifti_slice(ref)
        if suffix in DICOM_SUFFIXES:
            return _read_dicom(ref)
        _check_suffix(ref.path)
        return _read_raster(ref)
    except DataError:
        raise
    except Exception as err:  # a library error becomes a message about the file
        raise DataError(f"{ref.path}: cannot be read as {suffix or 'an image'} "
                        f"({type(err).__name__}: {err}). Check that the file is complete "
                        "and in the format its extension says.") from err


def _read_raster(ref: SliceRef) -> Image2D:
    import cv2

    pixels = cv2.imread(str(ref.path), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise DataError(f"{ref.path}: OpenCV cannot decode this file. Re-export it as PNG "
                        "(lossless, 8- or 16-bit).")
    if pixels.ndim == 3:
        if pixels.shape[2] == 1:
            pixels = pixels[:, :, 0]
        elif pixels.shape[2] == 4:
            pixels = cv2.cvtColor(pixels, cv2.COLOR_BGRA2RGB)
        else:
            pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
    if pixels.dtype == np.uint8:
        kind = "uint8"
    elif pixels.dtype == np.uint16:
        kind = "uint16"
    else:
        kind = "float"
        pixels = pixels.astype(np.float32)
    return Image2D(np.ascontiguousarray(pixels), ref.name, ref.path, kind)


def _read_dicom(ref: SliceRef) -> Image2D:
    import pydicom

    ds = pydicom.dcmread(str(ref.path))
    if "PixelData" not in ds:
        raise DataError(f"{ref.path}: DICOM file without pixel data (a report or "
                        "structured document?). Remove it from the image folder.")
    try:
        pixels = ds.pixel_array
    except Exception as err:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise DataError(
            f"{ref.path}: pixel data in transfer syntax {syntax} cannot be decoded "
            f"({err}). Install a decoder, e.g. `pip install pylibjpeg pylibjpeg-libjpeg "
            "pylibjpeg-openjpeg`, or convert the file to uncompressed DICOM.") from err
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    is_rgb = photometric.startswith(("RGB", "YBR"))
    if frames > 1:
        pixels = pixels[ref.index or 0]
    if is_rgb:
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space
            pixels = convert_color_space(pixels, photometric, "RGB")
        return Image2D(np.ascontiguousarray(pixels), ref.name, ref.path, "uint8"
                       if pixels.dtype == np.uint8 else "float")
    values = _dicom_modality_lut(pixels, ds)
    if photometric == "MONOCHROME1":  # stored inverted: high value = dark
        values = values.max() + values.min() - values
    return Image2D(values.astype(np.float32), ref.name, ref.path, "dicom", _dicom_window(ds))


def _dicom_modality_lut(pixels: np.ndarray, ds) -> np.ndarray:
    """Stored values → modality units (e.g. Hounsfield) with rescale slope/intercept."""
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    return pixels.astype(np.float64) * slope + intercept


def _dicom_window(ds) -> tuple[float, float] | None:
    centre, width = getattr(ds, "WindowCenter", None), getattr(ds, "WindowWidth", None)
    if centre is None or width is None:
        return None
    first = lambda v: float(v[0]) if isinstance(v, Sequence) and not isinstance(v, str) else float(v)  # noqa: E731
    return first(centre), first(width)


def _dicom_frame_count(path: Path) -> int:
    import pydicom

    try:  # a garbled NumberOfFrames is a bad header too
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        return int(getattr(ds, "NumberOfFrames", 1) or 1)
    except Exception as err:
        raise DataError(f"{path}: not a readable DICOM file ({err}). Check the file.") from err


@functools.lru_cache(maxsize=2)
def _nifti_volume(path: str, mtime: float) -> np.ndarray:
    """The whole volume in canonical orientation (cached: slices are read in a row)."""
    import nibabel as nib

    try:
        img = nib.as_closest_canonical(nib.load(path))
        volume = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as err:
        raise DataError(f"{path}: not a readable NIfTI file ({err}). Check the file.") from err
    if volume.ndim == 4 and volume.shape[3] == 1:
        volume = volume[..., 0]
    if volume.ndim not in (2, 3):
        raise DataError(f"{path}: {volume.ndim}-D NIfTI with shape {volume.shape}; MWM reads "
                        "2-D images and 3-D volumes. Split the series into one 3-D volume per time point "
                        "(`fslsplit FILE`, or nibabel: `nibabel.funcs.four_to_three(img)` and "
                        "save each volume) and put those in the folder instead.")
    return volume


def _read_nifti_slice(ref: SliceRef) -> Image2D:
    volume = _nifti_volume(str(ref.path), _mtime(ref.path))
    if volume.ndim == 2:
        plane = volume
    else:
        plane = np.take(volume, ref.index, axis=ref.axis)
    # Canonical RAS+ axes → display: transpose so rows follow the second in-plane axis,
    # then flip so anterior/superior is at the top. Columns keep the first axis, so the
    # patient's left is on the image left (neurological convention).
    upright = np.ascontiguousarray(plane.T[::-1])
    return Image2D(upright, ref.name, ref.path, "nifti")


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError as err:
        raise DataError(f"{path}: file not found. Check the path.") from err


def _check_suffix(path: Path) -> None:
    if suffix_of(path) not in IMAGE_SUFFIXES:
        raise DataError(f"{path}: unsupported extension {suffix_of(path)!r}. MWM reads "
                        f"{', '.join(IMAGE_SUFFIXES)}.")


def _check_axis(path: Path, axis: int) -> None:
    if axis not in (0, 1, 2):
        raise DataError(f"{path}: slice axis must be 0, 1 or 2, got {axis}.")


# --------------------------------------------------------------------------- model input

def to_model_input(image: Image2D, *, window: tuple[float, float] | str | None = None,
                   normalization: str = "auto") -> np.ndarray:
    """Raw image → float32 (3, H, W) in [0, 1], the input every MWM model starts from.

    Intensity rule (``normalization="auto"``):

    * an explicit ``window=(centre, width)`` clips to ``[c - w/2, c + w/2]`` and scales
      that range to [0, 1]; ``window="file"`` uses the window stored in the DICOM file;
    * otherwise 8-bit files are divided by 255 (shown as stored);
    * everything else (16-bit files, float TIFF, DICOM modality values, NIfTI) maps the
      0.5th–99.5th percentile range of the slice to [0, 1] and clips outliers.

    ``normalization`` forces one rule: ``dtype`` (divide by the integer type's maximum),
    ``percentile`` or ``minmax``. Gray images are repeated over three channels; RGB is
    kept. Dataset mean/std standardization happens later, inside the models.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    pixels = image.pixels.astype(np.float32)
    if window == "file":
        if image.window is None:
            raise DataError(f"{image.source}: no window stored in the file; pass "
                            "--window CENTRE WIDTH or leave the window unset.")
        window = image.window
    if window is not None:
        centre, width = window
        if width <= 0:
            raise ValueError(f"window width must be positive, got {width}")
        low, high = centre - width / 2.0, centre + width / 2.0
    else:
        low, high = _intensity_range(image, pixels, normalization)
    scaled = (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)
    scaled = np.clip(scaled, 0.0, 1.0)
    chw = scaled[None] if scaled.ndim == 2 else scaled.transpose(2, 0, 1)
    if chw.shape[0] == 1:
        chw = np.repeat(chw, 3, axis=0)
    return np.ascontiguousarray(chw, dtype=np.float32)


def _intensity_range(image: Image2D, pixels: np.ndarray, normalization: str) -> tuple[float, float]:
    rule = normalization
    if rule == "auto":
        rule = "dtype" if image.kind == "uint8" else "percentile"
    if rule == "dtype":
        maxima = {"uint8": 255.0, "uint16": 65535.0}
        if image.kind not in maxima:
            raise DataError(f"{image.source}: normalization 'dtype' needs an 8- or 16-bit "
                            f"integer file, this one holds {image.kind} values.")
        return 0.0, maxima[image.kind]
    if rule == "percentile":
        low, high = np.percentile(pixels, PERCENTILES)
        return float(low), float(high)
    return float(pixels.min()), float(pixels.max())


def load_model_input(path: str | os.PathLike | SliceRef, **kwargs) -> np.ndarray:
    """Shortcut: read a single-slice image and return :func:`to_model_input` of it."""
    return to_model_input(read_image(path), **kwargs)


# --------------------------------------------------------------------------- masks

LABEL_MAP_MAX = 16
#: Folders whose JPEG masks were already warned about (one warning per folder, not per file).
_LOSSY_WARNED: set[Path] = set()


def read_mask(path: str | os.PathLike | SliceRef,
              shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a region mask as bool (H, W).

    Binarization rule (:func:`binarize_mask`), the same for lossless and JPEG files:
    integer masks whose values are all ≤ 16 (0/1 masks, small label maps, and 0/1 masks
    saved as JPEG, whose ringing stays in 0–3) are foreground wherever the value is
    non-zero; any other mask (0/255, 0/65535, float) is foreground where the value exceeds
    half of its maximum, so the ringing and interpolation halos of 0/255 masks are
    dropped. RGB masks use the largest channel. An all-zero mask is empty. JPEG masks are
    accepted with one warning per folder.

    ``shape`` = the paired image's (H, W): a mask of another size is an error.
    """
    ref = path if isinstance(path, SliceRef) else _single_ref(Path(path))
    image = read_slice(ref)
    values = image.pixels.max(axis=2) if image.pixels.ndim == 3 else image.pixels
    if suffix_of(ref.path) in LOSSY_SUFFIXES:
        _warn_lossy_mask(ref.path)
    if shape is not None and tuple(values.shape) != tuple(shape):
        raise DataError(f"{ref.path}: mask is {values.shape[1]}x{values.shape[0]} (WxH) but "
                        f"its image is {shape[1]}x{shape[0]}. Masks must have the image's "
                        "size: resize with nearest-neighbour interpolation or regenerate it.")
    return binarize_mask(values)


def binarize_mask(values: np.ndarray) -> np.ndarray:
    """The mask binarization rule of :func:`read_mask` on an array.

    The scale is read from the values present, not from the file type: a mask whose
    values never pass 16 is a 0/1 (or small-label) mask, whatever JPEG did to it.
    """
    peak = float(values.max()) if values.size else 0.0
    if peak <= 0:
        return np.zeros(values.shape, dtype=bool)
    integral = np.issubdtype(values.dtype, np.integer) or bool(np.all(values == np.round(values)))
    if integral and peak <= LABEL_MAP_MAX:
        return values > 0
    return values > peak / 2.0


def _warn_lossy_mask(path: Path) -> None:
    folder = path.parent.resolve()
    if folder in _LOSSY_WARNED:
        return
    _LOSSY_WARNED.add(folder)
    warnings.warn(f"{folder}: masks stored as JPEG (lossy), e.g. {path.name}; JPEG blurs "
                  "their edges. Save masks as PNG (lossless) to keep them exact. (Said once "
                  "per folder.)", stacklevel=3)


def _single_ref(path: Path) -> SliceRef:
    refs = list_slices(path)
    if len(refs) != 1:
        raise DataError(f"{path}: mask file holds {len(refs)} slices; pass the slice "
                        "(SliceRef) that matches its image.")
    return refs[0]
