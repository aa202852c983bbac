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
