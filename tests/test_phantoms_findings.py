"""Multi-finding phantoms (findings="multi"): per-finding masks, pixels, captions, files."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from mwm.data.findings import (FINDING_CAPTION_COLUMNS, FINDINGS, FINDINGS_COLUMNS, MAX_EXTRA,
                               bare, presence_rates)
from mwm.data.inspect import inspect_dataset
from mwm.data.phantoms import (CLASSES, MODALITIES, PhantomConfig, _render, generate_phantoms,
                               render_phantom)

SIZE = 64
N = 16
SEED = 2


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _read(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None, path
    return img


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _lesions(modality: str) -> list:
    return [f for f in FINDINGS[modality] if f.kind == "finding"]


def _extras(modality: str) -> list[str]:
    return [f.name for f in FINDINGS[modality] if f.extra]


def _says(text: str, words) -> bool:
    return any(re.search(r"\b" + re.escape(w) + r"\b", text) for w in words)


def _positive_part(caption: str, modality: str) -> str:
    """The caption without its negations ("no hemorrhage"), lower case."""
    text = caption.lower()
    negations = sorted({n for f in FINDINGS[modality] for n in f.negations}, key=len, reverse=True)
    for n in negations:
        text = re.sub(r"\b" + re.escape(n) + r"\b", " ", text)
    return text


@pytest.fixture(scope="module")
def brain(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("multi")
    generate_phantoms(d, "brain-mri", n=N, size=SIZE, seed=SEED, workers=1, progress=False,
                      findings="multi")
    return d


# --------------------------------------------------------------------------- single is untouched


def test_single_is_the_default_and_multi_keeps_the_single_files(tmp_path):
    default, single, multi = tmp_path / "default", tmp_path / "single", tmp_path / "multi"
    generate_phantoms(default, "chest-xray", n=N, size=SIZE, seed=SEED, workers=1,
                      progress=False)
    generate_phantoms(single, "chest-xray", n=N, size=SIZE, seed=SEED, workers=1,
                      progress=False, findings="single")
    assert _files(default) == _files(single)
    assert not (single / "findings.csv").exists() and not (single / "masks" / "nodule").exists()
    generate_phantoms(multi, "chest-xray", n=N, size=SIZE, seed=SEED, workers=1,
                      progress=False, findings="multi")
    fs, fm = _files(single), _files(multi)
    # the class lesion's files are the single ones: union masks, labels, COCO, splits
    for name in ("labels.csv", "prompts.json", "splits.json", "instances.json"):
        assert fm[name] == fs[name], name
    for i in range(N):
        assert fm[f"masks/chest-xray_{i:05d}.png"] == fs[f"masks/chest-xray_{i:05d}.png"]
    changed = [i for i in range(N) if fm[f"images/chest-xray_{i:05d}.png"]
               != fs[f"images/chest-xray_{i:05d}.png"]]
    assert 0 < len(changed) < N    # extra findings in some images, none in others
    for mod in MODALITIES:
        a, b = render_phantom(mod, SIZE, 4, 3), render_phantom(mod, SIZE, 4, 3, findings="single")
        assert np.array_equal(a.image, b.image) and a.caption == b.caption
        assert not b.finding_masks and not b.finding_captions


def test_bad_findings_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="single, multi"):
        generate_phantoms(tmp_path, n=2, size=32, progress=False, findings="many")
    with pytest.raises(ValueError, match="single, multi"):
        render_phantom("brain-mri", 32, 0, 0, findings="")
    assert not (tmp_path / "labels.csv").exists()
    field = PhantomConfig.__dataclass_fields__["findings"]
    assert field.default == "single" and tuple(field.metadata["choices"]) == ("single", "multi")


# --------------------------------------------------------------------------- pixels and masks


@pytest.mark.parametrize("modality", MODALITIES)
def test_each_finding_changes_pixels_only_inside_its_mask(modality):
    placed = 0
    for index in range(6):
        single = _render(modality, SIZE, SEED, index, 8)
        multi = _render(modality, SIZE, SEED, index, 8, findings="multi")
        assert multi.label == single.label
        assert np.array_equal(multi.mask, single.mask)        # the class lesion stays
        extra = np.zeros((SIZE, SIZE), bool)
        owner = [f.name for f in FINDINGS[modality] if multi.label in f.classes]
        for name in _extras(modality):
            if name not in owner:
                extra |= multi.finding_masks[name]
        assert not ((multi.image != single.image) & ~extra).any(), index
        none = _render(modality, SIZE, SEED, index, 8, findings="multi", extras=())
        assert np.array_equal(none.image, single.image)
        for name in _extras(modality):
            one = _render(modality, SIZE, SEED, index, 8, findings="multi", extras=(name,))
            diff = one.image != none.image
            mask = one.finding_masks[name]
            assert not (diff & ~mask).any(), (index, name)
            if mask.any() and name not in owner:
                assert diff.sum() >= 0.3 * mask.sum(), (index, name)   # it is visible
                placed += 1
    assert placed >= 6


@pytest.mark.parametrize("modality", MODALITIES)
def test_findings_never_overlap_and_follow_the_class(modality):
    names = [f.name for f in _lesions(modality)]
    extras_seen = 0
    for index in range(24):
        ph = _render(modality, SIZE, 7, index, 8, findings="multi")
        masks = ph.finding_masks
        assert set(masks) == {f.name for f in FINDINGS[modality]}
        for a in range(len(names)):
            for b in range(a + 1, len(names)):
                assert not (masks[names[a]] & masks[names[b]]).any(), (index, names[a], names[b])
        owner = [f.name for f in FINDINGS[modality] if ph.label in f.classes]
        if owner:
            assert np.array_equal(masks[owner[0]], ph.mask > 0)
        else:
            assert ph.label == "none"
        extra = [n for n in _extras(modality) if masks[n].any() and n not in owner]
        assert len(extra) <= MAX_EXTRA
        extras_seen += len(extra)
        for f in FINDINGS[modality]:
            if f.kind == "anatomy":
                assert masks[f.name].any(), (index, f.name)
    assert extras_seen >= 12


def test_enlarged_ventricles_are_the_ventricles_and_larger():
    sizes = {}
    for forced in ((), ("enlarged-ventricles",)):
        sizes[forced] = []
        for index in range(10):
            ph = _render("brain-mri", SIZE, 1, index, 8, label="none", findings="multi",
                         extras=forced)
            if forced:
                assert np.array_equal(ph.finding_masks["enlarged-ventricles"],
                                      ph.finding_masks["ventricles"])
            sizes[forced].append(int(ph.finding_masks["ventricles"].sum()))
    # larger than the normal ventricles of the same image, and than any normal ones seen
    assert all(big > 1.3 * small for big, small in zip(sizes[("enlarged-ventricles",)], sizes[()]))
    assert min(sizes[("enlarged-ventricles",)]) > max(sizes[()])


def test_presence_rates_match_the_rule():
    n = 160
    for modality in ("brain-mri", "chest-xray"):
        seen = dict.fromkeys((f.name for f in FINDINGS[modality]), 0)
        for index in range(n):
            ph = _render(modality, 48, 5, index, 8, findings="multi")
            for name, present in ph.present.items():
                seen[name] += present
        expected = presence_rates(modality, CLASSES[modality])
        for name, count in seen.items():
            assert abs(count / n - expected[name]) < 0.12, (modality, name, count / n)


def test_sixteen_bit_multi_matches_eight_bit():
    a = render_phantom("brain-mri", SIZE, 3, 1, findings="multi")
    b = render_phantom("brain-mri", SIZE, 3, 1, bit_depth=16, findings="multi")
    assert b.image.dtype == np.uint16 and np.abs(b.image / 257.0 - a.image).max() <= 1.0
    assert a.caption == b.caption and a.finding_captions == b.finding_captions
    assert all(np.array_equal(a.finding_masks[k], b.finding_masks[k]) for k in a.finding_masks)


# --------------------------------------------------------------------------- files


def test_multi_files(brain):
    labels = _rows(brain / "labels.csv")
    rows = _rows(brain / "findings.csv")
    defs = FINDINGS["brain-mri"]
    assert list(rows[0]) == list(FINDINGS_COLUMNS)
    assert len(rows) == N * len(defs)
    by_image = {}
    for r in rows:
        by_image.setdefault(r["image"], {})[r["finding"]] = r
    assert list(by_image) == [r["image"] for r in labels]
    for lab in labels:
        stem = Path(lab["image"]).stem
        entries = by_image[lab["image"]]
        assert list(entries) == [f.name for f in defs]
        for f in defs:
            r = entries[f.name]
            assert r["kind"] == f.kind and r["phrase"] == f.phrase
            assert r["mask"] == f"masks/{f.name}/{stem}.png"
            mask = _read(brain / r["mask"])
            assert mask.dtype == np.uint8 and mask.shape == (SIZE, SIZE)
            assert set(np.unique(mask)) <= {0, 255}
            assert (r["present"] == "1") == bool(mask.any()), (stem, f.name)
        assert entries["tumor"]["present"] == ("0" if lab["label"] == "none" else "1")
        assert _read(brain / entries["tumor"]["mask"]).tobytes() == _read(brain / lab["mask"]).tobytes()
        assert entries["ventricles"]["present"] == entries["skull"]["present"] == "1"
    meta = json.loads((brain / "dataset.json").read_text())
    section = meta["findings"]
    assert [d["name"] for d in section["definitions"]] == [f.name for f in defs]
    for d, f in zip(section["definitions"], defs):
        assert d["phrase"] == f.phrase and d["synonyms"] == list(f.synonyms)
        assert d["present"] == sum(r["present"] == "1" for r in rows if r["finding"] == f.name)
        assert sum(d["present_by_split"].values()) == d["present"]
        assert 0 <= d["expected_rate"] <= 1
    assert meta["files"]["findings"] == "findings.csv"
    extra_counts = [sum(by_image[img][n]["present"] == "1" for n in _extras("brain-mri"))
                    for img in by_image]
    assert max(extra_counts) <= MAX_EXTRA and sum(extra_counts) > 0


def test_generation_is_deterministic(brain, tmp_path):
    again = tmp_path / "again"
    generate_phantoms(again, "brain-mri", n=N, size=SIZE, seed=SEED, workers=2, progress=False,
                      findings="multi")
    assert _files(again) == _files(brain)
    fewer = tmp_path / "fewer"
    generate_phantoms(fewer, "brain-mri", n=5, size=SIZE, seed=SEED, workers=1, progress=False,
                      findings="multi")
    ff, fb = _files(fewer), _files(brain)
    for name in ff:
        if name.startswith(("images/", "masks/")):
            assert ff[name] == fb[name], name
    caps = {r["image"]: r["caption"] for r in _rows(brain / "captions.csv")}
    assert all(caps[r["image"]] == r["caption"] for r in _rows(fewer / "captions.csv"))


def test_switching_modes_leaves_no_stale_finding_files(tmp_path):
    generate_phantoms(tmp_path, "brain-mri", n=6, size=32, seed=0, workers=1, progress=False,
                      findings="multi")
    generate_phantoms(tmp_path, "brain-mri", n=4, size=32, seed=0, workers=1, progress=False,
                      findings="multi")
    for f in FINDINGS["brain-mri"]:
        assert len(list((tmp_path / "masks" / f.name).glob("*.png"))) == 4
    generate_phantoms(tmp_path, "brain-mri", n=4, size=32, seed=0, workers=1, progress=False)
    assert not (tmp_path / "findings.csv").exists()
    assert not (tmp_path / "finding_captions.csv").exists()
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == \
        [f"brain-mri_{i:05d}.png" for i in range(4)]
    assert "findings" not in json.loads((tmp_path / "dataset.json").read_text())


# --------------------------------------------------------------------------- captions


def test_captions_vary_and_name_some_present_findings(brain):
    caps = {r["image"]: r["caption"] for r in _rows(brain / "captions.csv")}
    assert len(set(caps.values())) >= 0.75 * N
    for modality in MODALITIES:
        omitted = negated = 0
        for index in range(30):
            ph = _render(modality, 48, 9, index, 8, findings="multi")
            text = _positive_part(ph.caption, modality)
            here = [f for f in _lesions(modality) if ph.present[f.name]]
            named = [f for f in here if _says(text, f.words())]
            for f in _lesions(modality):
                if not ph.present[f.name]:
                    assert not _says(text, f.words()), (ph.caption, f.name)
            if here:
                assert named, ph.caption
            omitted += len(named) < len(here)
            negated += text != ph.caption.lower()
        assert omitted > 0 and negated > 0, modality


def test_finding_captions_name_their_finding_only(brain):
    findings = {(r["image"], r["finding"]): r for r in _rows(brain / "findings.csv")}
    rows = _rows(brain / "finding_captions.csv")
    assert list(rows[0]) == list(FINDING_CAPTION_COLUMNS)
    lesions = {f.name: f for f in _lesions("brain-mri")}
    wanted = {key for key, r in findings.items() if r["present"] == "1" and r["finding"] in lesions}
    assert {(r["image"], r["finding"]) for r in rows} == wanted
    for r in rows:
        text = r["caption"].lower()
        assert _says(text, lesions[r["finding"]].words()), r
        for other, f in lesions.items():
            if other != r["finding"]:
                assert not _says(text, f.words()), (r, other)
    assert len({r["caption"] for r in rows}) >= 0.6 * len(rows)
    # the tumour sometimes by its class word ("glioma"), sometimes generically
    labels = {r["image"]: r["label"] for r in _rows(brain / "labels.csv")}
    tumor = lesions["tumor"]
    by_class = [any(bare(w) in r["caption"].lower() for w in tumor.class_words[labels[r["image"]]])
                for r in rows if r["finding"] == "tumor"]
    more = [_render("brain-mri", 48, 9, i, 8, findings="multi") for i in range(20)]
    by_class += [any(bare(w) in ph.finding_captions["tumor"].lower()
                     for w in tumor.class_words[ph.label]) for ph in more if ph.label != "none"]
    assert any(by_class) and not all(by_class)


def test_words_name_one_finding_each():
    for modality in MODALITIES:
        lesions = _lesions(modality)
        for f in lesions:
            for g in lesions:
                if g is not f:
                    assert not any(_says(w, g.words()) for w in f.words()), (f.name, g.name)


# --------------------------------------------------------------------------- inspect


def test_inspect_counts_findings_and_finds_bad_masks(brain, tmp_path):
    report = inspect_dataset(brain, progress=False)
    assert not report.failures
    rows = _rows(brain / "findings.csv")
    splits = {r["image"]: r["split"] for r in _rows(brain / "labels.csv")}
    counts = report.summary()["findings"]
    for f in FINDINGS["brain-mri"]:
        present = [r for r in rows if r["finding"] == f.name and r["present"] == "1"]
        assert counts[f.name]["present"] == len(present) and counts[f.name]["kind"] == f.kind
        for split, k in counts[f.name]["by_split"].items():
            assert k == sum(splits[r["image"]] == split for r in present)
    assert "finding hemorrhage:" in report.text() and "anatomy skull:" in report.text()
    row = report.rows[0]
    assert set(row["findings"].split(";")) == {r["finding"] for r in rows
                                               if r["image"].endswith(row["name"] + ".png")
                                               and r["present"] == "1"}
    # break a copy: one mask missing, one absent finding with pixels
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(brain, bad)
    absent = next(r for r in rows if r["present"] == "0")
    lost = next(r for r in rows if r["present"] == "1" and r["image"] != absent["image"])
    cv2.imwrite(str(bad / absent["mask"]), np.full((SIZE, SIZE), 255, np.uint8))
    (bad / lost["mask"]).unlink()
    report = inspect_dataset(bad, progress=False)
    errors = " ".join(r["error"] for r in report.failures)
    assert len(report.failures) == 2
    assert absent["mask"] in errors and "not empty" in errors
    assert lost["mask"] in errors and "missing" in errors
