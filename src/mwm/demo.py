"""``mwm demo``: the whole pipeline on synthetic phantoms, offline, in one command.

The demo is a small experiment (:mod:`mwm.experiment`) with one seed and three
strategies, so it leaves exactly the folder layout and report ``mwm experiment`` does:

1. ``data/``          a phantom dataset (images, lesion masks, captions, prompts);
2. ``clip/``          a small CLIP trained from scratch on the train split's captions;
3. ``saliency/``      M2IB saliency maps of each image's prompt;
4. ``regions/``       region masks (k-means, the component with the most saliency);
5. ``localization/``  DSC / NSD of the regions against the lesion masks (test split);
6. ``cells/``         resnet18 pretrained with random masking (60%) and with region-aware
   masking (80% in the region, 40% outside), then linear probes of the lesion class, and
   the same probe on a randomly initialized encoder (``scratch``);
7. ``results.md`` and ``report.html``.

The localizer is a tiny model trained for minutes on a CPU and the pretraining lasts
minutes: the demo shows the pipeline end to end, not the method's accuracy (see
``configs/`` and ``benchmarks/results/`` for measured comparisons).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .experiment import parse_experiment, run_experiment
from .runlog import RunManifest

# (default, --quick): default fits 15 minutes on a 2-core CPU, quick 3 minutes.
SIZES = {"n": (400, 64), "size": (128, 96), "clip_seconds": (180.0, 30.0), "clip_epochs": (12, 3),
         "pretrain_epochs": (8, 2), "probe_epochs": (20, 10)}


def demo_settings(args: argparse.Namespace) -> dict:
    """The demo's sizes: explicit flags win over the default or ``--quick`` preset."""
    column = 1 if args.quick else 0
    return {key: getattr(args, key, None) if getattr(args, key, None) is not None else pair[column]
            for key, pair in SIZES.items()}


def demo_experiment(args: argparse.Namespace) -> dict:
    """The demo's experiment file, as a dict (``mwm experiment`` reads the same keys)."""
    s = demo_settings(args)
    return {
        "name": "demo-quick" if args.quick else "demo",
        "data": {"phantoms": {"modality": args.modality, "n": s["n"], "size": s["size"],
                              "seed": args.seed}},
        "localize": {"prompt": "lesion", "clip": {"seconds": s["clip_seconds"],
                                                  "epochs": s["clip_epochs"]}},
        "pretrain": {"model": "resnet18", "input_size": s["size"] - s["size"] % 32,
                     "epochs": s["pretrain_epochs"], "batch_size": 16, "lr": 2e-3,
                     "warmup_epochs": 1, "amp": "bf16", "checkpoint_every": 100},
        "evaluate": [{"name": "linear", "mode": "linear", "epochs": s["probe_epochs"],
                      "batch_size": 32}],
        "seeds": [args.seed],
        "reference": "random-60",
        "strategies": [{"name": "scratch", "masking": "none"},
                       {"name": "random-60", "masking": "random", "ratio": 0.6},
                       {"name": "region-80-40", "masking": "region", "ratio_salient": 0.8,
                        "ratio_background": 0.4}],
    }


def run_demo(args: argparse.Namespace) -> int:
    from .experiment.results import results_markdown
    from .report.html import write_report

    out = Path(args.out)
    raw = demo_experiment(args)
    config = parse_experiment(raw, source="mwm demo")
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    with RunManifest(out, "demo", {**settings, "experiment": raw}, args.seed) as run:
        results = run_experiment(config, out, workers=args.workers, quiet=args.quiet)
        run.add(results=results["strategies"], localization_dice=results["localization_dice"])
    report = write_report(out)
    print("\n" + results_markdown(results))
    print(f"report: {report}")
    return 1 if results["failures"] else 0
