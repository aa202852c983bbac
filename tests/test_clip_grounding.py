"""CLIP options that ground finding phrases: per-finding captions, swap-finding negatives,
the multi-label phrase loss (``mwm.clip``)."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")

from mwm.clip import ClipTrainConfig, train_clip  # noqa: E402
from mwm.clip.data import read_findings, read_pairs, swap_finding  # noqa: E402
from mwm.clip.losses import dhn_nce_loss, infonce_loss, phrase_loss  # noqa: E402
from mwm.clip.batches import same_group  # noqa: E402
from mwm.clip.train import CHECKPOINT_NAME, WEIGHTS_NAME, _ClipRun  # noqa: E402
from mwm.errors import DataError  # noqa: E402

TINY = dict(model="scratch-micro", batch_size=8, workers=1, quiet=True, seed=0, amp="none")
FINDINGS = ("tumor", "calcification", "skull")
PHRASES = {"tumor": "brain tumor", "calcification": "calcification", "skull": "skull"}


def _write_csv(path, fields, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """Phantoms with a findings table: the tumour (any lesion label), a calcification on
    every third image, the skull (anatomy) everywhere; one caption per present finding."""
    from mwm.data.phantoms import generate_phantoms

    out = tmp_path_factory.mktemp("multi")
    generate_phantoms(out, modality="brain-mri", n=24, size=64, seed=0, workers=1,
                      progress=False)
    labels = list(csv.DictReader(open(out / "labels.csv", newline="")))
    findings, captions = [], []
    for n, row in enumerate(labels):
        have = {"tumor": row["label"] != "none", "calcification": n % 3 == 0, "skull": True}
        for name in FINDINGS:
            findings.append({"image": row["image"], "finding": name,
                             "kind": "anatomy" if name == "skull" else "finding",
                             "present": int(have[name]), "mask": "", "phrase": PHRASES[name]})
            if have[name]:
                side = "left" if n % 2 else "right"
                captions.append({"image": row["image"], "finding": name,
                                 "caption": f"a {PHRASES[name]} in the {side} hemisphere"})
    _write_csv(out / "findings.csv", ("image", "finding", "kind", "present", "mask", "phrase"),
               findings)
    _write_csv(out / "finding_captions.csv", ("image", "finding", "caption"), captions)
    return out


def _unit(x):
    return torch.nn.functional.normalize(torch.as_tensor(x, dtype=torch.float32), dim=-1)


# --------------------------------------------------------------------------- reading

def test_finding_captions_are_read_with_their_images_findings(multi):
    table = read_findings(multi)
    assert table.names == FINDINGS and table.phrase("tumor") == "brain tumor"
    assert table.kinds == ("finding", "finding", "anatomy")
    general = read_pairs(multi)                                    # train split
    assert all(p.finding is None and p.findings is not None for p in general)
    assert all("skull" in p.findings for p in general)
    per = read_pairs(multi, captions="findings")
    named = [p for p in per if p.finding is not None]
    # one pair per present finding of a train image; lesion-free images keep their
    # general caption (every image has the skull, so every image has a finding caption)
    assert len(named) == sum(len(p.findings) for p in general) and len(per) == len(named)
    assert all(p.caption.startswith(f"a {PHRASES[p.finding]} in the") for p in named)
    assert all(p.finding in p.findings for p in named)
    both = read_pairs(multi, captions="both")
    assert len(both) == len(general) + len(named)
    train_images = {p.image for p in general}
    assert {p.image for p in per} == train_images                  # val/test stay unseen


def test_finding_captions_need_their_files(multi, tmp_path):
    with pytest.raises(DataError, match="finding_captions.csv"):
        read_pairs(multi / "captions.csv", captions="findings")    # a CSV, not a folder
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("captions.csv", "labels.csv", "findings.csv"):
        (bare / name).write_text((multi / name).read_text())
    (bare / "images").symlink_to(multi / "images")
    with pytest.raises(DataError, match="finding_captions.csv: not found"):
        read_pairs(bare, captions="findings")
    (bare / "findings.csv").unlink()
    with pytest.raises(DataError, match="findings.csv"):
        train_clip(ClipTrainConfig(pairs=str(bare), out=str(tmp_path / "o"), phrase_weight=1.0,
                                   **TINY))


# --------------------------------------------------------------------------- losses

def test_extra_negatives_join_only_their_rows_denominator():
    img = _unit([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    txt = _unit([[0.9, 0.1], [0.5, 0.9], [-0.2, 1.0]])
    extra = _unit([[1.0, 0.2], [0.3, 1.0]])
    owner = torch.tensor([0, 2])
    scale = 2.0
    s, h = (scale * img @ txt.T).double().numpy(), (scale * img @ extra.T).double().numpy()
    v2t = [-(s[i, i] - math.log(np.exp(s[i]).sum()
                                + sum(np.exp(h[i, k]) for k in range(2) if owner[k] == i)))
           for i in range(3)]
    t2v = [-(s[i, i] - math.log(np.exp(s[:, i]).sum())) for i in range(3)]
    want = (np.mean(v2t) + np.mean(t2v)) / 2
    got = infonce_loss(img, txt, math.log(scale), extra=extra, owner=owner)
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert got.item() > infonce_loss(img, txt, math.log(scale)).item()
    # DHN-NCE (beta 0: every negative weighs 1): the extra joins N_i of its row only
    tau = 0.5
    s2, h2 = (img @ txt.T / tau).double().numpy(), (img @ extra.T / tau).double().numpy()
    d_v2t = np.mean([-s2[i, i] + math.log(sum(np.exp(s2[i, j]) for j in range(3) if j != i)
                                          + sum(np.exp(h2[i, k]) for k in range(2)
                                                if owner[k] == i)) for i in range(3)])
    d_t2v = np.mean([-s2[i, i] + math.log(sum(np.exp(s2[j, i]) for j in range(3) if j != i))
                     for i in range(3)])
    got = dhn_nce_loss(img, txt, tau, 0.0, 0.0, extra=extra, owner=owner)
    assert got.item() == pytest.approx(d_v2t + d_t2v, rel=1e-5)


def test_phrase_loss_matches_binary_cross_entropy_by_hand():
    img = _unit([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    phrases = _unit([[1.0, 0.0], [0.6, 0.8]])
    present = torch.tensor([[True, False], [False, True], [True, True]])
    a, b = 5.0, -1.0
    z = (a * img @ phrases.T + b).double().numpy()
    y = present.double().numpy()
    bce = -(y * np.log(1 / (1 + np.exp(-z))) + (1 - y) * np.log(1 - 1 / (1 + np.exp(-z))))
    assert phrase_loss(img, phrases, present, math.log(a), b).item() == \
        pytest.approx(bce.mean(), rel=1e-5)
    known = torch.tensor([True, False, True])
    assert phrase_loss(img, phrases, present, math.log(a), b, known).item() == \
        pytest.approx(bce[[0, 2]].mean(), rel=1e-5)
    # patch tokens (B, N, D): the best token's similarity counts
    tokens = torch.stack([img, _unit([[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])], dim=1)
    best = torch.maximum(img @ phrases.T, tokens[:, 1] @ phrases.T).double().numpy()
    zt = a * best + b
    bce_t = -(y * np.log(1 / (1 + np.exp(-zt))) + (1 - y) * np.log(1 - 1 / (1 + np.exp(-zt))))
    assert phrase_loss(tokens, phrases, present, math.log(a), b).item() == \
        pytest.approx(bce_t.mean(), rel=1e-5)
    none = phrase_loss(img, phrases, present, torch.tensor(math.log(a), requires_grad=True),
                       b, torch.zeros(3, dtype=torch.bool))
    assert none.item() == 0.0 and none.requires_grad


# --------------------------------------------------------------------------- batches

def test_swap_negatives_name_an_absent_finding_of_their_own_image(multi, tmp_path):
    run = _ClipRun(ClipTrainConfig(pairs=str(multi), out=str(tmp_path / "o"),
                                   captions="findings", swap_negatives=True, **TINY))
    rows = list(range(len(run.data)))
    captions = [p.caption for p in run.data]
    extra, owner = run._swap_negatives(rows, captions, torch.Generator().manual_seed(0))
    assert extra and len(extra) == len(owner)
    with_absent = [r for r in rows if set(FINDINGS) - set(run.data[r].findings)]
    assert sorted(owner) == with_absent      # one per pair whose image lacks a finding
    for text, row in zip(extra, owner):
        pair = run.data[row]
        absent = [n for n in FINDINGS if n not in pair.findings]
        # its own sentence with the finding's phrase swapped for an absent one
        swapped = [swap_finding(pair.caption, PHRASES[pair.finding], PHRASES[n]) for n in absent]
        assert text in swapped and text != pair.caption
    assert swap_finding("Brain  Tumor on the left", "brain tumor", "skull") == "skull on the left"


def test_same_image_pairs_and_normal_groups_with_findings(multi, tmp_path):
    from mwm.clip.batches import same_image

    run = _ClipRun(ClipTrainConfig(pairs=str(multi), out=str(tmp_path / "o"),
                                   captions="both", **TINY))
    data = run.data
    image = data[0].image
    rows = [i for i, p in enumerate(data) if p.image == image][:2]
    other = next(i for i, p in enumerate(data) if p.image != image)
    same = same_image(data, rows + [other], "cpu")
    assert same.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    # "normal": general captions of images whose only present finding is anatomy
    normal = [i for i, p in enumerate(data) if p.finding is None and p.findings == ("skull",)]
    sick = [i for i, p in enumerate(data) if p.finding is None and "tumor" in p.findings]
    groups = same_group(data, normal[:2] + sick[:1], "normal", "cpu", run.table)
    assert groups[0, 1] and not groups[0, 2] and not groups[1, 2]


# --------------------------------------------------------------------------- training

def test_options_change_the_loss_and_resume_repeats_the_run(multi, tmp_path):
    options = dict(captions="findings", swap_negatives=True, phrase_weight=1.0,
                   phrase_embedding="pooled+tokens")
    base = train_clip(ClipTrainConfig(pairs=str(multi), out=str(tmp_path / "base"),
                                      captions="findings", epochs=1, **TINY))
    full = train_clip(ClipTrainConfig(pairs=str(multi), out=str(tmp_path / "full"), epochs=2,
                                      **options, **TINY))
    assert full.n_pairs == base.n_pairs and np.isfinite(full.final_loss)
    # same data and batches, more terms: a larger first-epoch loss
    assert full.log[0]["loss"] > base.log[0]["loss"]
    state = torch.load(tmp_path / "full" / CHECKPOINT_NAME, weights_only=True)
    assert set(state["phrase_head"]) == {"logit_scale", "logit_bias"}
    assert '"phrases": ["brain tumor", "calcification", "skull"]' in state["settings_json"]

    part = tmp_path / "part"
    first = train_clip(ClipTrainConfig(pairs=str(multi), out=str(part), epochs=2,
                                       time_limit=0.0, **options, **TINY))
    assert first.stopped_early
    second = train_clip(ClipTrainConfig(pairs=str(multi), out=str(part), epochs=2,
                                        **options, **TINY))
    assert second.start_epoch == 1
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "full" / WEIGHTS_NAME), load_file(part / WEIGHTS_NAME)
    assert all(torch.equal(a[k], b[k]) for k in a)
    head_a = torch.load(tmp_path / "full" / CHECKPOINT_NAME, weights_only=True)["phrase_head"]
    head_b = torch.load(part / CHECKPOINT_NAME, weights_only=True)["phrase_head"]
    assert all(torch.equal(head_a[k], head_b[k]) for k in head_a)
    with pytest.raises(DataError, match="other settings"):
        train_clip(ClipTrainConfig(pairs=str(multi), out=str(part), epochs=2,
                                   captions="findings", **TINY))
