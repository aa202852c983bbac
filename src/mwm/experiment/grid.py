"""The grid of an experiment: cells (strategy x seed), their folders, and the shards
(processes) that split them round-robin."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..engine import Dist
from ..errors import DataError
from .config import ExperimentConfig, Strategy

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
