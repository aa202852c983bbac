"""``mwm experiment``: a grid of masking strategies x seeds, pretrained and evaluated alike
on every evaluation task (:data:`mwm.downstream.tasks.TASKS`)."""

from .config import ExperimentConfig, Strategy, load_experiment, parse_experiment
from .grid import Cell, Shard, cells_of, shard_from
from .run import run_experiment

__all__ = ["Cell", "ExperimentConfig", "Shard", "Strategy", "cells_of", "load_experiment",
           "parse_experiment", "run_experiment", "shard_from"]
