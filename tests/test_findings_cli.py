"""Does the prompt choose? The multi-finding path end to end through the commands:
`mwm phantoms --findings multi` → `mwm inspect` → `mwm clip train --captions findings
--swap-negatives --phrase-weight 1` → `mwm localize --objective contrastive --abstain` (one
finding's prompt, threshold calibrated on the val split) → `mwm postprocess` → `mwm evaluate`
against that finding's masks. Every command runs in-process (`mwm.cli.main`), on a CLIP that
the project's own command trained, not on random weights or hand-made findings tables."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

pytest.importorskip("open_clip")

from mwm.cli import main

FINDING, PROMPT = "hemorrhage", "intracranial hemorrhage"
N_IMAGES, SIZE = 48, 64
CLIP = ["--model", "scratch-micro", "--epochs", "2", "--batch-size", "8", "--workers", "1",
        "--amp", "none", "--device", "cpu", "--quiet"]
GROUNDING = ["--captions", "findings", "--swap-negatives", "--phrase-weight", "1"]
# beta 0.01: at beta 1 the contrastive text term barely moves a 2-step bottleneck (maps differ
# by at most one grey level); docs/m2ib.md measures it at beta lowered about a hundredfold
M2IB = ["--steps", "2", "--samples", "2", "--beta", "0.01", "--batch-size", "16", "--device",
        "cpu", "--quiet"]


def cli(*args) -> tuple[int, str, str]:
    """`mwm ARGS` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def stem(image: str) -> str:
    return Path(image).stem


def raw(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, path
    return image


def localize(run, out, *extra) -> tuple[int, str, str]:
    """`mwm localize` of PROMPT on every image of the phantom folder with the trained CLIP.

    `--prompts`, not `--prompt`: the phantom manifest's `prompt` column ("brain tumor") wins
    over `--prompt`, and a prompt file entry wins over the manifest (README, the prompt rule)."""
    return cli("localize", run.data, "--prompts", run.prompts, "--out", out, "--model",
               f"local-dir:{run.clip}", *M2IB, *extra)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Phantoms, a CLIP trained on them with the grounding options, and the contrastive
    abstaining localization of PROMPT: built once for the module."""
    root = tmp_path_factory.mktemp("findings_cli")
    data, clip, sal = root / "ph", root / "clip", root / "sal"
    code, _, err = cli("phantoms", data, "--findings", "multi", "--n", N_IMAGES, "--size", SIZE,
                       "--seed", 0, "--workers", 1, "--quiet")
    assert code == 0, err
    code, clip_out, err = cli("clip", "train", data, "--out", clip, *CLIP, *GROUNDING)
    assert code == 0, err
    split = {stem(r["image"]): r["split"] for r in rows(data / "labels.csv")}
    prompts = root / "prompts.json"
    prompts.write_text(json.dumps({name: PROMPT for name in split}))
    findings = rows(data / "findings.csv")
    truth = {stem(r["image"]): r["present"] == "1" for r in findings if r["finding"] == FINDING}
    ns = SimpleNamespace(root=root, data=data, clip=clip, sal=sal, prompts=prompts, split=split,
                         findings=findings, truth=truth, clip_out=clip_out)
    ns.localize = localize(ns, sal, "--objective", "contrastive", "--abstain")
    return ns


def presence(folder: Path) -> dict[str, tuple[float, bool]]:
    return {r["image"]: (float(r["score"]), r["present"] == "1")
            for r in rows(folder / "presence.csv")}


def youden(scores, truth) -> float:
    """The score t maximizing TPR + TNR of "present iff score >= t", lowest on ties."""
    scores, truth = np.asarray(scores), np.asarray(truth, bool)
    n_pos, n_neg = truth.sum(), (~truth).sum()
    best, best_j = None, -1
    for t in np.unique(scores):                         # ascending: strict > keeps the lowest
        j = ((scores >= t) & truth).sum() * n_neg + ((scores < t) & ~truth).sum() * n_pos
        if j > best_j:
            best, best_j = float(t), j
    return best


def auroc(scores, truth) -> float:
    """Mann-Whitney: the fraction of (present, absent) pairs ordered right, ties one half."""
    pos = [s for s, t in zip(scores, truth) if t]
    neg = [s for s, t in zip(scores, truth) if not t]
    won = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return won / (len(pos) * len(neg))


def counts(decided, truth) -> dict:
    pairs = list(zip(decided, truth))
    return {"tp": pairs.count((True, True)), "fp": pairs.count((True, False)),
            "fn": pairs.count((False, True)), "tn": pairs.count((False, False))}


# --------------------------------------------------------------------------- 1. the data

def test_phantoms_write_a_mask_per_finding_and_inspect_reports_them(run):
    data, findings = run.data, run.findings
    names = list(dict.fromkeys(r["finding"] for r in findings))
    assert FINDING in names and "tumor" in names and "skull" in names
    assert len(findings) == N_IMAGES * len(names)             # one row per (image, finding)
    for r in findings:
        mask = data / r["mask"]
        assert r["mask"] == f"masks/{r['finding']}/{stem(r['image'])}.png"
        pixels = raw(mask)
        assert pixels.shape == (SIZE, SIZE) and set(np.unique(pixels)) <= {0, 255}
        assert pixels.any() == (r["present"] == "1"), mask    # empty exactly when absent
    # one caption per present finding of kind finding, none for absent ones or anatomy
    captioned = [(r["image"], r["finding"]) for r in rows(data / "finding_captions.csv")]
    wanted = [(r["image"], r["finding"]) for r in findings
              if r["kind"] == "finding" and r["present"] == "1"]
    assert len(captioned) == len(set(captioned)) and set(captioned) == set(wanted)

    code, out, err = cli("inspect", data, "--out", run.root / "inspect", "--quiet")
    assert code == 0, err
    present = {}
    for r in findings:
        if r["present"] == "1":
            present.setdefault(stem(r["image"]), set()).add(r["finding"])
    table = {r["name"]: set(filter(None, r["findings"].split(";")))
             for r in rows(run.root / "inspect" / "inspect.csv")}
    assert len(table) == N_IMAGES and table == {n: present.get(n, set()) for n in table}
    summary = json.loads((run.root / "inspect" / "inspect_summary.json").read_text())
    kinds = {r["finding"]: r["kind"] for r in findings}
    for name in names:
        have = [n for n in run.split if name in present.get(n, ())]
        by_split = {s: sum(run.split[n] == s for n in have) for s in ("train", "val", "test")}
        by_split = {s: c for s, c in by_split.items() if c}          # zero counts left out
        assert summary["findings"][name] == {"kind": kinds[name], "present": len(have),
                                             "by_split": by_split}
        splits = ", ".join(f"{s} {c}" for s, c in by_split.items())
        assert f"{kinds[name]} {name}: {len(have)} images ({splits})" in out


# --------------------------------------------------------------------------- 2. the CLIP

def test_clip_trains_on_finding_captions_with_the_phrase_loss(run):
    import torch

    data, clip = run.data, run.clip
    train = {n for n, s in run.split.items() if s == "train"}
    captions = [stem(r["image"]) for r in rows(data / "finding_captions.csv")]
    # --captions findings: a pair per present finding's caption of a train image, plus the
    # general caption of every train image without one
    n_pairs = sum(n in train for n in captions) + len(train - set(captions))
    assert f"on {n_pairs} pairs for 2 epochs" in run.clip_out
    manifest = json.loads((clip / "run_manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["results"]["steps"] == 2 * (n_pairs // 8)
    log = rows(clip / "train_log.csv")
    assert [r["epoch"] for r in log] == ["1", "2"]
    assert all(np.isfinite(float(r["loss"])) for r in log)
    state = torch.load(clip / "checkpoint.pt", weights_only=True)
    settings = json.loads(state["settings_json"])
    assert (settings["captions"], settings["swap_negatives"], settings["phrase_weight"]) == (
        "findings", True, 1.0)
    # the phrase loss reads every finding of findings.csv (anatomy included), by its phrase
    phrases = list(dict.fromkeys(r["phrase"] for r in run.findings))
    assert settings["phrases"] == phrases and set(state["phrase_head"]) == {"logit_scale",
                                                                            "logit_bias"}
    assert settings["n_pairs"] == n_pairs
    recommended = json.loads((clip / "m2ib_recommended.json").read_text())
    assert recommended["layer"] == [0, 1]                  # scratch-micro: 2 blocks, token-max


# --------------------------------------------------------------------------- 3. localize

def default_contrast(findings) -> list[str]:
    """docs/presence.md: the modality's normal prompt, then every other finding's phrase."""
    others = [r["phrase"] for r in findings if r["kind"] == "finding" and r["finding"] != FINDING]
    return ["normal brain MRI", *dict.fromkeys(others)]


def test_presence_decisions_follow_the_threshold_calibrated_on_val(run):
    code, out, err = run.localize
    assert code == 0, err
    table, found = presence(run.sal), json.loads((run.sal / "presence.json").read_text())
    assert set(table) == set(run.split) and len(rows(run.sal / "presence.csv")) == N_IMAGES
    assert {r["prompt"] for r in rows(run.sal / "presence.csv")} == {PROMPT}
    threshold = found["threshold"]   # both at full precision: the decision is reproducible
    assert all(score <= 0 for score, _ in table.values())   # a log-softmax
    assert all(present == (score >= threshold) for score, present in table.values())
    n_absent = sum(not present for _, present in table.values())
    assert 0 < n_absent < N_IMAGES
    assert (found["n_images"], found["n_absent"]) == (N_IMAGES, n_absent)
    assert f"presence: {n_absent} of {N_IMAGES} images found absent" in out

    # calibrated on the val split; an image's truth is findings.csv's hemorrhage row, not
    # the manifest's mask (the tumour), which disagrees with it on these val images
    val = sorted(n for n, s in run.split.items() if s == "val")
    truth = [run.truth[n] for n in val]
    tumour = [raw(run.data / "masks" / f"{n}.png").any() for n in val]
    assert truth != tumour and 0 < sum(truth) < len(val)
    scores = [table[n][0] for n in val]
    assert found["source"].startswith("the val split of")
    assert found["threshold"] == pytest.approx(youden(scores, truth), abs=1e-6)
    calibration = found["calibration"]
    assert calibration["n"] == len(val) and calibration["n_present"] == sum(truth)
    assert {k: calibration[k] for k in ("tp", "fp", "fn", "tn")} == counts(
        [s >= threshold for s in scores], truth)
    assert calibration["auroc"] == pytest.approx(auroc(scores, truth), abs=1e-6)

    contrast = {PROMPT: default_contrast(run.findings)}
    assert found["contrast"] == contrast
    m2ib = json.loads((run.sal / "m2ib_config.json").read_text())
    assert m2ib["objective"] == "contrastive" and m2ib["contrast"] == contrast
    assert m2ib["layer"] == [0, 1] and m2ib["beta"] == 0.01    # recommended layers, given beta
    manifest = json.loads((run.sal / "run_manifest.json").read_text())
    assert {"presence.csv", "presence.json"} <= set(manifest["results"]["outputs"])


def test_absent_images_get_empty_regions_and_evaluate_scores_the_decisions(run):
    assert run.localize[0] == 0, run.localize[2]
    regions, scores_dir = run.root / "regions", run.root / "eval"
    table = presence(run.sal)
    absent = {n for n, (_, present) in table.items() if not present}
    code, out, err = cli("postprocess", run.sal, "--out", regions, "--top-k", "1", "--quiet")
    assert code == 0, err
    assert f"wrote {N_IMAGES} region masks" in out and f"{len(absent)} of them empty" in out
    for name in table:
        region, saliency = raw(regions / f"{name}.png"), raw(run.sal / f"{name}.png")
        if name in absent:
            assert not region.any(), name
        elif saliency.any():
            assert region.any(), name
    assert presence(regions) == table                      # the copy evaluate reads

    code, out, err = cli("evaluate", regions, run.data / "masks" / FINDING, "--out", scores_dir,
                         "--quiet")
    assert code == 0, err
    summary = json.loads((scores_dir / "summary.json").read_text())
    assert summary["n_gt"] == N_IMAGES and summary["n_missing"] == 0
    names = sorted(table)
    truth = [run.truth[n] for n in names]                  # findings.csv = the masks (test 1)
    decided = [table[n][1] for n in names]
    scores = [table[n][0] for n in names]
    got = summary["presence"]
    tally = counts(decided, truth)
    assert {k: got[k] for k in tally} == tally
    assert (got["n"], got["n_present"]) == (N_IMAGES, sum(truth))
    assert got["precision"] == pytest.approx(tally["tp"] / (tally["tp"] + tally["fp"]))
    assert got["recall"] == pytest.approx(tally["tp"] / (tally["tp"] + tally["fn"]))
    assert got["balanced_accuracy"] == pytest.approx(
        (tally["tp"] / sum(truth) + tally["tn"] / (N_IMAGES - sum(truth))) / 2)
    assert got["auroc"] == pytest.approx(auroc(scores, truth), abs=1e-9)
    assert f"presence ({N_IMAGES} images): precision {got['precision']:.4f}" in out
    empty_gt = [n for n in names if not run.truth[n]]
    assert summary["empty_regions"]["n_empty_gt"] == len(empty_gt)
    assert summary["empty_regions"]["n_empty_prediction"] == sum(
        not raw(regions / f"{n}.png").any() for n in empty_gt)
    dice = {r["name"]: float(r["dice"]) for r in rows(scores_dir / "per_image.csv")}
    assert all(dice[n] == 1.0 for n in empty_gt if n in absent)   # a correct "nothing here"


def test_an_earlier_presence_json_gives_the_same_decisions(run, tmp_path):
    assert run.localize[0] == 0, run.localize[2]
    given = tmp_path / "presence.json"
    shutil.copy(run.sal / "presence.json", given)
    out_dir = run.root / "sal_reused"
    code, _, err = localize(run, out_dir, "--objective", "contrastive", "--abstain",
                            "--presence-threshold", given)
    assert code == 0, err
    before = json.loads(given.read_text())
    after = json.loads((out_dir / "presence.json").read_text())
    assert after["threshold"] == before["threshold"] and after["source"] == str(given)
    assert after["calibration"] == before["calibration"]   # the record is reused
    assert presence(out_dir) == presence(run.sal)
    for name in run.split:                                  # abstention leaves the maps alone
        assert np.array_equal(raw(out_dir / f"{name}.png"), raw(run.sal / f"{name}.png"))


def differing(a: Path, b: Path, names) -> int:
    return sum(not np.array_equal(raw(a / f"{n}.png"), raw(b / f"{n}.png")) for n in names)


def test_contrastive_maps_differ_from_published_and_follow_the_contrast(run):
    assert run.localize[0] == 0, run.localize[2]
    names = sorted(run.split)
    published = run.root / "sal_published"
    code, _, err = localize(run, published)
    assert code == 0, err
    recorded = json.loads((published / "m2ib_config.json").read_text())
    assert "objective" not in recorded and "contrast" not in recorded   # published: left out
    assert differing(published, run.sal, names) > N_IMAGES // 2

    other = run.root / "sal_other_contrast"
    code, out, err = localize(run, other, "--objective", "contrastive", "--contrast",
                              "normal brain MRI")
    assert code == 0, err
    assert json.loads((other / "m2ib_config.json").read_text())["contrast"] == {
        PROMPT: ["normal brain MRI"]}
    assert differing(other, run.sal, names) > N_IMAGES // 2
    # back to the default contrast in that folder: every map is recomputed (the contrast is
    # in the fingerprint) and equals the first run's, byte for byte
    code, out, err = localize(run, other, "--objective", "contrastive")
    assert code == 0, err
    assert f"{N_IMAGES} saliency maps written, 0 up to date" in out
    assert differing(other, run.sal, names) == 0


# --------------------------------------------------------------------------- calibration data

def write_manifest(path: Path, run, splits) -> list[str]:
    """A CSV manifest of the images of ``splits`` with their hemorrhage masks."""
    chosen = sorted(n for n, s in run.split.items() if s in splits)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "mask", "prompt", "split"])
        for name in chosen:
            writer.writerow([run.data / "images" / f"{name}.png",
                             run.data / "masks" / FINDING / f"{name}.png", PROMPT, run.split[name]])
    return chosen


def test_calibration_never_uses_test_images(run, tmp_path):
    """--tune's images calibrate, those of the test split left out (docs/presence.md); a
    --tune set of test images only leaves nothing to calibrate on: exit 2, nothing written."""
    assert run.localize[0] == 0, run.localize[2]
    mixed = write_manifest(tmp_path / "val_test.csv", run, ("val", "test"))
    n_val = sum(run.split[n] == "val" for n in mixed)
    assert 0 < n_val < len(mixed)
    tuned = run.root / "sal_tuned"
    code, _, err = cli("localize", run.data, "--prompts", run.prompts, "--out", tuned, "--model",
                       f"local-dir:{run.clip}", "--steps", "2", "--samples", "2", "--device",
                       "cpu", "--quiet", "--abstain",
                       "--tune", tmp_path / "val_test.csv", run.data / "masks" / FINDING,
                       "--tune-images", "1")
    assert code == 0, err
    found = json.loads((tuned / "presence.json").read_text())
    assert found["source"].startswith("--tune ") and found["calibration"]["n"] == n_val
    # the same val images, scores and truth (their masks): the val split's threshold
    first = json.loads((run.sal / "presence.json").read_text())
    assert found["threshold"] == pytest.approx(first["threshold"], abs=1e-6)

    write_manifest(tmp_path / "test_only.csv", run, ("test",))
    refused = run.root / "sal_refused"
    code, _, err = cli("localize", run.data, "--prompts", run.prompts, "--out", refused,
                       "--model", f"local-dir:{run.clip}", *M2IB, "--abstain",
                       "--tune", tmp_path / "test_only.csv", run.data / "masks" / FINDING)
    assert code == 2 and "Traceback" not in err
    assert "is in the test split" in err and "never calibrated on test images" in err
    assert not refused.exists() or not list(refused.iterdir())


# --------------------------------------------------------------------------- relative paths

def test_clip_train_on_a_relative_folder_reads_its_findings(run, monkeypatch):
    """The command as docs/clip-training.md writes it (`mwm clip train phantoms/ ...`), run
    from the folder above the dataset: the same pairs as with the absolute path."""
    monkeypatch.chdir(run.root)
    code, out, err = cli("clip", "train", run.data.name, "--out", "clip_relative", *CLIP,
                         *GROUNDING)
    assert code == 0, err
    pairs = re.search(r" on (\d+) pairs ", run.clip_out).group(1)
    assert f" on {pairs} pairs " in out
