"""Image and mask readers on real files written and read back with the libraries."""

import warnings
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from mwm.data.io import (DataError, SliceRef, binarize_mask, iter_images, list_slices,
                         load_model_input, read_image, read_mask, stem_of, suffix_of,
                         to_model_input)

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
NIBABEL_FILES = Path(nib.__file__).parent / "tests" / "data"


def write_dicom(path, pixels, *, slope=1.0, intercept=0.0, photometric="MONOCHROME2",
                window=None):
    """A minimal uncompressed DICOM file; ``pixels`` (H, W) or (F, H, W) uint16/int16."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


# --------------------------------------------------------------------------- names

def test_suffix_and_stem_handle_double_suffix():
    assert suffix_of("a/b.nii.gz") == ".nii.gz"
    assert stem_of("a/b.nii.gz") == "b"
    assert stem_of("scan.v2.PNG") == "scan.v2"
    assert SliceRef(Path("v.nii.gz"), 7, 2).name == "v_z007"
    assert SliceRef(Path("m.dcm"), 3).name == "m_f003"


# --------------------------------------------------------------------------- raster

@pytest.mark.parametrize("dtype,kind", [(np.uint8, "uint8"), (np.uint16, "uint16")])
def test_png_gray_round_trip(tmp_path, dtype, kind):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, np.iinfo(dtype).max, size=(20, 30), dtype=dtype)
    cv2.imwrite(str(tmp_path / "a.png"), pixels)
    image = read_image(tmp_path / "a.png")
    assert image.kind == kind and image.pixels.dtype == dtype
    np.testing.assert_array_equal(image.pixels, pixels)
    assert image.shape == (20, 30) and image.name == "a"


def test_rgb_png_is_returned_as_rgb(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 200  # red channel
    cv2.imwrite(str(tmp_path / "c.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    image = read_image(tmp_path / "c.png")
    np.testing.assert_array_equal(image.pixels, rgb)
    x = to_model_input(image)
    assert x.shape == (3, 8, 8)
    np.testing.assert_allclose(x[:, 0, 0], [200 / 255, 0, 0], atol=1e-6)


def test_tiff_16bit_and_float(tmp_path):
    pixels16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    cv2.imwrite(str(tmp_path / "a.tif"), pixels16)
    np.testing.assert_array_equal(read_image(tmp_path / "a.tif").pixels, pixels16)
    pixels32 = np.linspace(-1000, 3000, 64, dtype=np.float32).reshape(8, 8)
    cv2.imwrite(str(tmp_path / "b.tiff"), pixels32)
    image = read_image(tmp_path / "b.tiff")
    assert image.kind == "float"
    np.testing.assert_allclose(image.pixels, pixels32)


def test_jpeg_reads(tmp_path):
    pixels = np.full((16, 16), 120, np.uint8)
    cv2.imwrite(str(tmp_path / "j.jpg"), pixels)
    assert abs(int(read_image(tmp_path / "j.jpg").pixels.mean()) - 120) <= 2


def test_unreadable_and_unsupported_files_name_the_file(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="broken.png"):
        read_image(broken)
    with pytest.raises(DataError, match="unsupported extension"):
        read_image(tmp_path / "x.gif") if (tmp_path / "x.gif").write_bytes(b"GIF") else None
    with pytest.raises(DataError, match="not found"):
        read_image(tmp_path / "missing.png")


# --------------------------------------------------------------------------- DICOM

def test_dicom_rescale_slope_intercept(tmp_path):
    stored = np.array([[0, 1000], [2000, 3000]], dtype=np.uint16)
    path = write_dicom(tmp_path / "ct.dcm", stored, slope=1.0, intercept=-1024.0, window=(40, 400))
    image = read_image(path)
    assert image.kind == "dicom"
    np.testing.assert_allclose(image.pixels, stored.astype(np.float32) - 1024)
    assert image.window == (40.0, 400.0)
    # the stored window: -160..240 HU → [0, 1]
    x = to_model_input(image, window="file")
    np.testing.assert_allclose(x[0], [[0.0, 0.34], [1.0, 1.0]], atol=1e-6)
    x = to_model_input(image, window=(-24, 2000))  # [-1024, 976]
    np.testing.assert_allclose(x[0, 0], [0.0, 0.5], atol=1e-6)


def test_dicom_slope_scales_values(tmp_path):
    path = write_dicom(tmp_path / "s.dcm", np.array([[10, 20]], dtype=np.uint16), slope=0.5,
                       intercept=3.0)
    np.testing.assert_allclose(read_image(path).pixels, [[8.0, 13.0]])


def test_dicom_monochrome1_is_inverted(tmp_path):
    path = write_dicom(tmp_path / "m1.dcm", np.array([[0, 100]], dtype=np.uint16),
                       photometric="MONOCHROME1")
    np.testing.assert_allclose(read_image(path).pixels, [[100.0, 0.0]])


def test_dicom_multiframe_gives_one_slice_per_frame(tmp_path):
    frames = np.stack([np.full((4, 5), i * 10, np.uint16) for i in range(3)])
    path = write_dicom(tmp_path / "mf.dcm", frames)
    refs = list_slices(path)
    assert [r.name for r in refs] == ["mf_f000", "mf_f001", "mf_f002"]
    images = list(iter_images(path))
    assert [float(im.pixels.mean()) for im in images] == [0.0, 10.0, 20.0]
    with pytest.raises(DataError, match="3 slices"):
        read_image(path)


def test_pydicom_shipped_samples():
    ct = read_image(PYDICOM_FILES / "CT_small.dcm")
    ds = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(ct.pixels, expected)
    mr = read_image(PYDICOM_FILES / "MR_small.dcm")
    assert mr.shape == (64, 64) and mr.window is not None
    rle = read_image(PYDICOM_FILES / "MR_small_RLE.dcm")  # compressed, decoded natively
    np.testing.assert_allclose(rle.pixels, mr.pixels)
    rgb = list(iter_images(PYDICOM_FILES / "SC_rgb_rle_2frame.dcm"))
    assert len(rgb) == 2 and rgb[0].pixels.shape[-1] == 3
    assert to_model_input(rgb[0]).shape[0] == 3


def test_dicom_without_pixels_or_decoder_is_a_clear_error():
    with pytest.raises(DataError, match="without pixel data"):
        read_image(PYDICOM_FILES / "reportsi.dcm")
    with pytest.raises(DataError, match="(?s)JPEGLSNearLossless_08.dcm.*pip install"):
        read_image(PYDICOM_FILES / "JPEGLSNearLossless_08.dcm")  # no JPEG-LS decoder here
    with pytest.raises(DataError, match="(?s)MR_truncated.dcm.*less than expected"):
        read_image(PYDICOM_FILES / "MR_truncated.dcm")


# --------------------------------------------------------------------------- NIfTI

def test_nifti_slices_along_each_axis_upright(tmp_path):
    volume = np.zeros((6, 5, 4), np.float32)  # RAS: x (left→right), y (post→ant), z (inf→sup)
    volume[5, 4, 3] = 7.0  # right, anterior, superior corner
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "v.nii.gz")
    axial = list_slices(tmp_path / "v.nii.gz", axis=2)
    assert [r.name for r in axial][:2] == ["v_z000", "v_z001"] and len(axial) == 4
    top = read_image(axial[3])
    assert top.shape == (5, 6)  # rows = y, columns = x
    assert top.pixels[0, 5] == 7.0  # anterior at the top, x to the right
    sagittal = read_image(list_slices(tmp_path / "v.nii.gz", axis=0)[5])
    assert sagittal.shape == (4, 5) and sagittal.pixels[0, 4] == 7.0  # superior at the top
    coronal = read_image(list_slices(tmp_path / "v.nii.gz", axis=1)[4])
    assert coronal.name == "v_y004" and coronal.pixels[0, 5] == 7.0


def test_nifti_is_reoriented_to_canonical(tmp_path):
    volume = np.zeros((3, 3, 2), np.float32)
    volume[0, 0, 0] = 1.0
    flip_x = np.diag([-1.0, 1.0, 1.0, 1.0])  # stored left-right mirrored (LAS)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "ras.nii")
    nib.save(nib.Nifti1Image(volume[::-1].copy(), flip_x), tmp_path / "las.nii")
    a = read_image(list_slices(tmp_path / "ras.nii")[0]).pixels
    b = read_image(list_slices(tmp_path / "las.nii")[0]).pixels
    np.testing.assert_array_equal(a, b)


def test_nibabel_shipped_volume():
    path = NIBABEL_FILES / "anatomical.nii"
    refs = list_slices(path)
    shape = nib.as_closest_canonical(nib.load(path)).shape
    assert len(refs) == shape[2]
    middle = read_image(refs[len(refs) // 2])
    assert middle.kind == "nifti" and middle.pixels.max() > 0
    x = to_model_input(middle)
    assert x.shape == (3, shape[1], shape[0]) and 0 <= x.min() and x.max() <= 1


def test_4d_nifti_is_refused(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2, 3), np.float32), np.eye(4)), tmp_path / "f.nii")
    with pytest.raises(DataError, match="4-D"):
        list_slices(tmp_path / "f.nii")


# --------------------------------------------------------------------------- model input

def test_model_input_normalization_rules(tmp_path):
    cv2.imwrite(str(tmp_path / "g8.png"), np.array([[0, 51, 255]], np.uint8))
    x = load_model_input(tmp_path / "g8.png")
    assert x.dtype == np.float32 and x.shape == (3, 1, 3)
    np.testing.assert_allclose(x[:, 0, :], [[0, 0.2, 1.0]] * 3, atol=1e-6)
    # 16-bit: percentile range by default, full type range with "dtype"
    ramp = np.linspace(0, 4095, 1000).astype(np.uint16).reshape(10, 100)
    cv2.imwrite(str(tmp_path / "g16.png"), ramp)
    auto = load_model_input(tmp_path / "g16.png")
    assert auto.min() == 0.0 and auto.max() == 1.0
    np.testing.assert_allclose(np.median(auto), 0.5, atol=0.01)
    full = load_model_input(tmp_path / "g16.png", normalization="dtype")
    np.testing.assert_allclose(full.max(), 4095 / 65535, atol=1e-6)


def test_constant_image_gives_zeros_not_nan(tmp_path):
    cv2.imwrite(str(tmp_path / "flat.png"), np.full((4, 4), 1000, np.uint16))
    x = load_model_input(tmp_path / "flat.png")
    assert np.isfinite(x).all() and (x == 0).all()


# --------------------------------------------------------------------------- masks

@pytest.mark.parametrize("values,expected", [
    (np.array([[0, 1]], np.uint8), [[False, True]]),            # 0/1
    (np.array([[0, 255]], np.uint8), [[False, True]]),          # 0/255
    (np.array([[0, 1, 2, 3]], np.uint8), [[False, True, True, True]]),  # label map
    (np.array([[0, 40, 128, 250]], np.uint8), [[False, False, True, True]]),  # halo dropped
    (np.array([[0, 30000, 65535]], np.uint16), [[False, False, True]]),
    (np.array([[0.0, 0.4, 0.9]], np.float32), [[False, False, True]]),  # probabilities
    (np.zeros((1, 3), np.uint8), [[False, False, False]]),
])
def test_binarization_rule(values, expected):
    np.testing.assert_array_equal(binarize_mask(values), expected)


def test_jpeg_mask_warns_and_drops_ringing(tmp_path):
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    cv2.imwrite(str(tmp_path / "m.jpg"), mask, [cv2.IMWRITE_JPEG_QUALITY, 60])
    with pytest.warns(UserWarning, match="JPEG"):
        region = read_mask(tmp_path / "m.jpg")
    assert abs(int(region.sum()) - 256) <= 16  # ringing around the edge is not foreground
    assert region[16, 16] and not region[2, 2]


def test_mask_of_another_size_is_an_error(tmp_path):
    cv2.imwrite(str(tmp_path / "m.png"), np.zeros((10, 12), np.uint8))
    with pytest.raises(DataError, match=r"m.png.*12x10.*20x20"):
        read_mask(tmp_path / "m.png", shape=(20, 20))


def test_png_mask_reads_without_warning(tmp_path):
    mask = np.zeros((6, 6), np.uint8)
    mask[1:3, 1:4] = 255
    cv2.imwrite(str(tmp_path / "m.png"), mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(read_mask(tmp_path / "m.png", shape=(6, 6)), mask > 0)


def test_nifti_mask_slices_align_with_image_slices(tmp_path):
    volume = np.random.default_rng(1).random((8, 8, 3)).astype(np.float32)
    labels = (volume > 0.7).astype(np.uint8)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(labels, np.eye(4)), tmp_path / "lab.nii.gz")
    for img_ref, lab_ref in zip(list_slices(tmp_path / "img.nii.gz"),
                                list_slices(tmp_path / "lab.nii.gz")):
        image = read_image(img_ref)
        region = read_mask(lab_ref, shape=image.shape)
        np.testing.assert_array_equal(region, image.pixels > 0.7)
