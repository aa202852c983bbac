"""Pre-registered hypotheses of an experiment file and their verdicts.

An experiment file may name its hypotheses before it is run (docs/experiment.md, "The
pre-registered design")::

    hypotheses:
      evaluation: linear            # default: the first evaluation
      metric: balanced_accuracy     # default: that evaluation's primary metric
      margin: 0.02                  # "equivalent" inside ±margin; the target CI half-width
      tests:
        - {name: H1, strategy: region-80-40, against: random-60}
        - {name: H5, strategy: region-80-40-gt, against: region-80-40}

Each test is a paired comparison over seeds: d_s = metric(strategy, s) − metric(against, s),
its mean and Student-t 95% CI (:mod:`mwm.experiment.stats`). The verdict follows from the
CI alone, by the rule written before the run:

* **better**: the CI lies above 0; **worse**: below 0 (these come first: a CI inside
  ±margin that excludes 0 is better or worse, however small the effect);
* **equivalent**: the CI contains 0 and lies inside ±margin (a 95% CI, stricter than the
  90% one of two one-sided tests);
* **inconclusive**: none of these. When the CI is wider than ±margin, the seeds a CI of
  ±margin would need at this spread are given (``seeds_needed``);
* **no interval**: fewer than two paired seeds.

For a distance such as HD95 "better" still means a positive Δ; name such metrics only with
that in mind.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import DataError
from .stats import finite, n_for_half_width, paired_summary

DEFAULT_MARGIN = 0.02
VERDICTS = ("better", "worse", "equivalent", "inconclusive", "no interval")
KEYS = {"evaluation", "metric", "margin", "tests"}
TEST_KEYS = {"name", "strategy", "against"}


@dataclass(frozen=True)
class Hypothesis:
    name: str
    strategy: str
    against: str


@dataclass
class Hypotheses:
    evaluation: str
    metric: str
    margin: float = DEFAULT_MARGIN
    tests: list[Hypothesis] = field(default_factory=list)


def parse_hypotheses(raw, evaluations: dict[str, tuple[str, tuple]], strategies: list[str],
                     source: str) -> Hypotheses | None:
    """The ``hypotheses`` section, checked against the file's evaluations (name → (primary,
    metrics)) and strategy names; None when the file has none."""
    if raw is None:
        return None
    where = f"{source}: hypotheses"
    if not isinstance(raw, dict) or not isinstance(raw.get("tests"), list) or not raw["tests"]:
        raise DataError(f"{where} must be a mapping with a non-empty 'tests' list "
                        "(docs/experiment.md).")
    unknown = sorted(set(raw) - KEYS)
    if unknown:
        raise DataError(f"{where}: unknown key(s) {unknown}; accepted: {sorted(KEYS)}.")
    if not evaluations:
        raise DataError(f"{where} need an evaluation to test on; the file has none.")
    evaluation = str(raw.get("evaluation", next(iter(evaluations))))
    if evaluation not in evaluations:
        raise DataError(f"{where}: evaluation {evaluation!r} is not one of {sorted(evaluations)}.")
    primary, metrics = evaluations[evaluation]
    metric = str(raw.get("metric", primary))
    if metric not in metrics:
        raise DataError(f"{where}: evaluation {evaluation!r} reports {list(metrics)}, "
                        f"not {metric!r}.")
    margin = raw.get("margin", DEFAULT_MARGIN)
    if not finite(margin) or margin <= 0:
        raise DataError(f"{where}: margin must be a positive number, got {margin!r}.")
    tests = [_test(item, strategies, where) for item in raw["tests"]]
    names = [t.name for t in tests]
    if len(set(names)) != len(names):
        raise DataError(f"{where}: test names must be unique, got {names}.")
    return Hypotheses(evaluation, metric, float(margin), tests)


def _test(item, strategies: list[str], where: str) -> Hypothesis:
    if not isinstance(item, dict) or set(item) != TEST_KEYS:
        raise DataError(f"{where}: each test needs exactly {sorted(TEST_KEYS)}, got {item!r}.")
    for key in ("strategy", "against"):
        if item[key] not in strategies:
            raise DataError(f"{where}: test {item['name']!r}: {key} {item[key]!r} is not a "
                            f"strategy ({strategies}).")
    if item["strategy"] == item["against"]:
        raise DataError(f"{where}: test {item['name']!r} compares {item['strategy']!r} "
                        "with itself.")
    return Hypothesis(str(item["name"]), str(item["strategy"]), str(item["against"]))


def verdict(delta: float | None, half: float | None, margin: float) -> str:
    """The decision rule (module docstring) for a Δ and its CI half-width."""
    if delta is None or half is None or not finite(delta) or not finite(half):
        return "no interval"
    low, high = delta - half, delta + half
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    if -margin <= low and high <= margin:
        return "equivalent"
    return "inconclusive"


def judge_hypotheses(hypotheses: Hypotheses | None, cells: list[dict]) -> list[dict]:
    """Each test's paired Δ over the seeds both strategies finished, its CI and verdict
    (``cells``: the experiment's cell rows, metrics as ``<evaluation>_<metric>``)."""
    if hypotheses is None:
        return []
    key = f"{hypotheses.evaluation}_{hypotheses.metric}"
    by_strategy: dict[str, dict[int, float]] = {}
    for row in cells:
        if finite(row.get(key)):
            by_strategy.setdefault(row["strategy"], {})[row["seed"]] = row[key]
    return [_judge_one(t, by_strategy, hypotheses, key) for t in hypotheses.tests]


def _judge_one(test: Hypothesis, by_strategy: dict, hypotheses: Hypotheses, key: str) -> dict:
    mine, theirs = by_strategy.get(test.strategy, {}), by_strategy.get(test.against, {})
    seeds = sorted(set(mine) & set(theirs))
    paired = paired_summary([mine[s] - theirs[s] for s in seeds])
    delta, sd, half = paired["delta"], paired["delta_std"], paired["delta_ci"]
    result = {"name": test.name, "strategy": test.strategy, "against": test.against,
              "evaluation": hypotheses.evaluation, "metric": hypotheses.metric,
              "margin": hypotheses.margin, "seeds": seeds, "delta": delta,
              "delta_std": sd, "delta_ci": half,
              "low": None if half is None else delta - half,
              "high": None if half is None else delta + half,
              "verdict": verdict(delta, half, hypotheses.margin), "seeds_needed": None}
    if result["verdict"] == "inconclusive" and half > hypotheses.margin:
        result["seeds_needed"] = n_for_half_width(sd, hypotheses.margin)
    return result
