"""``mwm experiment``: a grid of masking strategies x seeds, pretrained and evaluated alike."""

from .config import ExperimentConfig, Strategy, load_experiment, parse_experiment
from .run import Cell, Shard, cells_of, run_experiment, shard_from

__all__ = ["Cell", "ExperimentConfig", "Shard", "Strategy", "cells_of", "load_experiment",
           "parse_experiment", "run_experiment", "shard_from"]
