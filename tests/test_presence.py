"""Abstention (`mwm localize --abstain`) and contrast prompts: threshold calibration, the
presence metrics, empty regions for absent images, the default contrast, fingerprints, and
localize → postprocess → evaluate end to end with a tiny random-weight CLIP."""

import csv
import json

import cv2
import numpy as np
import pytest

from mwm.cli import main
from mwm.data.layouts import Sample, find_images
from mwm.data.io import SliceRef, read_mask
from mwm.errors import DataError
from mwm.files import write_json, write_png
from mwm.localize.pipeline import fingerprint, write_maps
from mwm.localize.postprocess import PostprocessConfig, postprocess_folder
from mwm.localize.presence import (ContrastRule, PresenceSpec, dataset_info, default_contrast,
                                   presence_metrics, read_threshold, youden_threshold)
from mwm.runlog import RunManifest
from vlm_fixtures import write_open_clip_dir

FAST = ["--layer", "1", "--steps", "2", "--samples", "2", "--batch-size", "4", "--quiet",
        "--device", "cpu"]


# --------------------------------------------------------------------------- calibration

def test_youden_threshold_separates_and_ties_go_lower():
    assert youden_threshold([-3.0, -2.0, -1.0, 0.0], [0, 0, 1, 1]) == -1.0
    # t=0.2 and t=0.4 both give balanced accuracy 0.75 (0.1: 0.5, 0.3: 0.5): the lower wins
    assert youden_threshold([0.4, 0.1, 0.3, 0.2], [1, 0, 0, 1]) == 0.2
    # repeated scores: candidates are the distinct values; t=0.5 keeps both positives
    assert youden_threshold([0.5, 0.5, 0.2, 0.5], [1, 1, 0, 0]) == 0.5
    with pytest.raises(ValueError, match="present and absent"):
        youden_threshold([0.1, 0.2], [1, 1])


def test_presence_metrics_hand_computed():
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    truth = [1, 1, 0, 1, 0, 0]
    decided = np.array(scores) >= 0.65                 # T T T F F F
    m = presence_metrics(scores, decided, truth)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 1, 1, 2)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)
    assert m["auroc"] == pytest.approx(8 / 9)          # 9 pairs, only (0.6, 0.7) misordered
    tied = presence_metrics([0.5, 0.5, 0.1], [1, 1, 0], [1, 0, 0])
    assert tied["auroc"] == pytest.approx(0.75)        # one tie counts one half
    none = presence_metrics([0.1, 0.2], [0, 0], [0, 0])
    assert none["precision"] is None and none["recall"] is None and none["auroc"] is None


def test_threshold_given_as_number_or_presence_file(tmp_path):
    assert read_threshold("-0.75")[:2] == (-0.75, "--presence-threshold -0.75")
    write_json(tmp_path / "presence.json", {"threshold": -1.5, "calibration": {"n": 4}})
    given = str(tmp_path / "presence.json")
    assert read_threshold(given) == (-1.5, given, {"n": 4})
    with pytest.raises(DataError, match="neither a number nor"):
        read_threshold(str(tmp_path / "missing.json"))


def test_calibration_refuses_test_images_and_needs_a_source(tmp_path):
    ref = SliceRef(tmp_path / "a.png")
    with pytest.raises(DataError, match="test split"):
        PresenceSpec([Sample(ref, ref, split="test", prompt="x")])
    with pytest.raises(DataError, match="needs a presence threshold"):
        PresenceSpec()


# --------------------------------------------------------------------------- contrast prompts

def write_findings(root, modality="chest-xray"):
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "dataset.json", {"modality": modality})
    rows = [("images/x0.png", "nodule", "finding", 1, "masks/nodule/x0.png", "lung nodule"),
            ("images/x0.png", "mass", "finding", 0, "masks/mass/x0.png", "lung mass"),
            ("images/x0.png", "lungs", "anatomy", 1, "masks/lungs/x0.png", "lungs"),
            ("images/x1.png", "nodule", "finding", 0, "masks/nodule/x1.png", "lung nodule"),
            ("images/x1.png", "effusion", "finding", 1, "masks/effusion/x1.png", "")]
    with (root / "findings.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "finding", "kind", "present", "mask", "phrase"])
        writer.writerows(rows)
    (root / "images").mkdir(exist_ok=True)


def test_default_contrast_from_findings_and_modality(tmp_path):
    write_findings(tmp_path / "ds")
    info = dataset_info(tmp_path / "ds" / "images")     # an images folder: its dataset above
    assert info.modality == "chest-xray" and len(info.findings) == 5
    # the normal prompt, then the other findings' phrases (a finding without one: its name)
    assert default_contrast("lung nodule", info) == ["normal chest radiograph", "lung mass",
                                                     "effusion"]
    assert default_contrast("mass", info) == ["normal chest radiograph", "lung nodule",
                                              "effusion"]
    assert default_contrast("tumor", dataset_info(tmp_path)) == ["a normal medical image"]
    rule = ContrastRule(["healthy"], {"lung mass": ["lung nodule", "lung mass"]}, info)
    assert rule.for_prompt("lung mass") == ["lung nodule"]        # the file's entry, own dropped
    assert rule.for_prompt("lung nodule") == ["healthy"]          # --contrast for the rest
    assert ContrastRule(None, {}, info).for_prompt("lung nodule")[0] == "normal chest radiograph"
    with pytest.raises(DataError, match="only the prompt itself"):
        ContrastRule(["tumor"]).for_prompt("tumor")


def test_findings_present_column_decides_calibration_truth(tmp_path):
    from mwm.localize.presence import finding_truth

    write_findings(tmp_path / "ds")
    info = dataset_info(tmp_path / "ds")
    x1 = Sample(SliceRef(tmp_path / "ds" / "images" / "x1.png"), prompt="lung nodule")
    assert finding_truth(x1, info.findings) is False
    x0 = Sample(SliceRef(tmp_path / "ds" / "images" / "x0.png"), prompt="lung nodule")
    assert finding_truth(x0, info.findings) is True


def test_fingerprint_and_maps_follow_the_contrast(tmp_path):
    assert fingerprint("m", "tumor", {}) != fingerprint("m", "tumor", {}, ["normal"])
    assert fingerprint("m", "tumor", {}, ["normal"]) != fingerprint("m", "tumor", {}, ["cyst"])
    folder = tmp_path / "img"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), np.full((8, 8), 90, np.uint8))
    samples = [Sample(ref, prompt="tumor") for ref in find_images(folder)]
    calls = []

    def saliency(images, prompts, names):
        calls.append(len(images))
        return [np.zeros(im.shape[1:]) for im in images]

    def run(contrast):
        return write_maps(samples, tmp_path / "out", saliency, model_id="m", params={},
                          progress=False, contrast_of=lambda prompts: contrast)
    run(["normal"])
    assert run(["normal"]).n_skipped == 1 and len(calls) == 1
    assert run(["cyst"]).n_written == 1 and len(calls) == 2


def test_contrast_without_a_reader_is_refused(tmp_path, capsys):
    assert main(["localize", str(tmp_path), "--out", str(tmp_path / "o"), "--prompt", "x",
                 "--contrast", "normal"]) == 2
    assert "--contrast / --contrast-file are read by" in capsys.readouterr().err
    assert main(["localize", str(tmp_path), "--out", str(tmp_path / "o"), "--prompt", "x",
                 "--presence-threshold", "0"]) == 2
    assert "add --abstain" in capsys.readouterr().err


# --------------------------------------------------------------------------- postprocess

def bright_square(shape=(24, 24)):
    p = np.zeros(shape, np.float32)
    p[6:14, 8:18] = 1.0
    return p


def test_postprocess_empties_absent_images_only(tmp_path):
    sal = tmp_path / "sal"
    for name in ("a", "b"):
        write_png(sal / f"{name}.png", np.rint(bright_square() * 255).astype(np.uint8))
    (sal / "presence.csv").write_text("image,prompt,score,present\na,tumor,-2.0,0\n"
                                      "b,tumor,-0.1,1\n")
    with RunManifest(sal, "localize", {}) as run:          # as `mwm localize --abstain` lists it
        run.add(outputs=["a.png", "b.png", "presence.csv", "presence.json"])
    config = PostprocessConfig(method="kmeans", top_k=1)
    summary = postprocess_folder(sal, tmp_path / "out", config, boxes_dir=tmp_path / "boxes",
                                 progress=False)
    assert summary["n_written"] == 2 and summary["n_failed"] == 0   # presence.json is no map
    assert summary["n_absent"] == 1 and summary["absent"] == ["a"]
    assert not read_mask(tmp_path / "out" / "a.png").any()
    assert not read_mask(tmp_path / "boxes" / "a.png").any()
    assert np.array_equal(read_mask(tmp_path / "out" / "b.png"), bright_square() > 0)
    assert "presence.csv" in summary["outputs"] and (tmp_path / "out" / "presence.csv").is_file()
    # a presence table the manifest does not list is not read
    with RunManifest(sal, "localize", {}) as run:
        run.add(outputs=["a.png", "b.png"])
    plain = postprocess_folder(sal, tmp_path / "plain", config, progress=False)
    assert plain["n_absent"] == 0 and read_mask(tmp_path / "plain" / "a.png").any()
    # listed but gone: an error naming the file, not a silent run without abstention
    with RunManifest(sal, "localize", {}) as run:
        run.add(outputs=["a.png", "b.png", "presence.csv"])
    (sal / "presence.csv").unlink()
    with pytest.raises(DataError, match="presence.csv: listed by `mwm localize` but missing"):
        postprocess_folder(sal, tmp_path / "gone", config, progress=False)


# --------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """8 brain phantoms; val = two with a lesion and two without (empty masks)."""
    from mwm.data.phantoms import generate_phantoms

    root = tmp_path_factory.mktemp("presence")
    ph = root / "ph"
    generate_phantoms(ph, n=8, size=48, seed=1, workers=1, progress=False)
    rows = list(csv.DictReader((ph / "labels.csv").open()))
    split = {"00001": "val", "00003": "val", "00004": "val", "00005": "val", "00006": "test",
             "00000": "test"}
    for row in rows:
        row["split"] = split.get(row["image"][-9:-4], "train")
    with (ph / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root, ph, f"local-dir:{write_open_clip_dir(root / 'model')}"


def read_table(path):
    return {r["image"]: (float(r["score"]), r["present"] == "1")
            for r in csv.DictReader(path.open())}


def test_abstain_end_to_end(phantoms, capsys):
    root, ph, model = phantoms
    sal = root / "sal"
    assert main(["localize", str(ph), "--out", str(sal), "--model", model, "--abstain",
                 *FAST]) == 0
    assert "images found absent" in capsys.readouterr().out
    found = json.loads((sal / "presence.json").read_text())
    table = read_table(sal / "presence.csv")
    assert len(table) == 8 and found["contrast"] == {"brain tumor": ["normal brain MRI"]}
    assert found["source"].startswith("the val split of") and found["calibration"]["n"] == 4
    # the threshold is Youden's on the four val images, whose truth is their masks
    val = [f"brain-mri_0000{i}" for i in (1, 3, 4, 5)]
    truth = [read_mask(ph / "masks" / f"{name}.png").any() for name in val]
    assert sorted(truth) == [False, False, True, True]
    assert found["threshold"] == pytest.approx(
        youden_threshold([table[n][0] for n in val], truth), abs=1e-6)
    assert all(present == (score >= found["threshold"] - 1e-6)
               for score, present in table.values())
    manifest = json.loads((sal / "run_manifest.json").read_text())
    assert {"presence.csv", "presence.json"} <= set(manifest["results"]["outputs"])
    assert json.loads((sal / "m2ib_config.json").read_text())["contrast"] == {
        "brain tumor": ["normal brain MRI"]}

    # a given threshold (the median score): the maps stay up to date, some images abstain
    median = float(np.median([score for score, _ in table.values()]))
    assert main(["localize", str(ph), "--out", str(sal), "--model", model, "--abstain",
                 "--presence-threshold", str(median), *FAST]) == 0
    assert "0 saliency maps written, 8 up to date" in capsys.readouterr().out
    table = read_table(sal / "presence.csv")
    absent = sorted(name for name, (_, present) in table.items() if not present)
    assert 0 < len(absent) < 8
    assert main(["postprocess", str(sal), "--out", str(root / "reg"), "--top-k", "1",
                 "--quiet"]) == 0
    assert f"{len(absent)} of them empty" in capsys.readouterr().out
    for name in table:
        assert read_mask(root / "reg" / f"{name}.png").any() == (name not in absent)
    assert main(["evaluate", str(root / "reg"), str(ph / "masks"), "--out", str(root / "ev"),
                 "--quiet"]) == 0
    summary = json.loads((root / "ev" / "summary.json").read_text())
    gt_empty = [n for n in table if not read_mask(ph / "masks" / f"{n}.png").any()]
    assert summary["empty_regions"]["n_empty_gt"] == len(gt_empty)
    assert summary["empty_regions"]["n_empty_prediction"] == len(set(gt_empty) & set(absent))
    assert summary["presence"]["n"] == 8 and summary["presence"]["n_absent"] == len(gt_empty)
    assert summary["presence"]["tp"] + summary["presence"]["fp"] == 8 - len(absent)


def test_contrastive_maps_are_recomputed_when_the_contrast_changes(phantoms, capsys):
    root, ph, model = phantoms
    sal = root / "sal_contrastive"
    args = ["localize", str(ph / "images"), "--prompt", "brain tumor", "--out", str(sal),
            "--model", model, "--objective", "contrastive", *FAST]
    assert main(args) == 0                          # default contrast: the normal brain prompt
    assert json.loads((sal / "m2ib_config.json").read_text())["contrast"] == {
        "brain tumor": ["normal brain MRI"]}
    first = cv2.imread(str(sal / "brain-mri_00000.png"), cv2.IMREAD_UNCHANGED)
    assert main(args) == 0
    assert "0 saliency maps written, 8 up to date" in capsys.readouterr().out
    assert main(args + ["--contrast", "normal brain MRI|cyst"]) == 0
    assert "8 saliency maps written" in capsys.readouterr().out
    assert first.shape == (48, 48)


def test_abstain_decides_with_a_known_score(tmp_path):
    """A score that is the image's mean brightness: calibration on two bright (present) and
    two dark (absent) val images puts the threshold at the dimmest bright one."""
    from mwm.localize.presence import abstain

    samples = []
    for i, (level, lesion) in enumerate([(200, True), (180, True), (40, False), (60, False),
                                         (190, False), (30, True)]):
        image, mask = tmp_path / f"i{i}.png", tmp_path / f"m{i}.png"
        cv2.imwrite(str(image), np.full((8, 8), level, np.uint8))
        cv2.imwrite(str(mask), np.full((8, 8), 255 * lesion, np.uint8))
        samples.append(Sample(SliceRef(image), SliceRef(mask), prompt="tumor",
                              split="val" if i < 4 else "test"))
    seen = []

    def score(images, prompts, contrast):
        seen.append(contrast)
        return np.array([im.mean() for im in images])

    spec = PresenceSpec(samples[:4], source="val")
    found = abstain(samples, tmp_path / "out", score, spec, ContrastRule(["healthy brain"]),
                    progress=False)
    assert found["threshold"] == pytest.approx(180 / 255)
    assert found["calibration"]["balanced_accuracy"] == 1.0 and found["n_absent"] == 3
    # one pass: the calibration images reuse their scores from it (never scored twice)
    assert seen == [[["healthy brain"]] * 6]
    table = read_table(tmp_path / "out" / "presence.csv")
    assert [table[f"i{i}"][1] for i in range(6)] == [True, True, False, False, True, False]
    with pytest.raises(DataError, match="present in all 2 calibration images"):
        abstain(samples, tmp_path / "out", score, PresenceSpec(samples[:2], source="val"),
                ContrastRule(["x"]), progress=False)


def test_abstain_without_calibration_data_is_refused(phantoms, capsys):
    root, ph, model = phantoms
    assert main(["localize", str(ph / "images"), "--prompt", "brain tumor", "--out",
                 str(root / "nocal"), "--model", model, "--abstain", *FAST]) == 2
    assert "no val-split images with masks" in capsys.readouterr().err


def test_experiment_abstains_and_scores_presence(phantoms, tmp_path):
    from mwm.experiment import parse_experiment
    from mwm.experiment.prepare import prepare

    root, ph, model = phantoms
    raw = {"data": {"images": str(ph)}, "pretrain": {"model": "resnet10t"},
           "evaluate": [{"name": "linear", "mode": "linear"}],
           "strategies": [{"name": "region", "masking": "region"}],
           "localize": {"prompt": "brain tumor", "model": model, "abstain": True,
                        "objective": "contrastive", "contrast": ["normal brain MRI", "cyst"],
                        "m2ib": {"layer": 1, "steps": 2, "samples": 2}}}
    prepared = prepare(parse_experiment(raw, "exp.yaml"), tmp_path, quiet=True, log=lambda _: None)
    table = read_table(prepared.saliency / "presence.csv")
    for name, (_, present) in table.items():
        assert read_mask(prepared.regions / f"{name}.png").any() == present
    assert json.loads((prepared.saliency / "m2ib_config.json").read_text())["contrast"] == {
        "brain tumor": ["normal brain MRI", "cyst"]}
    assert prepared.localization["presence"]["n"] == 2            # the test split
    for change, message in [({"abstain": "yes"}, "abstain must be true or false"),
                            ({"abstain": False, "objective": "published"}, "would change nothing"),
                            ({"objective": "other"}, "objective must be one of"),
                            ({"temperature": 0.2, "m2ib": {"temperature": 0.1}}, "give it once")]:
        with pytest.raises(DataError, match=message):
            parse_experiment({**raw, "localize": {**raw["localize"], **change}}, "exp.yaml")


def test_bad_contrast_and_findings_files_name_the_file(tmp_path):
    from mwm.localize.presence import load_contrast_file, read_findings

    bad = tmp_path / "c.json"
    for text, message in [("{not json", "not valid JSON"), ('["a"]', "expected an object"),
                          ('{"tumor": [1]}', "the entry 'tumor'"),
                          ('{"tumor": []}', "no contrast")]:
        bad.write_text(text)
        with pytest.raises(DataError, match=message):
            load_contrast_file(bad)
    with pytest.raises(DataError, match="contrast file not readable"):
        load_contrast_file(tmp_path / "missing.json")
    table = tmp_path / "findings.csv"
    table.write_text("image,finding,present\nimages/a.png,nodule,1\n")
    with pytest.raises(DataError, match="missing column.*kind"):
        read_findings(table)
    table.write_text("image,finding,kind,present\nimages/a.png,nodule,finding,maybe\n")
    with pytest.raises(DataError, match="line 2: present must be 1 or 0"):
        read_findings(table)
