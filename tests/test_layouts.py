"""Dataset layouts, prompt mappings and their error messages."""

import json

import cv2
import nibabel as nib
import numpy as np
import pytest

from mwm.data.io import DataError
from mwm.data.layouts import (attach_prompts, class_folders, find_images, load_prompts,
                              open_dataset, paired_folders, read_manifest)


def png(path, value=100, shape=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full(shape, value, np.uint8))
    return path


def test_paired_by_stem_with_any_extensions(tmp_path):
    png(tmp_path / "images" / "a.png")
    cv2.imwrite(str(tmp_path / "images" / "b.tif"), np.zeros((8, 8), np.uint16))
    png(tmp_path / "masks" / "a.bmp", 255)
    png(tmp_path / "masks" / "b.png", 0)
    samples = paired_folders(tmp_path / "images", tmp_path / "masks")
    assert [(s.name, s.mask.path.name) for s in samples] == [("a", "a.bmp"), ("b", "b.png")]


def test_missing_mask_names_the_image(tmp_path):
    png(tmp_path / "images" / "a.png")
    png(tmp_path / "images" / "lonely.png")
    png(tmp_path / "masks" / "a.png")
    with pytest.raises(DataError, match="lonely.png.*no mask named lonely"):
        paired_folders(tmp_path / "images", tmp_path / "masks")
    samples = paired_folders(tmp_path / "images", tmp_path / "masks", require_masks=False)
    assert samples[1].mask is None


def test_duplicate_stem_is_an_error(tmp_path):
    png(tmp_path / "images" / "x.png")
    png(tmp_path / "images" / "x.jpg")
    with pytest.raises(DataError, match="duplicate image name 'x'.*x.jpg.*x.png"):
        find_images(tmp_path / "images")


def test_nifti_volumes_pair_slice_by_slice(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3), np.float32), np.eye(4)), tmp_path / "images" / "v.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3), np.uint8), np.eye(4)), tmp_path / "masks" / "v.nii")
    samples = paired_folders(tmp_path / "images", tmp_path / "masks")
    assert [s.name for s in samples] == ["v_z000", "v_z001", "v_z002"]
    assert all(s.mask.name == s.name for s in samples)


def test_class_folders(tmp_path):
    for split, label, name in [("train", "tumor", "a"), ("train", "normal", "b"),
                               ("val", "tumor", "c"), ("val", "normal", "d")]:
        png(tmp_path / split / label / f"{name}.png")
    samples, classes = class_folders(tmp_path)
    assert classes == ["normal", "tumor"]
    assert {(s.name, s.label, s.split) for s in samples} == {
        ("a", "tumor", "train"), ("b", "normal", "train"), ("c", "tumor", "val"), ("d", "normal", "val")}
    assert open_dataset(tmp_path).layout == "class-folders"


def test_class_folders_need_splits(tmp_path):
    png(tmp_path / "tumor" / "a.png")
    with pytest.raises(DataError, match="train"):
        class_folders(tmp_path)


def test_csv_manifest_relative_paths_and_columns(tmp_path):
    png(tmp_path / "img" / "a.png")
    png(tmp_path / "img" / "b.png")
    png(tmp_path / "msk" / "a.png", 255)
    (tmp_path / "m.csv").write_text("image,label,mask,prompt,split\n"
                                    "img/a.png,tumor,msk/a.png,brain tumor,train\n"
                                    "img/b.png,normal,,,val\n")
    samples = read_manifest(tmp_path / "m.csv")
    assert samples[0].label == "tumor" and samples[0].mask.path.name == "a.png"
    assert samples[0].prompt == "brain tumor" and samples[0].split == "train"
    assert samples[1].mask is None and samples[1].prompt is None
    dataset = open_dataset(tmp_path / "m.csv")
    assert dataset.layout == "manifest" and dataset.classes == ["normal", "tumor"]


def test_csv_manifest_any_subset_of_columns(tmp_path):
    png(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("image\na.png\n")
    assert [s.name for s in read_manifest(tmp_path / "m.csv")] == ["a"]


@pytest.mark.parametrize("content,match", [
    ("label\nx\n", "needs an 'image' column"),
    ("image\nmissing.png\n", r"m.csv, line 2: image file .*missing.png not found"),
    ("image,split\na.png,training\n", "split 'training' is not one of"),
])
def test_csv_manifest_errors_name_file_and_line(tmp_path, content, match):
    png(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text(content)
    with pytest.raises(DataError, match=match):
        read_manifest(tmp_path / "m.csv")


def test_prompts_from_json_and_csv(tmp_path):
    png(tmp_path / "images" / "a.png")
    png(tmp_path / "images" / "b.png")
    refs = find_images(tmp_path / "images")
    (tmp_path / "p.json").write_text(json.dumps({"a": "brain tumor", "b.png": "edema"}))
    (tmp_path / "p.csv").write_text("image,prompt\na.png,brain tumor\nb,edema\n")
    for name in ("p.json", "p.csv"):
        from mwm.data.layouts import Sample
        samples = attach_prompts([Sample(r) for r in refs], load_prompts(tmp_path / name))
        assert [s.prompt for s in samples] == ["brain tumor", "edema"]


def test_missing_prompt_names_the_image(tmp_path):
    from mwm.data.layouts import Sample
    png(tmp_path / "a.png")
    png(tmp_path / "zz.png")
    (tmp_path / "p.json").write_text(json.dumps({"a": "tumor"}))
    samples = [Sample(r) for r in find_images(tmp_path)]
    with pytest.raises(DataError, match="zz.png: no prompt for 'zz'"):
        attach_prompts(samples, load_prompts(tmp_path / "p.json"))
    # a default prompt covers images the mapping lacks
    assert [s.prompt for s in attach_prompts(samples, load_prompts(tmp_path / "p.json"), "lesion")] == ["tumor", "lesion"]
    with pytest.raises(DataError, match="--prompt"):
        attach_prompts(samples)


def test_bad_prompt_files(tmp_path):
    (tmp_path / "p.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="expected an object"):
        load_prompts(tmp_path / "p.json")
    (tmp_path / "q.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_prompts(tmp_path / "q.json")


def test_open_dataset_finds_images_and_masks_subfolders(tmp_path):
    png(tmp_path / "images" / "a.png")
    png(tmp_path / "masks" / "a.png", 255)
    dataset = open_dataset(tmp_path)
    assert dataset.layout == "paired" and dataset.samples[0].mask is not None


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no image files"):
        find_images(tmp_path)
