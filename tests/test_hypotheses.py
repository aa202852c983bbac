"""Pre-registered hypotheses: parsing, the decision rule, and their table in results.md."""

import pytest

from mwm.data.io import DataError
from mwm.experiment import parse_experiment
from mwm.experiment.hypotheses import judge_hypotheses, verdict
from mwm.report.tables import results_markdown

STRATEGIES = [{"name": "random-60", "masking": "random", "ratio": 0.6},
              {"name": "region", "masking": "region", "ratio_salient": 0.8,
               "ratio_background": 0.4, "regions": "ground_truth"}]
RAW = {"name": "h", "data": {"phantoms": {"n": 20}}, "pretrain": {"epochs": 1},
       "evaluate": [{"name": "linear", "task": "linear-probe"}], "seeds": [0, 1, 2],
       "strategies": STRATEGIES}
TESTS = [{"name": "H1", "strategy": "region", "against": "random-60"}]


def parsed(**hypotheses):
    return parse_experiment({**RAW, "hypotheses": {"tests": TESTS, **hypotheses}}, "exp.yaml")


@pytest.mark.parametrize("delta, half, expected", [
    (0.05, 0.01, "better"), (-0.05, 0.01, "worse"), (0.005, 0.01, "equivalent"),
    (0.0, 0.03, "inconclusive"), (0.015, 0.01, "better"),  # CI [0.005, 0.025]
    (0.01, 0.015, "inconclusive"),  # CI [-0.005, +0.025]: crosses 0, leaves ±0.02
    (0.03, 0.03, "inconclusive"),  # touches 0: not above it
    (0.01, None, "no interval"), (None, None, "no interval")])
def test_the_decision_rule(delta, half, expected):
    assert verdict(delta, half, 0.02) == expected


def test_defaults_are_the_first_evaluation_and_its_primary():
    found = parsed().hypotheses
    assert (found.evaluation, found.metric, found.margin) == ("linear", "accuracy", 0.02)
    assert parsed(metric="balanced_accuracy", margin=0.05).hypotheses.metric == "balanced_accuracy"


@pytest.mark.parametrize("change, message", [
    ({"metric": "dice"}, "reports"),
    ({"evaluation": "seg"}, "is not one of"),
    ({"margin": 0}, "positive number"),
    ({"tests": []}, "non-empty 'tests'"),
    ({"tests": [{"name": "H1", "strategy": "region", "against": "random-70"}]}, "not a strategy"),
    ({"tests": [{"name": "H1", "strategy": "region", "against": "region"}]}, "with itself"),
    ({"tests": [{"name": "H1", "strategy": "region"}]}, "exactly"),
    ({"tests": TESTS * 2}, "unique"),
    ({"alpha": 0.05}, "unknown key"),
])
def test_hypothesis_errors_name_the_problem(change, message):
    with pytest.raises(DataError, match=message):
        parsed(**change)


def cells(diffs, metric=0.5):
    rows = []
    for seed, d in enumerate(diffs):
        rows.append({"strategy": "random-60", "seed": seed, "linear_accuracy": metric})
        rows.append({"strategy": "region", "seed": seed, "linear_accuracy": metric + d})
    return rows


def test_paired_difference_interval_and_verdict_by_hand():
    found, = judge_hypotheses(parsed().hypotheses, cells([0.04, 0.05, 0.06]))
    # mean 0.05, sd 0.01, t(0.975, 2) = 4.3027: half-width 0.02484
    assert found["delta"] == pytest.approx(0.05)
    assert found["delta_ci"] == pytest.approx(4.302653 * 0.01 / 3 ** 0.5, rel=1e-5)
    assert found["verdict"] == "better" and found["seeds"] == [0, 1, 2]
    assert found["seeds_needed"] is None  # wider than ±0.02, but it excludes 0: decided


def test_an_unpowered_comparison_is_inconclusive_with_the_seeds_it_needs():
    found, = judge_hypotheses(parsed().hypotheses, cells([0.05, -0.05, 0.01]))
    # mean 0.00333, sd 0.05033: t(0.975, n-1)·sd/√n <= 0.02 first at n = 27
    assert found["verdict"] == "inconclusive" and found["seeds_needed"] == 27
    unpaired = cells([0.01, 0.02, 0.03])[:3]  # random-60 seeds 0, 1 and region seed 0: one pair
    found, = judge_hypotheses(parsed().hypotheses, unpaired)
    assert found["seeds"] == [0] and found["verdict"] == "no interval"


def test_cells_run_seed_by_seed():
    from mwm.experiment import cells_of

    keys = [cell.key for cell in cells_of(parsed())]
    assert keys == ["random-60/seed0", "region/seed0", "random-60/seed1", "region/seed1",
                    "random-60/seed2", "region/seed2"]


def test_results_without_hypotheses_have_no_such_section():
    results = {"strategies": [], "evaluations": [], "seeds": [0], "missing": []}
    assert "hypotheses" not in results_markdown(results)
    one_seed = judge_hypotheses(parsed().hypotheses, cells([0.05]))
    text = results_markdown({**results, "hypotheses": one_seed})
    line = next(row for row in text.splitlines() if row.startswith("| H1 "))
    assert "no interval" in line and "| +0.050 ± 0.000 | – |" in line


def test_results_markdown_shows_the_verdicts():
    results = {"strategies": [], "evaluations": [], "seeds": [0, 1, 2], "missing": [],
               "hypotheses": judge_hypotheses(parsed().hypotheses, cells([0.0, 0.05, -0.05]))}
    text = results_markdown(results)
    assert "## Pre-registered hypotheses" in text
    line = next(row for row in text.splitlines() if row.startswith("| H1 "))
    assert "inconclusive (CI ±" in line and "seeds needed" in line and "linear accuracy" in line
    assert "inside ±0.02" in text
