"""Captions of phantom images: varied radiology-style sentences naming the finding, its
appearance and where it lies (from the anatomy), so that a caption is a description, not
a key of its image. :func:`phantom_caption` draws one from the image's text stream."""

from __future__ import annotations

from typing import Sequence

import numpy as np

_MODALITY_WORDS = {
    "brain-mri": ["Axial T1-weighted brain MRI", "Axial contrast-enhanced T1 MRI of the brain",
                  "Post-contrast axial brain MRI", "Axial MR image of the brain"],
    "chest-ct": ["Axial chest CT", "Axial CT image of the chest", "Contrast-enhanced chest CT",
                 "Axial computed tomography of the thorax"],
    "chest-xray": ["Frontal chest radiograph", "PA chest X-ray", "Posteroanterior chest radiograph",
                   "Frontal chest X-ray"],
}
_NONE = {
    "brain-mri": ["Axial T1-weighted brain MRI without focal lesion.",
                  "Brain MRI with no mass or abnormal enhancement.",
                  "Normal axial brain MRI; ventricles and midline structures are unremarkable.",
                  "Unremarkable axial MR image of the brain, no focal abnormality."],
    "chest-ct": ["Axial chest CT with clear lungs and no nodule or mass.",
                 "Chest CT without focal pulmonary lesion.",
                 "Normal axial CT of the chest; the lungs are clear.",
                 "Unremarkable chest CT slice, no pulmonary nodule, mass or opacity."],
    "chest-xray": ["Frontal chest radiograph with clear lungs.",
                   "PA chest X-ray without focal opacity.",
                   "Normal frontal chest radiograph; no nodule, mass or consolidation.",
                   "Unremarkable chest X-ray, lungs clear."],
}
# per class: (descriptions, plural descriptions, diagnoses, plural diagnoses)
_FINDINGS = {
    ("brain-mri", "glioma"): (
        ["an irregular heterogeneously enhancing mass with a necrotic center",
         "a lobulated ring-enhancing intra-axial lesion with central necrosis",
         "an ill-defined heterogeneous intra-axial mass"],
        ["two irregular ring-enhancing intra-axial lesions",
         "two heterogeneous lobulated intra-axial masses"],
        ["high-grade glioma", "a glioma", "a glial neoplasm"],
        ["multifocal glioma", "multifocal high-grade glioma"]),
    ("brain-mri", "meningioma"): (
        ["a round homogeneously enhancing extra-axial mass",
         "a well-circumscribed dural-based mass",
         "an ovoid extra-axial lesion with homogeneous enhancement"],
        ["two round homogeneously enhancing extra-axial masses",
         "two well-circumscribed dural-based lesions"],
        ["meningioma", "a meningioma", "an extra-axial meningioma"],
        ["multiple meningiomas", "meningiomas"]),
    ("brain-mri", "pituitary"): (
        ["a small round enhancing lesion", "a small well-defined mass",
         "a rounded moderately enhancing nodule"],
        ["two small round enhancing lesions"],
        ["pituitary adenoma", "a pituitary macroadenoma", "a pituitary tumor"],
        ["pituitary adenomas"]),
    ("chest-ct", "nodule"): (
        ["a small round solid pulmonary nodule", "a well-circumscribed solid nodule",
         "a small rounded soft-tissue nodule"],
        ["two small solid pulmonary nodules", "two well-circumscribed solid nodules"],
        ["a pulmonary nodule", "a solitary pulmonary nodule", "a solid lung nodule"],
        ["multiple pulmonary nodules", "pulmonary nodules"]),
    ("chest-ct", "mass"): (
        ["an irregular spiculated mass", "a large lobulated mass with spiculated margins",
         "a spiculated soft-tissue mass"],
        ["two spiculated masses"],
        ["a lung mass suspicious for malignancy", "primary lung cancer",
         "bronchogenic carcinoma"],
        ["synchronous lung cancers"]),
    ("chest-ct", "ground-glass"): (
        ["a hazy ground-glass opacity", "an ill-defined area of ground-glass attenuation",
         "a patchy ground-glass opacity with preserved vessels"],
        ["two hazy ground-glass opacities", "two patchy areas of ground-glass attenuation"],
        ["ground-glass opacity", "an inflammatory or infectious process",
         "a ground-glass lesion"],
        ["multifocal ground-glass opacities", "multifocal inflammation"]),
    ("chest-xray", "nodule"): (
        ["a small round opacity", "a well-defined pulmonary nodule",
         "a small rounded nodular opacity"],
        ["two small round opacities", "two well-defined nodular opacities"],
        ["a pulmonary nodule", "a solitary lung nodule", "a nodule"],
        ["multiple pulmonary nodules", "pulmonary nodules"]),
    ("chest-xray", "mass"): (
        ["a large dense rounded opacity", "a well-defined dense mass",
         "a large round soft-tissue density"],
        ["two large dense opacities"],
        ["a lung mass", "a pulmonary mass", "bronchogenic carcinoma"],
        ["lung masses"]),
    ("chest-xray", "consolidation"): (
        ["a patchy hazy airspace opacity", "an ill-defined consolidation with air bronchograms",
         "a confluent airspace opacity"],
        ["two patchy airspace opacities", "patchy consolidations"],
        ["pneumonia", "lobar pneumonia", "consolidation"],
        ["multifocal pneumonia", "multilobar pneumonia"]),
}
_TEMPLATES = [
    "{mod} showing {desc} {loc}, consistent with {dx}.",
    "{mod} demonstrates {desc} {loc}; findings suggest {dx}.",
    "{desc_cap} {loc} on {mod_l}, compatible with {dx}.",
    "{mod}: {desc} {loc}, most likely {dx}.",
]


def _side(u: float, dead: float) -> str | None:
    """Patient side from the canonical column (radiological: image right = patient left)."""
    if u > dead:
        return "left"
    if u < -dead:
        return "right"
    return None


def _location(modality: str, label: str, uv: tuple[float, float], anat, rng) -> str:
    u, v = uv
    if modality == "brain-mri":
        if label == "pituitary":
            return str(rng.choice(["in the sellar region at the midline",
                                   "in the midline sellar region",
                                   "at the midline in the region of the sella"]))
        lobe = ("frontal" if v < -0.3 else "occipital" if v > 0.38
                else "temporal" if abs(u) > 0.45 else "parietal")
        side = _side(u, 0.1)
        if label == "meningioma":
            if side is None:
                return f"along the {'anterior' if v < 0 else 'posterior'} falx at the midline"
            return f"along the {side} {lobe} convexity"
        if side is None:
            return f"in the {lobe} lobe near the midline"
        return f"in the {side} {lobe} lobe"
    side = "left" if u > 0 else "right"
    if modality == "chest-ct":
        if v < -0.2:
            part = "anterior"
        elif v > 0.2:
            part = "posterior"
        else:
            part = "peripheral" if abs(u) > 0.45 else "central"
        return f"in the {part} {side} lung"
    lv, av = anat.info["lv"], anat.info["av"]
    rel = (v - (lv - av)) / (2 * av)
    zone = "upper" if rel < 0.38 else "mid" if rel < 0.62 else "lower"
    return f"in the {side} {zone} zone"


def phantom_caption(rng: np.random.Generator, modality: str, label: str,
             centers: Sequence[tuple[float, float]], anat) -> str:
    if label == "none":
        return str(rng.choice(_NONE[modality]))
    desc1, desc2, dx1, dx2 = _FINDINGS[(modality, label)]
    plural = len(centers) > 1
    desc = str(rng.choice(desc2 if plural else desc1))
    dx = str(rng.choice(dx2 if plural else dx1))
    locs: list[str] = []
    for c in centers:
        loc = _location(modality, label, c, anat, rng)
        if loc not in locs:
            locs.append(loc)
    loc = locs[0] if len(locs) == 1 else locs[0] + " and " + locs[1].replace("in the ", "the ", 1)
    mod = str(rng.choice(_MODALITY_WORDS[modality]))
    template = str(rng.choice(_TEMPLATES))
    return template.format(mod=mod, mod_l=mod[0].lower() + mod[1:], desc=desc,
                           desc_cap=desc[0].upper() + desc[1:], loc=loc, dx=dx)


# --------------------------------------------------------------------------- multi-finding
# Captions of multi-finding phantoms (mwm.data.findings): an image's caption names some of
# its findings (not always all), in varied words, sometimes with negations of absent ones
# and a word on the anatomy; a finding caption names one present finding only.

MENTION_PROBABILITY = 0.7      # each present finding is named in the caption ...
LOCATION_PROBABILITY = 0.5     # ... with its place
NEGATION_PROBABILITY = 0.3     # each absent finding is said to be absent
NORMAL_NEGATION_PROBABILITY = 0.5  # ... in an image with no finding at all
ANATOMY_PROBABILITY = 0.3      # one sentence on the anatomy
CLASS_WORD_PROBABILITY = 0.4   # the class lesion named by its class ("glioma")

_NORMAL_LEADS = ["{mod} without focal abnormality.", "Unremarkable {mod_l}.",
                 "{mod}: no acute finding.", "{mod} within normal limits."]
_MULTI_LEADS = ["{mod} showing {items}.", "{mod} demonstrates {items}.",
                "{items_cap} on {mod_l}.", "{mod}: {items}.", "Findings: {items}."]
_FINDING_TEMPLATES = ["{item_cap}.", "{mod} showing {item}.", "{mod} with {item}.",
                      "{item_cap} on {mod_l}."]
_ANATOMY_SENTENCES = {
    "skull": ["The skull is intact.", "Calvarium unremarkable.", "Intact skull vault."],
    "ventricles": ["The lateral ventricles are symmetric.", "Ventricular system midline."],
    "lungs": ["Both lungs are well expanded.", "Normal lung volumes.",
              "The lungs are symmetric in volume."],
}


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _extra_location(modality: str, uv: tuple[float, float], anat, rng) -> str:
    """Where an extra finding lies: deep brain structures near the centre, else a lobe
    (brain); a lung zone or region (chest)."""
    u, v = uv
    if modality == "brain-mri":
        side = _side(u, 0.08)
        if side is not None and np.hypot(u, v) < 0.32:
            return str(rng.choice([f"in the {side} basal ganglia",
                                   f"deep in the {side} hemisphere"]))
        return _location(modality, "glioma", uv, anat, rng)
    return _location(modality, "", uv, anat, rng)


def _name_finding(rng, modality: str, label: str, finding, centers, anat,
                  place: bool) -> str:
    """One finding in words: a synonym (the class word sometimes), maybe its place."""
    words = finding.class_words.get(label, ())
    if len(centers) > 1 and finding.plurals:
        item = str(rng.choice(finding.plurals))
    elif words and rng.random() < CLASS_WORD_PROBABILITY:
        item = str(rng.choice(words))
    else:
        item = str(rng.choice(finding.synonyms))
    if place and centers and len(centers) == 1:
        if finding.classes and label in finding.classes:
            item += " " + _location(modality, label, centers[0], anat, rng)
        elif finding.name != "enlarged-ventricles":
            item += " " + _extra_location(modality, centers[0], anat, rng)
    return item


def _modality_words(rng, modality: str) -> tuple[str, str]:
    mod = str(rng.choice(_MODALITY_WORDS[modality]))
    return mod, mod[0].lower() + mod[1:]


def multi_caption(rng: np.random.Generator, modality: str, label: str, findings,
                  present: dict[str, bool], centers: dict, anat) -> str:
    """The caption of a multi-finding image. ``findings``: the modality's Finding list;
    ``present``: name -> present; ``centers``: name -> canonical centres."""
    lesions = [f for f in findings if f.kind == "finding"]
    here = [f for f in lesions if present[f.name]]
    named = [f for f in here if rng.random() < MENTION_PROBABILITY]
    if here and not named:
        named = [here[int(rng.integers(len(here)))]]
    named = [named[i] for i in rng.permutation(len(named))]
    mod, mod_l = _modality_words(rng, modality)
    if named:
        items = [_name_finding(rng, modality, label, f, centers.get(f.name, []), anat,
                               rng.random() < LOCATION_PROBABILITY) for f in named]
        text = _join(items)
        lead = str(rng.choice(_MULTI_LEADS)).format(mod=mod, mod_l=mod_l, items=text,
                                                    items_cap=_cap(text))
    else:
        lead = str(rng.choice(_NORMAL_LEADS)).format(mod=mod, mod_l=mod_l)
    chance = NEGATION_PROBABILITY if here else NORMAL_NEGATION_PROBABILITY
    absent = [f for f in lesions if not present[f.name] and f.negations]
    negs = [str(rng.choice(f.negations)) for f in absent if rng.random() < chance]
    tail = [_cap(", ".join(negs)) + "."] if negs else []
    if rng.random() < ANATOMY_PROBABILITY:
        anatomy = [f.name for f in findings if f.kind == "anatomy" and f.name in _ANATOMY_SENTENCES]
        if anatomy:
            tail.append(str(rng.choice(_ANATOMY_SENTENCES[str(rng.choice(anatomy))])))
    tail = [tail[i] for i in rng.permutation(len(tail))]
    return " ".join([lead] + tail)


def finding_caption(rng: np.random.Generator, modality: str, label: str, finding,
                    centers, anat) -> str:
    """A short caption of one present finding that names that finding only."""
    item = _name_finding(rng, modality, label, finding, centers, anat,
                         rng.random() < LOCATION_PROBABILITY)
    mod, mod_l = _modality_words(rng, modality)
    return str(rng.choice(_FINDING_TEMPLATES)).format(item=item, item_cap=_cap(item),
                                                      mod=mod, mod_l=mod_l)
