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
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from ..files import read_json_or_none, write_json
from .config import ExperimentConfig, Strategy
from .prepare import Prepared, prepare

CELL_FILE = "cell.json"
PREPARED_FILE = "prepared.json"
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


@dataclass(frozen=True)
class Cell:
    strategy: Strategy
    seed: int

    @property
    def key(self) -> str:
        return f"{self.strategy.name}/seed{self.seed}"

    def folder(self, run: Path) -> Path:
        return run / "cells" / self.strategy.name / f"seed{self.seed}"


@dataclass
class Shard:
    index: int = 0
    count: int = 1
    device: str = "auto"

    @property
    def main(self) -> bool:
        return self.index == 0


def cells_of(config: ExperimentConfig) -> list[Cell]:
    return [Cell(strategy, seed) for strategy in config.strategies for seed in config.seeds]


def shard_from(spec: str | None, device: str) -> Shard:
    """``K/N`` from the command line, else torchrun's RANK/WORLD_SIZE, else a single process.

    Under torchrun the variables are removed afterwards: each cell trains in one process
    on its own device, never as one DDP job across the shards.
    """
    if spec:
        try:
            index, count = (int(part) for part in spec.split("/"))
        except ValueError:
            raise DataError(f"--shard {spec!r}: expected K/N, e.g. 0/4.") from None
        if not 0 <= index < count:
            raise DataError(f"--shard {spec}: K must be in 0..N-1.")
        return Shard(index, count, device)
    if "WORLD_SIZE" not in os.environ:
        return Shard(0, 1, device)
    index, count = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", index))
    for name in TORCHRUN_VARS:
        os.environ.pop(name, None)
    if device == "auto":
        import torch

        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    return Shard(index, count, device)


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
    for name, result in record["evaluations"].items():
        log(f"  {name}: accuracy {result['accuracy']:.3f}")
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
    from ..downstream.classify import FinetuneConfig, finetune

    # the same architecture and input size as pretraining unless the evaluation says otherwise
    settings = {"workers": workers, "model": config.pretrain.get("model", "resnet50"),
                "input_size": config.pretrain.get("input_size", 224),
                **{k: v for k, v in item.items() if k != "name"}}
    summary = finetune(FinetuneConfig(data=str(prepared.data), out=str(folder / f"eval_{item['name']}"),
                                      weights=weights, seed=cell.seed, device=device,
                                      resume="auto", quiet=True, **settings))
    # the last epoch on the eval split: no model selection happened on it, so it is not
    # optimistically biased the way the best epoch would be
    metrics = summary["last"]["metrics"]
    return {"split": summary["eval_split"], "epochs": summary["epochs_done"],
            "seconds": summary["seconds"],
            **{k: metrics[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "auroc") if k in metrics}}
