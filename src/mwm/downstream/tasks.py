"""Downstream evaluation tasks, registered by name: what ``mwm experiment`` scores an encoder on.

A task is one module (``classify``, ``detect``, ...) plus one :data:`TASKS` registration
there: its settings are the fields of its ``config`` dataclass (an experiment's
``evaluate`` entry may set any of them, except those each cell sets and those the task
``fixed``), ``inherits`` names the settings that default to the pretraining's (the same
architecture and input size), ``metrics`` are what it reports (each gets its mean ± std
and paired difference in the results) and ``primary`` the one the overview table and the
plots show. ``run(config)`` trains and evaluates and returns the metrics of the last evaluation (no model selection on the
evaluation split, so they are not optimistically biased).

The task modules register when :mod:`mwm.downstream` is imported.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from ..registry import Registry


@dataclass(frozen=True)
class EvalTask:
    name: str
    help: str
    config: type                          # the settings dataclass
    run: Callable[[Any], dict]            # config → {metric: value, "split", "epochs", "seconds"}
    metrics: tuple[str, ...]
    primary: str
    fixed: dict = field(default_factory=dict)
    inherits: tuple[str, ...] = ("model", "input_size")

    def settings(self) -> set[str]:
        """The names an ``evaluate`` entry may set for this task."""
        return {f.name for f in dataclasses.fields(self.config)} - set(self.fixed)


TASKS: Registry[EvalTask] = Registry("evaluation task")


def register_task(task: EvalTask) -> EvalTask:
    if task.primary not in task.metrics:
        raise ValueError(f"task {task.name!r}: primary metric {task.primary!r} is not reported")
    return TASKS.register(task.name, task)
