"""Abstention: a per-image decision that the finding a prompt names is absent.

A saliency map always has a brightest spot, so postprocessing always finds a region, even
in an image without the finding. ``mwm localize --abstain`` scores, for each whole image,
how much better the prompt fits it than a few **contrast prompts** (a normal-anatomy
prompt, the other findings): the log-softmax of the prompt among {prompt} ∪ contrasts
(:func:`mwm.localize.m2ib.presence_scores`; at most 0, higher = more likely present). An
image is **present** when its score is ``>= threshold``; an absent one gets an empty
region from ``mwm postprocess``.

The threshold is calibrated on validation images with masks (an empty mask: the finding
is absent) by the largest balanced accuracy (Youden's J), ties to the lower threshold
(:func:`youden_threshold`), or given. Files (``presence.json``, ``presence.csv``), the
default contrast and the metrics: ``docs/presence.md``.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ..data.findings import FINDINGS_FILE as FINDINGS_CSV
from ..data.io import read_mask, read_slice, stem_of, to_model_input
from ..data.layouts import Sample, split_prompt
from ..errors import DataError
from ..files import write_csv, write_json
from ..progress import progress as progress_bar

PRESENCE_JSON = "presence.json"
PRESENCE_CSV = "presence.csv"
PRESENCE_FILES = (PRESENCE_JSON, PRESENCE_CSV)
PRESENCE_COLUMNS = ("image", "prompt", "score", "present")
#: The "normal" prompt of each phantom modality, the default contrast (docs/presence.md).
NORMAL_PROMPTS = {"brain-mri": "normal brain MRI", "chest-xray": "normal chest radiograph",
                  "chest-ct": "normal chest CT"}
GENERIC_NORMAL = "a normal medical image"
FINDINGS_COLUMNS = ("image", "finding", "kind", "present")
READ_CHUNK = 256  # images read and scored together (bounds the memory of a big set)

ScoreFn = Callable[[list[np.ndarray], list[list[str]], list[list[str]]], np.ndarray]


# --------------------------------------------------------------------------- contrast prompts

def prompt_key(prompt: str | Sequence[str]) -> str:
    """One spelling of a prompt or ensemble: ``"a | b"``, ``["a", "b"]`` → ``"a|b"``."""
    return "|".join(split_prompt(prompt) if isinstance(prompt, str) else
                    [p.strip() for p in prompt if p.strip()])


def parse_contrast(text: str, where: str = "--contrast") -> list[str]:
    """``"a|b|c"`` → ``["a", "b", "c"]``; an empty list is an error."""
    items = list(dict.fromkeys(p.strip() for p in str(text).split("|") if p.strip()))
    if not items:
        raise DataError(f"{where}: no contrast prompt in {text!r}; give one or more prompts "
                        "separated by '|', e.g. 'normal brain MRI|cyst'.")
    return items


def load_contrast_file(path: str | os.PathLike) -> dict[str, list[str]]:
    """``--contrast-file``: JSON ``{prompt: [contrast, ...]}`` (a value may be ``"a|b"``)."""
    path = Path(path)
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise DataError(f"{path}: contrast file not readable ({err}).") from err
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err}).") from err
    return contrast_mapping(mapping, str(path))


def contrast_mapping(mapping, where: str) -> dict[str, list[str]]:
    """A ``{prompt: [contrast, ...] | "a|b"}`` mapping, checked, keys in :func:`prompt_key` form."""
    shape = (f'{where}: expected an object {{"prompt": ["contrast", ...]}} (a value may also '
             'be "a|b")')
    if not isinstance(mapping, dict) or not mapping:
        raise DataError(shape + ".")
    out = {}
    for prompt, items in mapping.items():
        if isinstance(items, str):
            items = [items]
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise DataError(f"{shape}; the entry {prompt!r} is {items!r}.")
        out[prompt_key(str(prompt))] = parse_contrast("|".join(items), f"{where}, {prompt!r}")
    return out


@dataclass
class DatasetInfo:
    """What a dataset folder says about its images: modality and findings table."""

    root: Path | None = None
    modality: str | None = None
    findings: list[dict] = field(default_factory=list)  # rows of findings.csv


def dataset_info(source: str | os.PathLike) -> DatasetInfo:
    """``dataset.json``'s modality and ``findings.csv``'s rows of the dataset at ``source``.

    The dataset folder is ``source`` (a folder), its CSV's folder, or, for an ``images``
    folder of a dataset (``mwm phantoms``'s layout), the folder above it."""
    path = Path(source)
    root = path.parent if path.is_file() else path
    marks = ("dataset.json", FINDINGS_CSV)
    if not any((root / m).is_file() for m in marks) and root.name == "images" \
            and any((root.parent / m).is_file() for m in marks):
        root = root.parent
    modality, described = None, root / "dataset.json"
    if described.is_file():
        try:
            modality = json.loads(described.read_text(encoding="utf-8")).get("modality")
        except (OSError, ValueError, AttributeError) as err:
            raise DataError(f"{described}: not a readable JSON object ({err}).") from err
    findings = read_findings(root / FINDINGS_CSV) if (root / FINDINGS_CSV).is_file() else []
    return DatasetInfo(root, modality if isinstance(modality, str) else None, findings)


def read_findings(path: Path) -> list[dict]:
    """The rows of a ``findings.csv`` (image, finding, kind, present, mask, phrase)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()}
                    for row in csv.DictReader(handle)]
    except (OSError, csv.Error, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable CSV file ({err}).") from err
    missing = [c for c in FINDINGS_COLUMNS if rows and c not in rows[0]]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; a findings table has "
                        "columns image, finding, kind (finding|anatomy), present, mask, phrase.")
    for line, row in enumerate(rows, start=2):
        row["present"] = _flag(row["present"], f"{path}, line {line}")
        row["stem"] = stem_of(row["image"])
    return rows


def _flag(text: str, where: str) -> bool:
    value = text.lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    raise DataError(f"{where}: present must be 1 or 0, got {text!r}.")


def finding_of(prompt: str | Sequence[str], findings: Sequence[dict]) -> str | None:
    """The finding (kind finding) a prompt names: its name or phrase equals the prompt or
    a member of its ensemble (case-insensitive); None when it names none."""
    members = {p.lower() for p in prompt_key(prompt).split("|")}
    for row in findings:
        if row.get("kind") == "finding" and \
                {row["finding"].lower(), row.get("phrase", "").lower()} & members:
            return row["finding"]
    return None


def default_contrast(prompt: str | Sequence[str], info: DatasetInfo) -> list[str]:
    """The modality's normal prompt, then the phrase of every other finding of the
    dataset's ``findings.csv`` (kind finding; its first phrase, else its name)."""
    own = finding_of(prompt, info.findings)
    items = [NORMAL_PROMPTS.get(info.modality or "", GENERIC_NORMAL)]
    for row in info.findings:
        if row.get("kind") == "finding" and row["finding"] != own:
            items.append(row.get("phrase") or row["finding"].replace("-", " "))
    members = set(prompt_key(prompt).split("|"))
    return [c for c in dict.fromkeys(items) if c not in members]


@dataclass
class ContrastRule:
    """Which contrast prompts a prompt gets: its ``--contrast-file`` entry, else
    ``--contrast``, else :func:`default_contrast`."""

    given: list[str] | None = None
    mapping: dict[str, list[str]] = field(default_factory=dict)
    info: DatasetInfo = field(default_factory=DatasetInfo)

    def for_prompt(self, prompt: str | Sequence[str]) -> list[str]:
        """The prompt's contrast, without the prompt's own strings (they cannot contrast)."""
        key = prompt_key(prompt)
        if key in self.mapping:
            items, where = self.mapping[key], "its --contrast-file entry"
        elif self.given:
            items, where = self.given, "--contrast"
        else:
            return default_contrast(key, self.info)
        members = set(key.split("|"))
        kept = [c for c in items if c not in members]
        if not kept:
            raise DataError(f"prompt {key!r}: {where} holds only the prompt itself; give at "
                            "least one other finding or a normal-anatomy prompt.")
        return kept

    def lists(self, prompts: Sequence[str | Sequence[str]]) -> dict[str, list[str]]:
        """``{prompt: contrast}`` of every distinct prompt (what the run records)."""
        return {prompt_key(p): self.for_prompt(p) for p in prompts}


# --------------------------------------------------------------------------- thresholds

def youden_threshold(scores, present) -> float:
    """The threshold ``t`` (one of the scores) maximizing balanced accuracy of "present
    iff score >= t" (Youden's J = TPR + TNR - 1); ties go to the lower ``t``."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    present = np.asarray(present, dtype=bool).ravel()
    n_pos, n_neg = int(present.sum()), int((~present).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("calibration needs images with the finding present and absent")
    candidates = np.unique(scores)                               # ascending
    pos, neg = np.sort(scores[present]), np.sort(scores[~present])
    tp = n_pos - np.searchsorted(pos, candidates, side="left")   # positives with score >= t
    tn = np.searchsorted(neg, candidates, side="left")           # negatives with score < t
    j_scaled = tp * n_neg + tn * n_pos                           # exact: ties compare equal
    return float(candidates[int(np.argmax(j_scaled))])           # first maximum = lowest t


def presence_metrics(scores, predicted, truth) -> dict:
    """Counts, precision and recall of the "present" decisions, balanced accuracy, and the
    AUROC of the scores against ``truth`` (None where undefined: no predicted present,
    no truly present, or one class only)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    predicted = np.asarray(predicted, dtype=bool).ravel()
    truth = np.asarray(truth, dtype=bool).ravel()
    tp, fp = int((predicted & truth).sum()), int((predicted & ~truth).sum())
    fn, tn = int((~predicted & truth).sum()), int((~predicted & ~truth).sum())
    both = truth.any() and not truth.all()
    return {"n": int(truth.size), "n_present": int(truth.sum()), "n_absent": int((~truth).sum()),
            "tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "precision": tp / (tp + fp) if tp + fp else None,
            "recall": tp / (tp + fn) if tp + fn else None,
            "balanced_accuracy": (tp / (tp + fn) + tn / (tn + fp)) / 2 if both else None,
            "auroc": _auroc(scores, truth) if both else None}


def _auroc(scores, truth) -> float:
    from ..metrics import binary_auroc  # the one exact AUROC (Mann-Whitney)

    return binary_auroc(scores, truth)


def read_threshold(text: str) -> tuple[float, str, dict | None]:
    """``--presence-threshold``: a number, or a ``presence.json`` whose threshold (and
    calibration) is reused. Returns (threshold, source, calibration or None)."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is not None:
        if not math.isfinite(value):
            raise DataError(f"--presence-threshold {text}: must be a finite number.")
        return value, f"--presence-threshold {text}", None
    path = Path(text)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        value = float(record["threshold"])
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise DataError(f"--presence-threshold {text}: neither a number nor a readable "
                        f"{PRESENCE_JSON} with a numeric 'threshold' ({type(err).__name__}: "
                        f"{err}); give a score such as -0.7 or the presence.json of an earlier "
                        "`mwm localize --abstain`.") from err
    if not math.isfinite(value):
        raise DataError(f"{path}: threshold {value} is not a finite number.")
    return value, str(path), record.get("calibration")


# --------------------------------------------------------------------------- calibration data

def finding_truth(sample: Sample, findings: Sequence[dict]) -> bool:
    """Is the prompt's finding in the sample's image: ``findings.csv``'s ``present`` for
    the image and the finding the prompt names, else its mask is not empty."""
    own = finding_of(sample.prompt or "", findings) if findings else None
    if own is not None:
        names = {sample.name, stem_of(sample.image.path)}
        for row in findings:
            if row["finding"] == own and row["stem"] in names:
                return bool(row["present"])
    if sample.mask is None:
        raise DataError(f"{sample.image.path}: a calibration image needs a mask (an empty "
                        "mask says the finding is absent).")
    return bool(read_mask(sample.mask).any())


@dataclass
class PresenceSpec:
    """What ``--abstain`` decides with: calibration samples (prompts and masks) whose
    threshold :func:`youden_threshold` picks, or a given ``threshold``."""

    calibration: list[Sample] = field(default_factory=list)
    threshold: float | None = None
    source: str = ""                     # where the threshold comes from, for presence.json
    findings: list[dict] = field(default_factory=list)  # findings.csv rows of the calibration set
    given_calibration: dict | None = None   # a reused presence.json's calibration record

    def __post_init__(self) -> None:
        test = [s.name for s in self.calibration if s.split == "test"]
        if test:  # a threshold tuned on test images would make test scores optimistic
            raise DataError(f"--abstain: {len(test)} calibration image(s) are in the test split "
                            f"(first: {test[0]}); calibrate on validation images only.")
        if self.threshold is None and not self.calibration:
            raise DataError("--abstain needs a presence threshold: a dataset with a val split "
                            "and masks, --tune VAL_IMAGES VAL_MASKS, or --presence-threshold "
                            "VALUE|presence.json.")


def _score_key(sample: Sample) -> tuple[str, str, str | None]:
    return str(sample.image.path), sample.name, sample.prompt


def score_samples(samples: Sequence[Sample], score_fn: ScoreFn, rule: ContrastRule, *,
                  progress: bool = True, desc: str = "presence",
                  known: Mapping[tuple, float] | None = None
                  ) -> tuple[list[tuple[Sample, float]], list[dict]]:
    """((sample, score) of every readable sample, failures of the unreadable ones).
    ``known``: scores already computed (by :func:`_score_key`), reused rather than
    recomputed, so that an image scored twice cannot get two scores (threaded matrix
    products round differently in batches of other sizes)."""
    known = known or {}
    reused = {_score_key(s): known[_score_key(s)] for s in samples if _score_key(s) in known}
    fresh, failures = _score_fresh([s for s in samples if _score_key(s) not in reused],
                                   score_fn, rule, progress, desc)
    by_key = {**reused, **{_score_key(s): v for s, v in fresh}}
    return [(s, by_key[_score_key(s)]) for s in samples if _score_key(s) in by_key], failures


def _score_fresh(samples: Sequence[Sample], score_fn: ScoreFn, rule: ContrastRule,
                 progress: bool, desc: str) -> tuple[list[tuple[Sample, float]], list[dict]]:
    scored, failures = [], []
    chunks = [samples[i:i + READ_CHUNK] for i in range(0, len(samples), READ_CHUNK)]
    for chunk in progress_bar(chunks, total=len(chunks), desc=desc, unit="chunk",
                              enabled=progress):
        ready, images = [], []
        for sample in chunk:
            try:
                images.append(to_model_input(read_slice(sample.image)))
                ready.append(sample)
            except DataError as err:
                failures.append({"name": sample.name, "file": str(sample.image.path),
                                 "reason": str(err)})
        if ready:
            prompts = [split_prompt(s.prompt) for s in ready]
            scores = score_fn(images, prompts, [rule.for_prompt(p) for p in prompts])
            scored += [(s, float(v)) for s, v in zip(ready, np.asarray(scores).ravel())]
    return scored, failures


def calibrate(spec: PresenceSpec, score_fn: ScoreFn, rule: ContrastRule, *,
              progress: bool = True, known: Mapping[tuple, float] | None = None
              ) -> tuple[float, dict | None]:
    """(threshold, calibration record) of ``spec``: given, or Youden's on its samples
    (``known``: their scores from the main pass, see :func:`score_samples`)."""
    if spec.threshold is not None:
        return spec.threshold, spec.given_calibration
    scored, failures = score_samples(spec.calibration, score_fn, rule, progress=progress,
                                     desc="presence calibration", known=known)
    if failures:
        first = failures[0]
        raise DataError(f"--abstain: {len(failures)} calibration image(s) unreadable; first: "
                        f"{first['file']}: {first['reason']}")
    scores = np.array([score for _, score in scored])
    truth = np.array([finding_truth(sample, spec.findings) for sample, _ in scored])
    if truth.all() or not truth.any():
        kind = "present" if truth.all() else "absent"
        raise DataError(f"--abstain: the finding is {kind} in all {truth.size} calibration "
                        f"images ({spec.source}); calibration needs images with and without "
                        "it (an empty mask = absent), or give --presence-threshold.")
    threshold = youden_threshold(scores, truth)
    return threshold, presence_metrics(scores, scores >= threshold, truth)


def abstain(samples: Sequence[Sample], out: str | os.PathLike, score_fn: ScoreFn,
            spec: PresenceSpec, rule: ContrastRule, *, record: Mapping | None = None,
            progress: bool = True) -> dict:
    """Score ``samples``, decide with the calibrated threshold, write ``presence.csv`` and
    ``presence.json`` into ``out``; returns presence.json's content (+ ``failures``)."""
    scored, failures = score_samples(samples, score_fn, rule, progress=progress)
    threshold, calibration = calibrate(spec, score_fn, rule, progress=progress,
                                       known={_score_key(s): v for s, v in scored})
    rows = [{"image": s.name, "prompt": prompt_key(s.prompt), "score": repr(float(score)),
             "present": int(score >= threshold)} for s, score in scored]
    n_present = sum(r["present"] for r in rows)
    summary = {
        "threshold": threshold, "rule": "present when score >= threshold",
        "source": spec.source, "calibration": calibration,
        "n_images": len(rows), "n_present": n_present, "n_absent": len(rows) - n_present,
        "prompts": sorted({r["prompt"] for r in rows}),
        "contrast": rule.lists([s.prompt for s, _ in scored]), **dict(record or {})}
    out = Path(out)
    write_csv(out / PRESENCE_CSV, rows, PRESENCE_COLUMNS)
    write_json(out / PRESENCE_JSON, summary)
    return {**summary, "failures": failures}


# --------------------------------------------------------------------------- reading back

def read_presence(path: str | os.PathLike) -> dict[str, tuple[float, bool]]:
    """``presence.csv`` → ``{image: (score, present)}``."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        return {r["image"]: (float(r["score"]), r["present"].strip() == "1") for r in rows}
    except (OSError, csv.Error, KeyError, ValueError, AttributeError) as err:
        raise DataError(f"{path}: not a presence table with columns "
                        f"{', '.join(PRESENCE_COLUMNS)} ({type(err).__name__}: {err}); re-run "
                        "`mwm localize --abstain`.") from err


def listed_presence(folder: str | os.PathLike, commands: tuple[str, ...]) -> Path | None:
    """The ``presence.csv`` a stage (one of ``commands``) listed in ``folder``'s manifest;
    None when it listed none. Listed but missing is an error."""
    from ..runlog import stage_outputs

    listed = stage_outputs(folder, commands)
    if listed is None or PRESENCE_CSV not in listed:
        return None
    path = Path(folder) / PRESENCE_CSV
    if not path.is_file():
        raise DataError(f"{path}: listed by `mwm {'/'.join(commands)}` but missing; re-run it "
                        "to finish the folder.")
    return path
