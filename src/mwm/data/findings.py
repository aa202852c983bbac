"""Findings of multi-finding phantoms (``generate_phantoms(..., findings="multi")``).

A multi-finding phantom is the single-finding sample of the same ``(modality, seed,
index)`` (same anatomy, class lesion, acquisition) with other findings added, each drawn
from random streams of its own and present or absent independently, plus named anatomy.
Every finding has its own mask, a canonical phrase that prompts for it and the synonyms
captions use, so that "does the prompt choose where the saliency goes" can be measured:
prompt with one finding's phrase, score the saliency against that finding's mask.

This module is the one home of those definitions (:data:`FINDINGS`) and draws the
findings of one sample (:func:`draw_findings`); ``docs/phantoms.md`` describes them.

Pixels: the added findings change the image only inside their own masks. They are painted
on a copy of the canonical image, warped like it, and copied into the single-finding
image only inside their (final-frame) masks; acquisition (bias, gain, noise) acts pixel
by pixel with its own stream, so every other pixel keeps its single-finding value.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import cv2
import numpy as np

from . import anatomy as _anat

FINDING_MODES = ("single", "multi")
KINDS = ("finding", "anatomy")
#: chance that each extra finding is drawn for an image ...
PRESENCE_PROBABILITY = 0.5
#: ... of which at most this many are kept (chosen at random when more are drawn)
MAX_EXTRA = 2
#: tries to place an extra finding before it is left out of the image
PLACEMENT_TRIES = 3
#: findings.csv: one row per (image, finding); finding_captions.csv: one per present finding
#: The multi-finding tables of a phantom folder (their one spelling).
FINDINGS_FILE, FINDING_CAPTIONS_FILE = "findings.csv", "finding_captions.csv"
FINDINGS_COLUMNS = ("image", "finding", "kind", "present", "mask", "phrase")
FINDING_CAPTION_COLUMNS = ("image", "finding", "caption")


@dataclass(frozen=True)
class Finding:
    """One named finding or anatomical structure of a modality."""

    name: str                          # folder name under masks/, row key in findings.csv
    kind: str                          # "finding" or "anatomy"
    phrase: str                        # the canonical prompt for it
    synonyms: tuple[str, ...]          # what captions call it (first: the phrase)
    negations: tuple[str, ...] = ()    # how captions say it is absent
    classes: tuple[str, ...] = ()      # class labels whose lesion is this finding
    extra: bool = False                # drawn on its own, with PRESENCE_PROBABILITY
    organ: str = ""                    # anatomy: the key of Anatomy.organs it shows
    replaces: str = ""                 # extra finding: the anatomy whose outline it redraws
    hidden: bool = True                # anatomy: findings drawn over it are left out of it
    look: str = ""                     # one line for dataset.json and the docs
    class_words: dict = field(default_factory=dict, compare=False)  # label -> class words
    plurals: tuple[str, ...] = ()      # for two lesions of the class (pairs)

    def words(self) -> tuple[str, ...]:
        """Every phrase captions may name it by, without articles (for matching)."""
        named = self.synonyms + self.plurals + sum(self.class_words.values(), ())
        return tuple(dict.fromkeys(bare(w) for w in named))


def bare(words: str) -> str:
    """``words`` without a leading article."""
    for article in ("a ", "an "):
        if words.startswith(article):
            return words[len(article):]
    return words


_TUMOR_WORDS = {
    "glioma": ("a glioma", "a high-grade glioma", "a glial tumor"),
    "meningioma": ("a meningioma", "an extra-axial meningioma", "a dural-based meningioma"),
    "pituitary": ("a pituitary adenoma", "a pituitary macroadenoma", "a sellar mass"),
}

_BRAIN = (
    Finding("tumor", "finding", "brain tumor",
            ("a brain tumor", "a tumor", "an intracranial mass", "an enhancing mass",
             "a mass lesion", "a brain neoplasm"),
            ("no mass lesion", "no intracranial mass", "no tumor"),
            classes=("glioma", "meningioma", "pituitary"), class_words=_TUMOR_WORDS,
            plurals=("two brain tumors", "multiple intracranial masses",
                     "two enhancing masses"),
            look="the class lesion (glioma, meningioma or pituitary adenoma)"),
    Finding("enlarged-ventricles", "finding", "enlarged ventricles",
            ("enlarged ventricles", "ventriculomegaly", "dilated lateral ventricles",
             "enlarged lateral ventricles", "hydrocephalus"),
            ("ventricles normal in size", "no ventriculomegaly", "no hydrocephalus"),
            extra=True, replaces="ventricles",
            look="the lateral ventricles redrawn larger and wider than any normal ones "
                 "(CSF-dark, a thin septum between the horns); mask = the ventricles"),
    Finding("calcification", "finding", "calcification",
            ("calcification", "calcifications", "calcified foci", "punctate calcifications",
             "a cluster of calcified foci", "calcific foci"),
            ("no calcification", "no calcified foci"),
            extra=True,
            look="3-6 tiny very bright dots clustered in the deep parenchyma; mask = the "
                 "cluster's convex hull grown by about a pixel"),
    Finding("hemorrhage", "finding", "intracranial hemorrhage",
            ("intracranial hemorrhage", "hemorrhage", "haemorrhage", "a bleed",
             "an intraparenchymal hematoma", "a hematoma", "a parenchymal bleed"),
            ("no hemorrhage", "no haemorrhage", "no intracranial bleed"),
            extra=True,
            look="a smooth homogeneous bright ovoid with a thin dark rim in the deep "
                 "parenchyma (a subacute hematoma on T1), 0.8-1.8 % of the image"),
    Finding("ventricles", "anatomy", "lateral ventricles",
            ("lateral ventricles", "ventricles", "ventricular system"), organ="ventricles",
            look="the lateral ventricles (the enlarged ones where enlarged-ventricles is "
                 "present), less any lesion drawn over them"),
    Finding("skull", "anatomy", "skull", ("skull", "calvarium", "skull vault"),
            organ="skull", look="the skull's bone ring (outer and inner tables, diploe)"),
)


def _chest(ct: bool) -> tuple[Finding, ...]:
    third = Finding(
        "ground-glass", "finding", "ground-glass opacity",
        ("a ground-glass opacity", "ground-glass attenuation", "ground-glass opacification",
         "a hazy ground-glass opacity", "ground-glass change"),
        ("no ground-glass opacity", "no ground-glass change"),
        classes=("ground-glass",), extra=True,
        plurals=("multifocal ground-glass opacities", "two ground-glass opacities"),
        look="the ground-glass class lesion: a large faint hazy area inside a lung") if ct \
        else Finding(
        "consolidation", "finding", "consolidation",
        ("consolidation", "airspace consolidation", "an airspace opacity", "pneumonia",
         "airspace disease"),
        ("no consolidation", "no focal airspace disease"),
        classes=("consolidation",), extra=True,
        plurals=("multifocal consolidation", "patchy consolidations"),
        look="the consolidation class lesion: a large patchy opacity with air "
             "bronchograms in the lower part of a lung")
    nodule_look = ("the nodule class lesion: a small round solid nodule inside a lung" if ct
                   else "the nodule class lesion: a small round well-defined opacity in a lung")
    mass_look = ("the mass class lesion: a lobulated spiculated mass inside a lung" if ct
                 else "the mass class lesion: a large dense round opacity in an upper lung")
    return (
        Finding("nodule", "finding", "lung nodule",
                ("a lung nodule", "a pulmonary nodule", "a solid nodule",
                 "a nodular opacity"),
                ("no nodule", "no pulmonary nodule"), classes=("nodule",), extra=True,
                plurals=("two lung nodules", "multiple pulmonary nodules"),
                look=nodule_look),
        Finding("mass", "finding", "lung mass",
                ("a lung mass", "a pulmonary mass", "a spiculated mass" if ct
                 else "a dense mass"),
                ("no mass", "no lung mass"), classes=("mass",), look=mass_look),
        third,
        Finding("lungs", "anatomy", "lungs", ("lungs", "both lungs", "lung fields"),
                organ="lung", hidden=False, look="both lungs (lesions inside them included)"),
    )


FINDINGS: dict[str, tuple[Finding, ...]] = {
    "brain-mri": _BRAIN,
    "chest-ct": _chest(True),
    "chest-xray": _chest(False),
}


def finding_names(modality: str) -> list[str]:
    return [f.name for f in FINDINGS[modality]]


def class_finding(modality: str, label: str) -> Finding | None:
    """The finding that the class lesion ``label`` is (None for ``none``)."""
    return next((f for f in FINDINGS[modality] if label in f.classes), None)


def check_findings(findings: str) -> str:
    if findings not in FINDING_MODES:
        raise ValueError(f"findings must be one of {', '.join(FINDING_MODES)}, got {findings!r}")
    return findings


# --------------------------------------------------------------------------- presence


def choose_extras(rng: np.random.Generator, modality: str, label: str) -> list[str]:
    """The extra findings of one image: each drawn with PRESENCE_PROBABILITY, at most
    MAX_EXTRA kept (in a random order), none that the class lesion already is."""
    extra = [f for f in FINDINGS[modality] if f.extra]
    drawn = rng.random(len(extra)) < PRESENCE_PROBABILITY   # always both draws: fixed use
    order = rng.permutation(len(extra))
    keep = [extra[i].name for i in order if drawn[i] and label not in extra[i].classes]
    return sorted(keep[:MAX_EXTRA], key=[f.name for f in extra].index)


def presence_rates(modality: str, classes: tuple[str, ...]) -> dict[str, float]:
    """Expected fraction of images with each finding (classes drawn uniformly)."""
    defs = FINDINGS[modality]
    extra = [f for f in defs if f.extra]
    p = PRESENCE_PROBABILITY
    rates = dict.fromkeys((f.name for f in defs), 0.0)
    for label in classes:
        eligible = [f for f in extra if label not in f.classes]
        for pattern in itertools.product((0, 1), repeat=len(eligible)):
            c = sum(pattern)
            if not c:
                continue
            chance = p ** c * (1 - p) ** (len(eligible) - c) * min(1.0, MAX_EXTRA / c)
            for f, on in zip(eligible, pattern):
                rates[f.name] += on * chance / len(classes)
        owner = class_finding(modality, label)
        if owner is not None:
            rates[owner.name] += 1.0 / len(classes)
    for f in defs:
        if f.kind == "anatomy":
            rates[f.name] = 1.0
    return {k: round(v, 4) for k, v in rates.items()}


# --------------------------------------------------------------------------- drawing


@dataclass
class FindingMaps:
    """Every finding of one sample, in the final frame."""

    masks: dict[str, np.ndarray]                      # name -> bool (S, S); empty when absent
    centers: dict[str, list[tuple[float, float]]]     # canonical (u, v) of present findings
    image: np.ndarray                                 # float32 (S, S), before acquisition

    def present(self, name: str) -> bool:
        return bool(self.masks[name].any())


def warp_mask(mask: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """A canonical-frame mask in the final frame (the lesion masks' rule: >= 0.5)."""
    return cv2.warpAffine(mask.astype(np.float32), matrix, (size, size),
                          flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0.0) >= 0.5


def _grow(mask: np.ndarray) -> np.ndarray:
    return cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)


def draw_findings(modality: str, anat, label: str, lesions: list, class_masks: list[np.ndarray],
                  class_centers: list, canonical: np.ndarray, matrix: np.ndarray,
                  image: np.ndarray, presence_rng: np.random.Generator,
                  draw_rngs: dict[str, np.random.Generator],
                  extras: list[str] | tuple[str, ...] | None = None) -> FindingMaps:
    """Add the extra findings to one sample and give every finding's mask.

    ``lesions``/``class_masks``/``class_centers``: the class lesion (canonical Lesion
    objects, final-frame masks, canonical centres of those); ``canonical``: the canonical
    image with the class lesion; ``image``: its warp (the single-finding image before
    acquisition); ``draw_rngs``: one stream per finding name. ``extras`` forces which
    extra findings to draw (None: :func:`choose_extras` from ``presence_rng``).
    """
    size = image.shape[0]
    defs = FINDINGS[modality]
    chosen = choose_extras(presence_rng, modality, label) if extras is None else list(extras)
    unknown = set(chosen) - {f.name for f in defs if f.extra}
    if unknown:
        raise ValueError(f"not extra findings of {modality}: {', '.join(sorted(unknown))}")
    owner = class_finding(modality, label)
    if owner is not None:  # the class lesion already is that finding
        chosen = [name for name in chosen if name != owner.name]
    masks = {f.name: np.zeros((size, size), bool) for f in defs}
    centers: dict[str, list[tuple[float, float]]] = {}
    claimed = np.zeros((size, size), bool)               # final pixels some finding holds
    for m in class_masks:
        claimed |= m
    if owner is not None:
        masks[owner.name] = claimed.copy()
        centers[owner.name] = list(class_centers)
    taken = _grow(np.logical_or.reduce([les.mask for les in lesions])) if lesions \
        else np.zeros((size, size), bool)
    placed, painted, drawn = list(lesions), canonical, []
    for f in (f for f in defs if f.extra and f.name in chosen):
        rng = draw_rngs[f.name]
        least = max(_anat.finding_min_fraction(modality, f.name) * size * size, 1.0)
        for _ in range(PLACEMENT_TRIES):
            trial = painted.copy()
            les = _anat.draw_finding(rng, modality, f.name, trial, anat, size, placed, taken)
            if les is None:
                continue
            final = warp_mask(les.mask, matrix, size) & ~claimed
            if final.sum() >= least:
                painted, masks[f.name], centers[f.name] = trial, final, [les.center]
                drawn.append(f.name)
                claimed |= final
                taken |= _grow(les.mask)
                placed.append(les)
                break
    if drawn:  # the single-finding pixels everywhere else, bit for bit
        changed = np.logical_or.reduce([masks[name] for name in drawn])
        warped = cv2.warpAffine(painted, matrix, (size, size), flags=cv2.INTER_LINEAR,
                                borderMode=anat.border, borderValue=anat.border_value)
        image = np.where(changed, warped, image)
    for f in (f for f in defs if f.kind == "anatomy"):
        outline = next((g.name for g in defs if g.replaces == f.name and g.name in drawn), None)
        if outline is not None:
            masks[f.name] = masks[outline].copy()
            continue
        m = warp_mask(anat.organs[f.organ], matrix, size)
        masks[f.name] = m & ~claimed if f.hidden else m
    return FindingMaps(masks, centers, image)
