"""Run an experiment: shared preparation, then one cell per (strategy, seed), then results.

A cell pretrains an encoder with its strategy's masking (none for ``scratch``) and runs
every evaluation on it. It ends by writing ``cells/<strategy>/seed<k>/cell.json`` with a
fingerprint of every setting it used; a rerun skips finished cells with the same
fingerprint, deletes and recomputes cells made with other settings, and resumes an
interrupted cell from its pretraining checkpoint.

Several processes (``torchrun --nproc_per_node G mwm experiment ...`` or ``--shard K/N``)
split the cells round-robin, one cell at a time per process; rank 0 prepares the shared
stages and the others wait for its stamp. Whoever finishes last has every cell and writes
the complete results; a partial table lists the cells still missing.
"""

from __future__ import annotations

import csv
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import opt
from ..errors import DataError
from ..files import read_json_or_none, write_json
from .config import ExperimentConfig, task_of
from .grid import CELL_FILE, Cell, Shard, cells_of
from .prepare import Prepared, prepare

PREPARED_FILE = "prepared.json"


@dataclass(kw_only=True)
class ExperimentRunConfig:
    """Settings of ``mwm experiment`` (the experiment itself is its YAML file)."""

    experiment: str = opt(help="experiment file (see configs/ and docs/experiment.md)",
                          positional=True, metavar="EXPERIMENT.yaml")
    out: str | None = opt(None, "output folder (default: runs/<name>)")
    shard: str | None = opt(None, "run every N-th cell starting at K (one process per GPU; "
                            "automatic under torchrun)", metavar="K/N")
    report: bool = opt(True, "write report.html")
    workers: int | None = opt(None, "processes for phantom generation (default: every core) "
                              "and data-loader workers of the cells (default: 0)", low=0)
    device: str = opt("auto", "cpu, cuda, cuda:N or auto (a GPU if there is one)")
    quiet: bool = opt(False, "no progress bars")


def run_experiment(config: ExperimentConfig, run: Path, *, shard: Shard | None = None,
                   workers: int | None = None, quiet: bool = False, log=print) -> dict:
    """Prepare, run this shard's cells, and write the results; return the results dict.

    ``workers``: processes for phantom generation (None: every core) and data-loader
    workers of the cells (None: 0, loading in the training process, the fastest choice on
    a small CPU; an experiment file's ``pretrain.workers`` / ``evaluate[].workers`` win).
    """
    from .results import write_results

    shard = shard or Shard()
    run.mkdir(parents=True, exist_ok=True)
    prepared = _prepared(config, run, shard, workers, quiet, log)
    cells = cells_of(config)
    mine = cells[shard.index::shard.count]
    failures = []
    for number, cell in enumerate(mine, 1):
        log(f"cell {number}/{len(mine)}: {cell.key}")
        try:
            run_cell(config, cell, run, prepared, shard.device, workers or 0, quiet, log)
        except (DataError, FloatingPointError, RuntimeError, ValueError) as err:
            failures.append(f"{cell.key}: {err}")
            log(f"cell {cell.key} FAILED: {err}")
    results = write_results(config, run, cells, prepared)
    results["failures"] = failures
    return results


def _prepared(config, run: Path, shard: Shard, workers: int, quiet: bool, log) -> Prepared:
    """Rank 0 prepares; the others wait for its stamp for these data/localize settings."""
    stamp = run / PREPARED_FILE
    settings = config.fingerprint(config.data, config.localize)
    if shard.main:
        write_json(stamp, {"status": "preparing", "settings": settings})
        prepared = prepare(config, run, workers=workers, quiet=quiet, log=log)
        paths = {k: str(v) if isinstance(v, Path) else v for k, v in prepared.__dict__.items()}
        write_json(stamp, {"status": "ready", "settings": settings, "prepared": paths})
        return prepared
    log(f"shard {shard.index}: waiting for rank 0 to prepare the data and regions ({stamp})")
    while True:
        saved = read_json_or_none(stamp) or {}
        if saved.get("status") == "ready" and saved.get("settings") == settings:
            break
        time.sleep(5)
    return Prepared(**{k: Path(v) if isinstance(v, str) else v
                       for k, v in saved["prepared"].items()})


def cell_fingerprint(config: ExperimentConfig, cell: Cell) -> str:
    regions = None
    if cell.strategy.reads_regions:
        regions = (cell.strategy.regions, config.localize, config.data)
    return config.fingerprint(cell.strategy.masking, cell.strategy.params, regions,
                              config.pretrain, config.evaluate, cell.seed, config.data)


def run_cell(config: ExperimentConfig, cell: Cell, run: Path, prepared: Prepared,
             device: str = "auto", workers: int = 0, quiet: bool = False, log=print) -> dict:
    folder = cell.folder(run)
    fingerprint = cell_fingerprint(config, cell)
    done = read_json_or_none(folder / CELL_FILE)
    if done and done.get("fingerprint") == fingerprint:
        log(f"  up to date: {folder}")
        return done
    if done or (folder.exists() and read_json_or_none(folder / "fingerprint.json") != fingerprint):
        shutil.rmtree(folder)  # made with other settings: recompute, never reuse stale results
    write_json(folder / "fingerprint.json", fingerprint)
    record = {"cell": cell.key, "strategy": cell.strategy.name, "masking": cell.strategy.masking,
              "seed": cell.seed, "fingerprint": fingerprint, "pretrain": None}
    weights = None
    if cell.strategy.pretrains:
        record["pretrain"] = _pretrain(config, cell, folder / "pretrain", prepared, device, workers, quiet)
        weights = record["pretrain"]["encoder"]
        log(f"  pretrained in {record['pretrain']['seconds']:.0f} s, realized mask ratio "
            f"{record['pretrain']['ratio_overall']:.3f}")
    record["evaluations"] = {
        item["name"]: _evaluate(config, item, cell, folder, prepared, weights, device, workers)
        for item in config.evaluate}
    for item in config.evaluate:
        primary = task_of(item).primary
        log(f"  {item['name']}: {primary} {record['evaluations'][item['name']][primary]:.3f}")
    write_json(folder / CELL_FILE, record)
    return record


def _pretrain(config, cell: Cell, out: Path, prepared: Prepared, device: str, workers: int,
              quiet: bool) -> dict:
    from ..pretrain.train import PretrainConfig, pretrain

    strategy = cell.strategy
    regions = (str(prepared.regions_for(strategy.regions)) if strategy.reads_regions
               else None)
    settings = {"workers": workers, **config.pretrain}
    summary = pretrain(PretrainConfig(images=str(prepared.data), out=str(out), regions=regions,
                                      masking=strategy.masking, seed=cell.seed, device=device,
                                      resume="auto", quiet=quiet, **strategy.params, **settings))
    return {"encoder": summary.encoder_path, "steps": summary.steps, "seconds": summary.seconds,
            "final_loss": summary.final_loss, **_realized_ratios(out / "train_log.csv")}


def _realized_ratios(log_csv: Path) -> dict:
    """Mean realized ratios over every logged step (not just the last one)."""
    with log_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    keys = ("ratio_overall", "ratio_salient", "ratio_background", "empty_fraction")
    if not rows:
        return {key: float("nan") for key in keys}
    return {key: sum(float(r[key]) for r in rows) / len(rows) for key in keys}


def _evaluate(config, item: dict, cell: Cell, folder: Path, prepared: Prepared, weights,
              device: str, workers: int) -> dict:
    """Train and score the cell's encoder on one evaluation task (its last evaluation)."""
    from ..config import default_of
    from ..pretrain.config import PretrainConfig
    task = task_of(item)
    # the same architecture and input size as pretraining unless the evaluation says otherwise
    inherited = {k: config.pretrain.get(k, default_of(PretrainConfig, k)) for k in task.inherits}
    settings = {"workers": workers, **inherited, **task.fixed,
                **{k: v for k, v in item.items() if k not in ("name", "task")}}
    return task.run(task.config(data=str(prepared.data), out=str(folder / f"eval_{item['name']}"),
                                weights=weights, seed=cell.seed, device=device, resume="auto",
                                quiet=True, **settings))
