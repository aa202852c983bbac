"""The ``mwm`` command line: parsing and printing only; the work is in the library.

Every command accepts ``--config FILE.yaml`` (defaults for its flags; flags win), uses
the same flag names for the same things (``--out``, ``--seed``, ``--quiet``,
``--device``, ``--workers`` ...) and writes ``run_manifest.json`` into its output
folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

from . import __version__
from .data.io import DataError

EXIT_OK, EXIT_FAILURES, EXIT_USAGE = 0, 1, 2


# --------------------------------------------------------------------------- flag vocabulary
# One function per shared flag, so the same name always means the same thing.

def add_out(p: argparse.ArgumentParser, default: str | None = None, positional: bool = False) -> None:
    if positional:
        p.add_argument("out", nargs="?", default=default, metavar="OUT",
                       help="output folder (created if missing)")
    else:
        p.add_argument("--out", default=default, metavar="DIR",
                       help=f"output folder (default: {default})" if default else "output folder")


def add_common(p: argparse.ArgumentParser, *, seed: bool = True, workers: bool = False,
               device: bool = False) -> None:
    p.add_argument("--config", metavar="FILE.yaml",
                   help="YAML file with defaults for this command's flags (flags override it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    if seed:
        p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    if workers:
        p.add_argument("--workers", type=int, default=None,
                       help="worker processes (default: number of CPU cores)")
    if device:
        p.add_argument("--device", default="auto",
                       help="cpu, cuda, cuda:N or auto (default: auto = GPU if available)")


# --------------------------------------------------------------------------- commands

def cmd_phantoms(args: argparse.Namespace) -> int:
    from .data.phantoms import generate_phantoms
    from .runlog import RunManifest

    out = _require(args.out, "OUT (the output folder)")
    with RunManifest(out, "phantoms", _config_of(args), args.seed) as run:
        summary = generate_phantoms(out, modality=args.modality, n=args.n, size=args.size,
                                    seed=args.seed, bit_depth=args.bit_depth,
                                    workers=args.workers, class_folders=args.class_folders,
                                    progress=not args.quiet)
        run.add(class_counts=summary.class_counts, split_counts=summary.split_counts,
                seconds=summary.seconds)
    rate = summary.n / max(summary.seconds, 1e-9)
    print(f"wrote {summary.n} {summary.modality} phantoms ({summary.size}x{summary.size}) to "
          f"{out} in {summary.seconds:.1f} s ({rate:.0f} images/s)")
    print("classes: " + ", ".join(f"{k} {v}" for k, v in summary.class_counts.items()))
    print("splits:  " + ", ".join(f"{k} {v}" for k, v in summary.split_counts.items()))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def cmd_inspect(args: argparse.Namespace) -> int:
    from .data.inspect import inspect_dataset
    from .runlog import RunManifest

    report = inspect_dataset(args.data, masks=args.masks, prompts=args.prompts, axis=args.axis,
                             progress=not args.quiet)
    if args.out:
        with RunManifest(args.out, "inspect", _config_of(args)) as run:
            run.add(**report.summary())
            report.write(args.out)
    print(report.text())
    return EXIT_FAILURES if report.failures else EXIT_OK


def cmd_postprocess(args: argparse.Namespace) -> int:
    from .files import write_json
    from .localize.postprocess import PostprocessConfig, postprocess_folder
    from .runlog import RunManifest

    out = _require(args.out, "--out (the mask folder)")
    crf = None
    if args.crf:
        crf = {"iterations": args.crf_iterations}
    config = PostprocessConfig(method=args.method, threshold=args.threshold,
                               top_k=args.top_k or None, fill=not args.no_fill,
                               box_ratio=args.box_ratio, crf=crf)
    with RunManifest(out, "postprocess", _config_of(args)) as run:
        summary = postprocess_folder(args.saliency, out, config, images_dir=args.images,
                                     boxes_dir=args.boxes_out, progress=not args.quiet)
        write_json(Path(out) / "postprocess_config.json", config.to_dict())
        run.add(**{k: v for k, v in summary.items() if k != "config"})
    print(f"wrote {summary['n_written']} region masks to {out}"
          + (f" and boxes to {args.boxes_out}" if args.boxes_out else ""))
    return _finish(summary["failures"], "map")


def cmd_refine(args: argparse.Namespace) -> int:
    from .localize.refine import SamRefiner, refine_folder
    from .runlog import RunManifest
    from .utils import resolve_device

    out = _require(args.out, "--out (the refined mask folder)")
    with RunManifest(out, "refine", _config_of(args)) as run:
        refiner = SamRefiner.from_pretrained(args.model, device=str(resolve_device(args.device)))
        summary = refine_folder(args.images, args.masks, out, refiner, top_k=args.top_k or None,
                                progress=not args.quiet)
        run.add(**summary)
    print(f"refined {summary['n_written']} of {summary['n_masks']} masks into {out}")
    return _finish(summary["failures"], "mask")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .localize.evaluate import evaluate_folders
    from .runlog import RunManifest

    out = args.out or str(Path(args.pred).parent / f"{Path(args.pred).name}_eval")
    with RunManifest(out, "evaluate", _config_of(args)) as run:
        summary = evaluate_folders(args.pred, args.gt, out, tolerance_px=args.tolerance,
                                   progress=not args.quiet)
        run.add(n_gt=summary["n_gt"], n_missing=summary["n_missing"],
                metrics=summary["metrics"])
    print(f"{summary['n_gt']} ground-truth masks, {summary['n_missing']} without prediction "
          f"(scored as empty), {summary['n_failed']} failed")
    for name, stats in summary["metrics"].items():
        if stats["mean"] is not None:
            print(f"  {name:14s} {stats['mean']:.4f} ± {stats['std']:.4f}")
    print(f"per-image table and summary: {out}")
    return _finish(summary["failures"], "image")


# --------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mwm", description="Mask What Matters: text-guided masked image modeling for "
        "medical imaging. Run `mwm demo` for the whole pipeline on synthetic data.")
    parser.add_argument("--version", action="version", version=f"mwm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    from .data.phantoms import MODALITIES

    p = _add(sub, "phantoms", cmd_phantoms, "write a synthetic labelled dataset (images, lesion "
             "masks, labels, captions, prompts, COCO instances, splits)")
    add_out(p, positional=True)
    p.add_argument("--modality", choices=MODALITIES, default="brain-mri")
    p.add_argument("--n", type=int, default=200, help="number of images (default: 200)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default: 128)")
    p.add_argument("--bit-depth", type=int, choices=(8, 16), default=8, help="PNG bit depth")
    p.add_argument("--class-folders", action="store_true",
                   help="also write classes/<split>/<class>/ links for class-folder tools")
    add_common(p, workers=True)

    p = _add(sub, "demo", cmd_demo, "run the pipeline on synthetic phantoms, offline")
    add_out(p, default="mwm-demo")
    p.add_argument("--modality", choices=MODALITIES, default="brain-mri")
    p.add_argument("--n", type=int, default=96, help="number of phantom images (default: 96)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default: 128)")
    add_common(p, workers=True)

    p = _add(sub, "inspect", cmd_inspect, "check a dataset: read every image (and mask and "
             "prompt), report sizes, value ranges and every problem with its file")
    p.add_argument("data", help="image folder, class-folder root (train/<class>/...), CSV "
                   "manifest, or a single image file")
    p.add_argument("--masks", help="mask folder paired with DATA by file stem")
    p.add_argument("--prompts", help="per-image prompts (JSON or CSV) to check for coverage")
    p.add_argument("--axis", type=int, choices=(0, 1, 2), default=2,
                   help="NIfTI slicing axis (default: 2, axial for RAS volumes)")
    add_out(p)
    add_common(p, seed=False)

    p = _add(sub, "postprocess", cmd_postprocess, "turn saliency maps into region masks "
             "(threshold / Otsu / k-means or dense CRF, top-k components, holes, boxes)")
    p.add_argument("saliency", help="folder of saliency maps (PNG, as `mwm localize` writes)")
    add_out(p)
    p.add_argument("--method", choices=("threshold", "otsu", "kmeans"), default="kmeans",
                   help="binarization (default: kmeans, 2 clusters on the map values)")
    p.add_argument("--threshold", type=float, default=0.3,
                   help="for --method threshold: foreground where saliency > T (default 0.3)")
    p.add_argument("--top-k", type=int, default=0,
                   help="keep the K largest connected components (default 0 = all)")
    p.add_argument("--no-fill", action="store_true", help="do not fill holes")
    p.add_argument("--box-ratio", type=float, default=None,
                   help="replace each component by its box scaled by R about its centre")
    p.add_argument("--boxes-out", metavar="DIR", help="also write the (scaled) boxes here")
    p.add_argument("--crf", action="store_true",
                   help="dense CRF guided by the image instead of binarization (needs --images)")
    p.add_argument("--crf-iterations", type=int, default=5, help="mean-field iterations")
    p.add_argument("--images", metavar="DIR", help="the images the maps were made from (CRF)")
    add_common(p, seed=False)

    p = _add(sub, "refine", cmd_refine, "refine coarse region masks with SAM box prompts "
             "(one box per component)")
    p.add_argument("images", help="image folder")
    p.add_argument("masks", help="coarse mask folder (paired with the images by file stem)")
    add_out(p)
    p.add_argument("--model", default="facebook/sam-vit-base",
                   help="transformers SamModel checkpoint: hub id (SAM, MedSAM e.g. "
                   "wanglab/medsam-vit-base) or local folder (default: facebook/sam-vit-base)")
    p.add_argument("--top-k", type=int, default=0,
                   help="components to keep (default 0 = as many as the coarse mask has)")
    add_common(p, seed=False, device=True)

    p = _add(sub, "evaluate", cmd_evaluate, "score predicted region masks against ground "
             "truth (DSC, NSD, coverage, recall, box coverage/recall)")
    p.add_argument("pred", help="folder of predicted masks")
    p.add_argument("gt", help="folder of ground-truth masks (every one is scored)")
    add_out(p)
    p.add_argument("--tolerance", type=float, default=2.0,
                   help="NSD tolerance in pixels (default 2)")
    add_common(p, seed=False)
    return parser


def _add(sub, name: str, func: Callable[[argparse.Namespace], int], help_text: str):
    p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
    p.set_defaults(func=func)
    return p


# --------------------------------------------------------------------------- running

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; a ``--config`` file supplies defaults that flags override."""
    from .config import config_defaults

    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        subparser = _subparser(parser, args.command)
        subparser.set_defaults(**config_defaults(subparser, args.config))
        args = parser.parse_args(argv)
    return args


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise KeyError(name)


def _config_of(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k != "func"}


def _finish(failures: list[dict], unit: str) -> int:
    """Summarize per-item failures of a batch job; non-zero exit if there were any."""
    if not failures:
        return EXIT_OK
    print(f"{len(failures)} {unit}(s) failed:", file=sys.stderr)
    for failure in failures[:20]:
        print(f"  {failure.get('file') or failure.get('name')}: {failure.get('reason') or failure.get('error')}",
              file=sys.stderr)
    if len(failures) > 20:
        print(f"  ... and {len(failures) - 20} more (see the output folder)", file=sys.stderr)
    return EXIT_FAILURES


def _require(value, what: str):
    if value in (None, ""):
        raise DataError(f"missing {what}: give it on the command line or in --config.")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except DataError as err:
        print(f"mwm: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.command is None:
        build_parser().print_help()
        return EXIT_USAGE
    try:
        return args.func(args)
    except DataError as err:
        print(f"mwm {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"mwm {args.command}: interrupted; outputs written so far are complete and a "
              "re-run resumes.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
