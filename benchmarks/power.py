"""Power calculation from a finished pilot experiment: the seeds and evaluation images that
hold the 95% confidence interval of every paired difference to a target half-width.

    python benchmarks/power.py runs/pilot --half-width 0.02 \
        --metric linear:balanced_accuracy --metric seg:dice --out benchmarks/results/power.md

For each chosen metric (default: each evaluation's primary), every strategy against every
reference of the run (or ``--reference NAME``, repeatable): the sd of the per-seed paired
differences and the seeds needed; from the cells' per-image files (``predictions.csv`` of
the classification tasks, ``per_image.csv`` of the segmentation tasks) the sampling error
over evaluation images and the images needed. The method is in
:mod:`mwm.experiment.power`. Prints the report; ``--out FILE`` also writes it.
"""

from __future__ import annotations

import argparse
import sys

from mwm.errors import DataError
from mwm.experiment.power import power_analysis, power_markdown
from mwm.files import write_text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished `mwm experiment` folder")
    parser.add_argument("--half-width", type=float, default=0.02,
                        help="target half-width of the 95%% CI (default 0.02)")
    parser.add_argument("--metric", action="append", metavar="[EVALUATION:]METRIC",
                        help="metric to size (repeatable; default: each evaluation's primary)")
    parser.add_argument("--reference", action="append", metavar="STRATEGY",
                        help="compare against this strategy (repeatable; default: the run's)")
    parser.add_argument("--out", metavar="FILE.md", help="also write the report here")
    args = parser.parse_args(argv)
    try:
        analysis = power_analysis(args.run_dir, target=args.half_width, metrics=args.metric,
                                  references=args.reference)
    except DataError as err:
        print(f"power: {err}", file=sys.stderr)
        return 2
    text = power_markdown(analysis)
    print(text)
    if args.out:
        write_text(args.out, text + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
