"""The grid of an experiment: cells (strategy x seed), their folders and fingerprints, and
the shards (processes) that split them round-robin.

A cell's work has two levels, each fingerprinted on its own so that a rerun redoes only
what changed: the pretraining (strategy, seed, data, regions, ``pretrain`` settings; not
the evaluations) and each evaluation (its resolved settings + the pretraining's
fingerprint). The cell's fingerprint combines them and marks a complete ``cell.json``.
A matched ratio (``ratio: {match: NAME}``) enters the pretraining's fingerprint as the
number it resolved to, so other regions that give another ratio rerun the cell.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..engine import Dist
from ..errors import DataError
from .config import NO_PRETRAINING, ExperimentConfig, Strategy, task_of

CELL_FILE = "cell.json"


@dataclass(frozen=True)
class Cell:
    strategy: Strategy
    seed: int

    @property
    def key(self) -> str:
        return f"{self.strategy.name}/seed{self.seed}"

    def folder(self, run: Path) -> Path:
        return run / "cells" / self.strategy.name / f"seed{self.seed}"

    def eval_folder(self, run: Path, evaluation: str) -> Path:
        return self.folder(run) / f"eval_{evaluation}"


@dataclass
class Shard:
    index: int = 0
    count: int = 1
    device: str = "auto"

    @property
    def main(self) -> bool:
        return self.index == 0


def cells_of(config: ExperimentConfig) -> list[Cell]:
    """Seed by seed, every strategy of a seed before the next seed: the cells finished when
    a run is stopped early are whole seeds, so their differences are still paired."""
    return [Cell(strategy, seed) for seed in config.seeds for strategy in config.strategies]


def pretrain_fingerprint(config: ExperimentConfig, cell: Cell) -> str:
    """What the cell's encoder depends on: never the evaluations, so adding or changing one
    reuses the pretraining. A cell without pretraining depends on its seed and data only."""
    strategy = cell.strategy
    if not strategy.pretrains:
        return config.fingerprint(NO_PRETRAINING, cell.seed, config.train_data)
    if not strategy.resolved:  # a matched ratio is part of the settings: resolve it first
        raise ValueError(f"strategy {strategy.name}: its ratio matches {strategy.match!r} and "
                         "is not resolved yet (mwm.experiment.matched.resolve_matched)")
    regions = ((strategy.regions, config.localize, config.train_data) if strategy.reads_regions
               else None)
    return config.fingerprint(strategy.masking, strategy.params, regions, config.pretrain,
                              cell.seed, config.train_data)


def eval_settings(config: ExperimentConfig, item: dict) -> dict:
    """The settings an ``evaluate`` entry runs with: the pretraining's architecture and
    input size unless the entry says otherwise, the task's fixed ones, then the entry's."""
    from ..config import default_of
    from ..pretrain.config import PretrainConfig

    task = task_of(item)
    inherited = {k: config.pretrain.get(k, default_of(PretrainConfig, k)) for k in task.inherits}
    return {**inherited, **task.fixed, **{k: v for k, v in item.items() if k not in ("name", "task")}}


def eval_fingerprint(config: ExperimentConfig, cell: Cell, item: dict) -> str:
    held_out = config.held_out_phantoms  # None: the data's own splits
    return config.fingerprint(pretrain_fingerprint(config, cell), task_of(item).name,
                              eval_settings(config, item), cell.seed,
                              *([held_out] if held_out else []))


def cell_fingerprint(config: ExperimentConfig, cell: Cell) -> str:
    """The pretraining's and every evaluation's fingerprint: a ``cell.json`` carrying it is
    complete for these settings."""
    return config.fingerprint(pretrain_fingerprint(config, cell),
                              {item["name"]: eval_fingerprint(config, cell, item)
                               for item in config.evaluate})


def shard_from(spec: str | None, device: str, env: Dist | None = None) -> Shard:
    """``K/N`` from the command line, else torchrun's ranks (``env``, read by the entry
    point), else a single process. Each cell trains in one process on its own device, never
    as one DDP job across the shards: the entry point leaves torchrun's process group out
    (:func:`mwm.runtime.detach_from_torchrun`)."""
    if spec:
        try:
            index, count = (int(part) for part in spec.split("/"))
        except ValueError:
            raise DataError(f"--shard {spec!r}: expected K/N, e.g. 0/4.") from None
        if not 0 <= index < count:
            raise DataError(f"--shard {spec}: K must be in 0..N-1.")
        return Shard(index, count, device)
    if env is None or env.world == 1:
        return Shard(0, 1, device)
    if device == "auto":
        import torch

        device = f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu"
    return Shard(env.rank, env.world, device)
