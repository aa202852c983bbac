"""Bad data in a dataset: JPEG masks, files that list no image, prompts, inspect's report."""

import json
import warnings

import cv2
import nibabel as nib
import numpy as np
import pytest

from mwm.cli import main
from mwm.data.inspect import inspect_dataset
from mwm.data.io import DataError, read_mask
from mwm.data.layouts import Sample, attach_prompts, find_images, open_dataset, read_manifest


def png(path, value=100, shape=(16, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full(shape, value, np.uint8))
    return path


def disks():
    """Two disks of 305 pixels; JPEG rings one of them up to 2 at quality 90, the other
    at quality 100."""
    yy, xx = np.mgrid[:64, :112]
    return ((yy - 28) ** 2 + (xx - 28) ** 2 < 100) | ((yy - 30) ** 2 + (xx - 82) ** 2 < 100)


def four_d(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3, 2), np.float32), np.eye(4)), path)
    return path


# --------------------------------------------------------------------------- A: JPEG masks

@pytest.mark.parametrize("scale", [1, 255])
@pytest.mark.parametrize("quality", [90, 100])
def test_jpeg_masks_keep_their_region_at_either_scale(tmp_path, scale, quality):
    truth = disks()
    cv2.imwrite(str(tmp_path / "m.jpg"), truth.astype(np.uint8) * scale,
                [cv2.IMWRITE_JPEG_QUALITY, quality])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        region = read_mask(tmp_path / "m.jpg", shape=truth.shape)
    dice = 2 * (region & truth).sum() / (region.sum() + truth.sum())
    assert dice >= 0.9, dice


def test_jpeg_masks_warn_once_per_folder(tmp_path):
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        for i in range(3):
            cv2.imwrite(str(tmp_path / folder / f"m{i}.jpg"), disks().astype(np.uint8) * 255)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for folder in ("one", "two"):
            for i in range(3):
                read_mask(tmp_path / folder / f"m{i}.jpg")
    said = [str(w.message) for w in caught if "JPEG" in str(w.message)]
    assert len(said) == 2 and "PNG" in said[0]
    assert str(tmp_path / "one") in said[0] and str(tmp_path / "two") in said[1]


# --------------------------------------------------------------------------- B: unlistable files

def test_inspect_lists_a_4d_nifti_and_reads_the_rest(tmp_path, capsys):
    png(tmp_path / "a.png")
    png(tmp_path / "b.png")
    four_d(tmp_path / "series.nii.gz")
    assert main(["inspect", str(tmp_path), "--quiet"]) == 1
    text = capsys.readouterr().out
    assert "3 images, 2 readable, 1 failed" in text
    assert "series.nii.gz: 4-D NIfTI" in text and "fslsplit" in text and "four_to_three" in text


def test_readers_refuse_naming_every_unreadable_file(tmp_path):
    png(tmp_path / "good.png")
    four_d(tmp_path / "series.nii.gz")
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti file")
    (tmp_path / "broken.dcm").write_bytes(b"not a dicom file")
    for read in (find_images, open_dataset):
        with pytest.raises(DataError, match="(?s)3 problems.*broken.dcm.*broken.nii.gz.*series"):
            read(tmp_path)
    dataset = open_dataset(tmp_path, lenient=True)
    assert [s.name for s in dataset.samples] == ["good"]
    assert sorted(p["name"] for p in dataset.problems) == ["broken", "broken", "series"]


def test_manifest_and_class_folders_record_unlistable_files(tmp_path):
    png(tmp_path / "train" / "tumor" / "a.png")
    four_d(tmp_path / "train" / "normal" / "s.nii")
    dataset = open_dataset(tmp_path, lenient=True)
    assert [s.name for s in dataset.samples] == ["a"] and dataset.problems[0]["name"] == "s"
    (tmp_path / "m.csv").write_text("image,mask\ntrain/tumor/a.png,train/normal/s.nii\n"
                                    "train/normal/s.nii,\n")
    problems = []
    samples = read_manifest(tmp_path / "m.csv", problems=problems)
    assert [(s.name, s.mask) for s in samples] == [("a", None)] and len(problems) == 2
    with pytest.raises(DataError, match="s.nii: 4-D"):
        read_manifest(tmp_path / "m.csv")


def test_usable_leaves_out_what_a_problem_names(tmp_path):
    png(tmp_path / "a.png")
    png(tmp_path / "x.png")
    png(tmp_path / "x.bmp")
    dataset = open_dataset(tmp_path, lenient=True)
    assert len(dataset.samples) == 3 and dataset.problems[0]["name"] == "x"
    assert [s.name for s in dataset.usable()] == ["a"]


# --------------------------------------------------------------------------- C: prompts

def test_prompt_file_overrides_the_flag_which_overrides_the_manifest(tmp_path):
    for name in ("a", "b", "c"):
        png(tmp_path / f"{name}.png")
    (tmp_path / "m.csv").write_text("image,prompt\na.png,manifest a\nb.png,\nc.png,manifest c\n")
    samples = read_manifest(tmp_path / "m.csv")
    got = attach_prompts(samples, {"a": "file a"}, "default")
    assert [s.prompt for s in got] == ["file a", "default", "default"]  # --prompt beats the column
    assert [s.prompt for s in attach_prompts(samples, None, "default")] == ["default"] * 3
    assert [s.prompt for s in attach_prompts(samples[::2])] == ["manifest a", "manifest c"]
    with pytest.raises(DataError, match=r"b.png: no prompt for 'b' in p.json"):
        attach_prompts(samples, {"a": "file a"}, source="p.json")


def test_image_without_prompt_names_the_three_ways(tmp_path):
    png(tmp_path / "a.png")
    png(tmp_path / "b.png")
    samples = [Sample(ref) for ref in find_images(tmp_path)]
    with pytest.raises(DataError) as info:
        attach_prompts(samples)
    message = str(info.value)
    assert "a.png: no prompt for 'a' (and 1 more image(s) without one)" in message
    assert "'prompt' column" in message and "--prompt TEXT" in message
    assert '--prompts FILE with an entry "a"' in message


# --------------------------------------------------------------------------- D: inspect

def test_inspect_lists_duplicates_with_the_other_problems(tmp_path, capsys):
    png(tmp_path / "images" / "x.png")
    png(tmp_path / "images" / "x.jpg")
    png(tmp_path / "images" / "a.png")
    (tmp_path / "images" / "c.png").write_bytes(b"garbage")
    png(tmp_path / "masks" / "a.png", 255)
    png(tmp_path / "masks" / "x.png", 255)
    (tmp_path / "p.json").write_text(json.dumps({"a": "tumor", "x": "tumor"}))
    assert main(["inspect", str(tmp_path), "--prompts", str(tmp_path / "p.json"),
                 "--quiet"]) == 1
    assert "duplicate image name 'x'" in capsys.readouterr().out
    rows = {row["path"]: row for row in inspect_dataset(
        tmp_path, prompts=tmp_path / "p.json", progress=False).rows}
    broken = rows[str(tmp_path / "images" / "c.png")]["error"]
    assert "OpenCV cannot decode" in broken and "no mask named c" in broken
    assert "no prompt for 'c'" in broken
    for name in ("x.png", "x.jpg"):
        assert "duplicate image name 'x'" in rows[str(tmp_path / "images" / name)]["error"]
    assert rows[str(tmp_path / "images" / "a.png")]["error"] == ""
