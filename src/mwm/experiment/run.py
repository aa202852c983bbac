"""Run an experiment: shared preparation, then one cell per (strategy, seed), then results.

A cell pretrains an encoder with its strategy's masking (none for ``scratch``) and runs
every evaluation on it. Each level is resumable on its own (fingerprints:
:mod:`mwm.experiment.grid`):

* ``cells/<strategy>/seed<k>/fingerprint.json`` names the pretraining settings; a cell
  folder made with other ones is deleted whole (everything in it depends on the encoder).
  ``pretrain.json`` is written when the pretraining has finished and is reused as it is;
  an interrupted pretraining resumes from its checkpoint.
* ``eval_<name>/fingerprint.json`` names the evaluation's settings (with the
  pretraining's); ``eval_<name>/evaluation.json`` holds its metrics once it has finished.
  A rerun reuses a finished evaluation with the same fingerprint, resumes an interrupted
  one, and deletes and recomputes one made with other settings (never mixing the two), so
  adding or changing an ``evaluate`` entry reruns only that evaluation.
* ``cell.json`` is written when every evaluation of the cell is done, with the combined
  fingerprint; a rerun skips such a cell without opening anything else.

A strategy with ``ratio: {match: NAME}`` gets its ratio from the prepared regions before
any cell runs (:mod:`mwm.experiment.matched`; every process computes the same number).

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
from .grid import (
    CELL_FILE,
    Cell,
    Shard,
    cell_fingerprint,
    cells_of,
    eval_fingerprint,
    eval_settings,
    pretrain_fingerprint,
)
from .matched import resolve_matched
from .prepare import Prepared, localizer_name, prepare

PREPARED_FILE = "prepared.json"
POLL_SECONDS = 5  # how often a waiting shard reads rank 0's stamp
FINGERPRINT_FILE = "fingerprint.json"   # written before the work, so a resume can trust it
PRETRAIN_FILE = "pretrain.json"         # a finished pretraining's record
EVAL_FILE = "evaluation.json"           # a finished evaluation's metrics


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
    config = resolve_matched(config, prepared, log)  # ratio: {match: NAME}, from the regions
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
    """Rank 0 prepares; the others wait for its stamp for these data/localize settings and
    this localizer (:func:`localizer_identity`)."""
    stamp = run / PREPARED_FILE
    settings = config.fingerprint(config.data, config.localize)
    if shard.main:
        write_json(stamp, {"status": "preparing", "settings": settings})
        prepared = prepare(config, run, workers=workers, quiet=quiet, log=log)
        paths = {k: str(v) if isinstance(v, Path) else v for k, v in prepared.__dict__.items()}
        write_json(stamp, {"status": "ready", "settings": settings,
                           "localizer": localizer_identity(config, run), "prepared": paths})
        return prepared
    log(f"shard {shard.index}: waiting for rank 0 to prepare the data and regions ({stamp})")
    while True:
        saved = read_json_or_none(stamp) or {}
        if (saved.get("status") == "ready" and saved.get("settings") == settings
                and saved.get("localizer") == localizer_identity(config, run)):
            break
        time.sleep(POLL_SECONDS)
    return Prepared(**{k: Path(v) if isinstance(v, str) else v
                       for k, v in saved["prepared"].items()})


def localizer_identity(config, run: Path) -> list | None:
    """What a saliency map's fingerprint names besides the settings: the localizer (a
    trained CLIP by the contents of ``RUN/clip``) and the algorithm's version. A 'ready'
    stamp left by an earlier run with another localizer (an older version, another CLIP)
    is stale: rank 0 is about to redo the maps, so the other shards wait for its new stamp
    instead of reading regions that are being rewritten."""
    if not config.needs_localization():
        return None
    from ..localize.pipeline import ALGORITHM_VERSION, model_identity

    return [model_identity(localizer_name(config, run)), ALGORITHM_VERSION]


def run_cell(config: ExperimentConfig, cell: Cell, run: Path, prepared: Prepared,
             device: str = "auto", workers: int = 0, quiet: bool = False, log=print) -> dict:
    folder = cell.folder(run)
    fingerprint = cell_fingerprint(config, cell)
    done = read_json_or_none(folder / CELL_FILE)
    if done and done.get("fingerprint") == fingerprint:
        log(f"  up to date: {folder}")
        return done
    if done:
        (folder / CELL_FILE).unlink()  # other evaluations: no stale cell.json while they run
    encoder_settings = pretrain_fingerprint(config, cell)
    if folder.exists() and read_json_or_none(folder / FINGERPRINT_FILE) != encoder_settings:
        shutil.rmtree(folder)  # another pretraining: recompute, never reuse stale results
    write_json(folder / FINGERPRINT_FILE, encoder_settings)
    record = {"cell": cell.key, "strategy": cell.strategy.name, "masking": cell.strategy.masking,
              "seed": cell.seed, "fingerprint": fingerprint,
              "pretrain": _pretrained(config, cell, folder, prepared, device, workers, quiet, log)}
    if cell.strategy.matched is not None:  # the resolved ratio and what it came from
        record["matched"] = cell.strategy.matched
    weights = None
    if record["pretrain"] is not None:  # the cell's own file, wherever the run folder now is
        weights = str(folder / "pretrain" / Path(record["pretrain"]["encoder"]).name)
    record["evaluations"] = {
        item["name"]: _evaluation(config, item, cell, run, prepared, weights, device, workers, log)
        for item in config.evaluate}
    write_json(folder / CELL_FILE, record)
    return record


def _pretrained(config, cell: Cell, folder: Path, prepared: Prepared, device: str, workers: int,
                quiet: bool, log) -> dict | None:
    """The cell's pretraining record: reused when finished with these settings, else run
    (resuming from its checkpoint when it was interrupted)."""
    if not cell.strategy.pretrains:
        return None
    fingerprint = pretrain_fingerprint(config, cell)
    saved = read_json_or_none(folder / PRETRAIN_FILE)
    if (saved and saved.get("fingerprint") == fingerprint
            and (folder / "pretrain" / Path(saved["pretrain"]["encoder"]).name).is_file()):
        log(f"  pretraining reused ({folder / 'pretrain'})")
        return saved["pretrain"]
    summary = _pretrain(config, cell, folder / "pretrain", prepared, device, workers, quiet)
    write_json(folder / PRETRAIN_FILE, {"fingerprint": fingerprint, "pretrain": summary})
    log(f"  pretrained in {summary['seconds']:.0f} s, realized mask ratio "
        f"{summary['ratio_overall']:.3f}")
    return summary


def _evaluation(config, item: dict, cell: Cell, run: Path, prepared: Prepared, weights,
                device: str, workers: int, log) -> dict:
    """One evaluation's metrics: reused when finished with these settings, resumed when
    interrupted, recomputed in a fresh folder when made with other settings."""
    out = cell.eval_folder(run, item["name"])
    fingerprint = eval_fingerprint(config, cell, item)
    primary = task_of(item).primary
    saved = read_json_or_none(out / EVAL_FILE)
    if saved and saved.get("fingerprint") == fingerprint:
        log(f"  {item['name']}: {primary} {_shown(saved['metrics'].get(primary))} (reused)")
        return saved["metrics"]
    if out.exists() and read_json_or_none(out / FINGERPRINT_FILE) != fingerprint:
        shutil.rmtree(out)  # other settings: never mix their files with these
    write_json(out / FINGERPRINT_FILE, fingerprint)
    metrics = _evaluate(config, item, cell, out, prepared, weights, device, workers)
    write_json(out / EVAL_FILE, {"evaluation": item["name"], "task": task_of(item).name,
                                 "fingerprint": fingerprint, "metrics": metrics})
    log(f"  {item['name']}: {primary} {_shown(metrics.get(primary))}")
    return metrics


def _shown(value) -> str:
    return "–" if value is None else f"{value:.3f}"


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


def _evaluate(config, item: dict, cell: Cell, out: Path, prepared: Prepared, weights,
              device: str, workers: int) -> dict:
    """Train and score the cell's encoder on one evaluation task (its last evaluation)."""
    task = task_of(item)
    settings = {"workers": workers, **eval_settings(config, item)}
    return task.run(task.config(data=str(prepared.eval_root), out=str(out), weights=weights,
                                seed=cell.seed, device=device, resume="auto", quiet=True,
                                **settings))
