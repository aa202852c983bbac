"""``mwm demo``: the pipeline on synthetic phantoms, offline, in one command.

Stage by stage (this grows with the project): write a phantom dataset, then a
contact sheet of it so a person can look at the data.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from .files import write_png
from .runlog import RunManifest


def run_demo(args: argparse.Namespace) -> int:
    from .data.layouts import read_manifest
    from .data.phantoms import generate_phantoms
    from .report.contact_sheet import dataset_contact_sheet

    out = Path(args.out)
    config = {k: v for k, v in vars(args).items() if k != "func"}
    with RunManifest(out, "demo", config, args.seed) as run:
        data_dir = out / "phantoms"
        summary = generate_phantoms(data_dir, modality=args.modality, n=args.n, size=args.size,
                                    seed=args.seed, workers=args.workers, progress=not args.quiet)
        samples = read_manifest(data_dir / "labels.csv")
        sheet = dataset_contact_sheet(samples, read_captions(data_dir / "captions.csv"),
                                      title=f"MWM phantoms: {args.modality}, {args.n} images, "
                                            f"seed {args.seed} (red: lesion mask)")
        sheet_path = out / "contact_sheet.png"
        write_png(sheet_path, sheet)
        run.add(phantoms=str(data_dir), contact_sheet=str(sheet_path),
                class_counts=summary.class_counts)
    print(f"phantoms:      {data_dir} ({summary.n} images; "
          + ", ".join(f"{k} {v}" for k, v in summary.class_counts.items()) + ")")
    print(f"contact sheet: {sheet_path}")
    return 0


def read_captions(path: Path) -> dict[str, str]:
    """``captions.csv`` (image,caption) → {image stem: caption}."""
    from .data.io import stem_of

    with path.open(newline="", encoding="utf-8") as handle:
        return {stem_of(row["image"]): row["caption"] for row in csv.DictReader(handle)}
