"""``mwm inspect``: read a whole dataset once and report what is in it and what is wrong.

Every image (and its mask and prompt) is read with the same code the pipeline uses; a
failure is recorded with its file and the reason, and the scan goes on, so one pass
lists every problem: each image's row names all of its problems (unreadable, no mask in
the paired mask folder, no prompt), and files that give no image (a 4-D NIfTI, a corrupt
header) and duplicate names are listed too, where other commands refuse them. The exit
status is non-zero when anything failed.

A manifest folder with a ``findings.csv`` (``mwm phantoms --findings multi``) is also
checked finding by finding: each listed mask is read (it must exist, have its image's
size, and be empty exactly when the finding is absent), and the report counts the images
with each finding, per split.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..files import write_csv, write_json
from ..progress import progress as progress_bar
from ..config import opt
from ..errors import DataError
from .findings import FINDINGS_COLUMNS, FINDINGS_FILE
from .io import DEFAULT_AXIS, read_mask, read_slice, stem_of
from .layouts import SPLITS, Sample, load_prompts, missing_mask, no_prompt, open_dataset, prompt_of

ROW_FIELDS = ("name", "path", "width", "height", "kind", "min", "max", "label", "split",
              "mask", "mask_fraction", "prompt", "findings", "error")


@dataclass
class InspectReport:
    source: str
    layout: str
    classes: list[str]
    rows: list[dict] = field(default_factory=list)
    # findings.csv, when there is one: name -> {"kind", "present", "by_split"}
    findings: dict[str, dict] | None = None

    @property
    def failures(self) -> list[dict]:
        return [row for row in self.rows if row["error"]]

    def summary(self) -> dict:
        ok = [row for row in self.rows if not row["error"]]
        sizes = Counter(f"{row['width']}x{row['height']}" for row in ok)
        return {
            "source": self.source, "layout": self.layout, "images": len(self.rows),
            "readable": len(ok), "failures": len(self.failures), "classes": self.classes,
            "label_counts": dict(Counter(row["label"] for row in ok if row["label"])),
            "split_counts": dict(Counter(row["split"] for row in ok if row["split"])),
            "sizes": dict(sizes.most_common(5)),
            "with_mask": sum(1 for row in ok if row["mask"]),
            "empty_masks": sum(1 for row in ok if row["mask"] and row["mask_fraction"] == 0),
            **({"findings": self.findings} if self.findings is not None else {}),
        }

    def text(self) -> str:
        s = self.summary()
        lines = [f"{s['source']}: {s['layout']} layout, {s['images']} images, "
                 f"{s['readable']} readable, {s['failures']} failed"]
        if s["sizes"]:
            lines.append("sizes: " + ", ".join(f"{k} ({v})" for k, v in s["sizes"].items()))
        if s["label_counts"]:
            lines.append("labels: " + ", ".join(f"{k} {v}" for k, v in sorted(s["label_counts"].items())))
        if s["split_counts"]:
            lines.append("splits: " + ", ".join(f"{k} {v}" for k, v in s["split_counts"].items()))
        if s["with_mask"]:
            lines.append(f"masks: {s['with_mask']} ({s['empty_masks']} empty)")
        for name, count in (self.findings or {}).items():
            splits = ", ".join(f"{k} {v}" for k, v in count["by_split"].items())
            lines.append(f"{count['kind']} {name}: {count['present']} "
                         f"image{'' if count['present'] == 1 else 's'}"
                         + (f" ({splits})" if splits else ""))
        for row in self.failures[:20]:
            lines.append(f"FAILED {row['error']}")
        if len(self.failures) > 20:
            lines.append(f"... and {len(self.failures) - 20} more failures (see inspect.csv)")
        return "\n".join(lines)

    def write(self, out_dir: str | Path) -> None:
        write_csv(Path(out_dir) / "inspect.csv", self.rows, ROW_FIELDS)
        write_json(Path(out_dir) / "inspect_summary.json", self.summary())


@dataclass(kw_only=True)
class InspectConfig:
    """Settings of ``mwm inspect``."""

    data: str = opt(help="image folder, class-folder root (train/<class>/...), CSV manifest, or "
                    "a single image file", positional=True)
    masks: str | None = opt(None, "mask folder paired with DATA by file stem")
    prompts: str | None = opt(None, "per-image prompts (JSON or CSV) to check for coverage")
    axis: int = opt(DEFAULT_AXIS, "NIfTI slicing axis (2: axial for RAS volumes)",
                    choices=(0, 1, 2))
    out: str | None = opt(None, "also write inspect.csv and inspect_summary.json here")
    quiet: bool = opt(False, "no progress bars")


def inspect_dataset(source: str | Path, *, masks: str | Path | None = None,
                    prompts: str | Path | None = None, axis: int = DEFAULT_AXIS,
                    progress: bool = True) -> InspectReport:
    """One row per image with every problem it has; files that list no image (a 4-D NIfTI,
    a corrupt header) and duplicate names are rows too, so one pass reports them all."""
    dataset = open_dataset(source, masks, axis=axis, lenient=True)
    prompt_map = load_prompts(prompts) if prompts else None
    report = InspectReport(str(source), dataset.layout, dataset.classes)
    for sample in progress_bar(dataset.samples, total=len(dataset.samples), desc="inspect",
                               unit="img", enabled=progress):
        report.rows.append(_inspect_one(sample, prompt_map, str(prompts), dataset.masks))
    _add_problems(report.rows, dataset.problems)
    if dataset.layout == "manifest":
        source = Path(source)
        table = (source if source.is_dir() else source.parent) / FINDINGS_FILE
        if table.is_file():
            _add_findings(report, table)
    return report


def _inspect_one(sample: Sample, prompts: dict | None, prompt_source: str,
                 mask_dir: Path | None) -> dict:
    """The row of one image; its ``error`` joins all of its problems (" | ")."""
    row = dict.fromkeys(ROW_FIELDS, "")
    row.update(name=sample.name, path=str(sample.image.path), label=sample.label or "",
               split=sample.split or "", prompt=sample.prompt or "")
    errors: list[str] = []
    shape = _checked(errors, _read_image, sample, row)
    if sample.mask is not None:  # read even when the image is not: its own faults show
        _checked(errors, _read_region, sample, row, shape)
    elif mask_dir is not None:
        errors.append(missing_mask(sample.image, mask_dir))
    if prompts is not None:
        prompt = prompt_of(sample, prompts)
        if prompt is None:
            errors.append(no_prompt(sample.image, prompt_source))
        row["prompt"] = prompt or ""
    row["error"] = " | ".join(errors)
    return row


def _checked(errors: list[str], check, *args):
    """``check(*args)``; a DataError it raises is added to ``errors`` (and None returned)."""
    try:
        return check(*args)
    except DataError as err:
        errors.append(str(err))
        return None


def _read_image(sample: Sample, row: dict) -> tuple[int, int]:
    image = read_slice(sample.image)
    row.update(width=image.shape[1], height=image.shape[0], kind=image.kind,
               min=float(np.min(image.pixels)), max=float(np.max(image.pixels)))
    return image.shape


def _read_region(sample: Sample, row: dict, shape: tuple[int, int] | None) -> None:
    region = read_mask(sample.mask, shape=shape)
    row.update(mask=str(sample.mask.path), mask_fraction=round(float(region.mean()), 5))


def _add_problems(rows: list[dict], problems: list[dict]) -> None:
    """A listing problem joins the rows of the images it names (a duplicate name), or is
    a row of its own (a file that lists no image, a mask file's problem)."""
    for found in problems:
        named = [row for row in rows if row["name"] == found["name"]]
        for row in named:
            row["error"] = " | ".join(e for e in (row["error"], found["reason"]) if e)
        if not named:
            rows.append({**dict.fromkeys(ROW_FIELDS, ""), "name": found["name"],
                         "path": found["file"], "error": found["reason"]})


def _add_findings(report: InspectReport, table: Path) -> None:
    """Check the finding masks listed in ``table`` (findings.csv) and count the findings;
    a problem joins the row of its image (or is a row of its own)."""
    with open(table, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in FINDINGS_COLUMNS if c not in (reader.fieldnames or [])]
        entries = list(reader) if not missing else []
    if missing:
        _add_problems(report.rows, [{"name": table.name, "file": str(table), "reason": (
            f"{table}: columns {', '.join(missing)} missing; expected "
            f"{','.join(FINDINGS_COLUMNS)} (as `mwm phantoms --findings multi` writes).")}])
        return
    rows = {row["name"]: row for row in report.rows}
    counts: dict[str, dict] = {}
    for entry in entries:
        name, finding = stem_of(entry["image"]), entry["finding"]
        count = counts.setdefault(finding, {"kind": entry["kind"], "present": 0, "by_split": {}})
        row = rows.get(name)
        if row is None:
            _add_problems(report.rows, [{"name": name, "file": str(table), "reason": (
                f"{table}: lists {entry['image']}, which the manifest does not hold.")}])
            continue
        present = _finding_problem(row, entry, table.parent)
        if present:
            count["present"] += 1
            if row["split"]:
                count["by_split"][row["split"]] = count["by_split"].get(row["split"], 0) + 1
            row["findings"] = ";".join(n for n in (row["findings"], finding) if n)
    order = {s: i for i, s in enumerate(SPLITS)}
    for count in counts.values():
        count["by_split"] = dict(sorted(count["by_split"].items(),
                                        key=lambda kv: (order.get(kv[0], len(order)), kv[0])))
    report.findings = counts


def _finding_problem(row: dict, entry: dict, root: Path) -> bool:
    """Whether the finding of ``entry`` is present; its mask's problem joins ``row``."""
    mask_path = root / entry["mask"]
    present = entry["present"].strip() == "1"
    problem = ""
    if entry["present"].strip() not in ("0", "1"):
        problem = f"{entry['image']}: present must be 0 or 1 for {entry['finding']}, got " \
                  f"{entry['present']!r} (findings.csv)"
    elif not mask_path.is_file():
        problem = f"{mask_path}: mask of finding {entry['finding']} missing (listed in findings.csv)"
    else:
        shape = (row["height"], row["width"]) if row["width"] != "" else None
        try:
            region = read_mask(mask_path, shape=shape)
        except DataError as err:
            problem = str(err)
        else:
            if region.any() != present:
                problem = (f"{mask_path}: mask is {'empty' if present else 'not empty'} but "
                           f"findings.csv says {entry['finding']} is "
                           f"{'present' if present else 'absent'}")
    if problem:
        row["error"] = " | ".join(e for e in (row["error"], problem) if e)
    return present
