"""The masking-strategy experiment, run and written up for benchmarks/results/.

    python benchmarks/bench_experiment.py --config configs/phantom-brain-mri.yaml --out runs/phantom
    python benchmarks/bench_experiment.py --out runs/phantom --collect-only   # a finished run

Runs `mwm experiment` (unless --collect-only), samples the load average every minute
while it runs, then writes benchmarks/results/experiment.md (the table, the wall time,
the load, and a plain statement of how each region-aware strategy compared with the
reference) and copies each evaluation's plot (plots/<evaluation>.png) to
benchmarks/results/experiment.png (one evaluation) or experiment-<evaluation>.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_result  # noqa: E402


def sample_load(stop: threading.Event, samples: list, every: float = 60.0) -> None:
    while not stop.is_set():
        samples.append(os.getloadavg()[0])
        stop.wait(every)


def run(config: str, out: str) -> tuple[int, list[float]]:
    samples: list[float] = []
    stop = threading.Event()
    thread = threading.Thread(target=sample_load, args=(stop, samples), daemon=True)
    thread.start()
    code = subprocess.call([sys.executable, "-m", "mwm.cli", "experiment", config, "--out", out,
                            "--quiet"])
    stop.set()
    thread.join()
    return code, samples


def comparisons(results: dict) -> list[str]:
    """One plain sentence per strategy against the reference, per evaluation."""
    lines = []
    reference = results["reference"]
    for e in results["evaluations"]:
        for row in results["strategies"]:
            if row["strategy"] == reference or math.isnan(row[f"{e}_delta"]):
                continue
            delta, spread = row[f"{e}_delta"], row[f"{e}_delta_std"]
            verdict = ("within the seed-to-seed spread" if abs(delta) <= spread
                       else ("better" if delta > 0 else "worse"))
            lines.append(f"- {row['strategy']} vs {reference} ({e}): Δ accuracy {delta:+.3f} ± "
                         f"{spread:.3f} over {row['n_seeds']} paired seeds: {verdict}.")
    return lines


def wall_minutes(run_dir: Path) -> str:
    manifest = json.loads((run_dir / "run_manifest.json").read_text())
    start = datetime.datetime.fromisoformat(manifest["start_time"])
    end = datetime.datetime.fromisoformat(manifest["end_time"]) if manifest.get("end_time") else None
    return f"{(end - start).total_seconds() / 60:.1f} min" if end else "unfinished"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/phantom-brain-mri.yaml")
    parser.add_argument("--out", required=True, help="the experiment's run folder")
    parser.add_argument("--collect-only", action="store_true", help="write up a finished run")
    parser.add_argument("--load-log", help="a file of load samples (one 'time load ...' per line) "
                        "recorded while a --collect-only run was made")
    args = parser.parse_args()
    run_dir = Path(args.out)
    samples: list[float] = []
    if not args.collect_only:
        code, samples = run(args.config, args.out)
        print(f"mwm experiment exited with {code}")
    elif args.load_log:
        samples = [float(line.split()[1]) for line in Path(args.load_log).read_text().splitlines()
                   if len(line.split()) > 1]
    results = json.loads((run_dir / "results.json").read_text())
    evals = results["evaluations"]
    plots = {e: "experiment.png" if len(evals) == 1 else f"experiment-{e}.png" for e in evals}
    for e, name in plots.items():
        shutil.copyfile(run_dir / "plots" / f"{e}.png", RESULTS / name)
    load = (f"1-min load average while it ran: min {min(samples):.1f}, median "
            f"{sorted(samples)[len(samples) // 2]:.1f}, max {max(samples):.1f} over {len(samples)} "
            "samples (above 2 = other jobs shared the 2 cores)" if samples else "load not sampled")
    body = "\n".join([
        f"Experiment `{results['name']}` — wall time {wall_minutes(run_dir)}; {load}.", "",
        (run_dir / "results.md").read_text(), "## Comparisons (computed)", "",
        *comparisons(results), "",
        *[f"![{e}: {results['primary'][e]} vs mask ratio]({name})" for e, name in plots.items()],
        ""])
    write_result("experiment", "Masking-strategy experiment", body)
    print(body)


if __name__ == "__main__":
    main()
