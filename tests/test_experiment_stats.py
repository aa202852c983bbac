"""The experiment's statistics: confidence intervals of paired differences, several
references, the matched-ratio random baseline, per-image predictions and the power
calculation on a hand-made pilot folder."""

import csv
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import t as student_t

from mwm.data.io import DataError
from mwm.experiment import cells_of, parse_experiment
from mwm.experiment.grid import CELL_FILE, cell_fingerprint, pretrain_fingerprint
from mwm.experiment.matched import resolve_matched
from mwm.experiment.prepare import Prepared
from mwm.experiment.results import write_results
from mwm.experiment.stats import ci_half_width, n_for_half_width
from mwm.files import write_csv, write_json, write_png

ROOT = Path(__file__).resolve().parents[1]
LINEAR = {"name": "linear", "task": "linear-probe", "epochs": 1}
RAW = {
    "name": "stats",
    "data": {"images": "unused"},
    "pretrain": {"model": "resnet10t", "input_size": 64, "mask_patch": 16, "decoder_width": 16},
    "evaluate": [LINEAR],
    "seeds": [0, 1, 2],
    "reference": "random-50",
    "strategies": [{"name": "scratch", "masking": "none"},
                   {"name": "random-50", "masking": "random", "ratio": 0.5},
                   {"name": "region-gt", "masking": "region", "ratio_salient": 0.8,
                    "ratio_background": 0.4, "regions": "ground_truth"}],
}
# linear accuracy per strategy and seed: region-gt - random-50 = 0.05, 0.09, 0.04
ACCURACY = {"scratch": [0.30, 0.28, None], "random-50": [0.50, 0.52, 0.47],
            "region-gt": [0.55, 0.61, 0.51]}


def write_cells(run: Path, config, accuracy=ACCURACY) -> None:
    """A cell.json per cell with the current fingerprint (a missing value: no cell)."""
    for cell in cells_of(config):
        value = accuracy[cell.strategy.name][config.seeds.index(cell.seed)]
        if value is None:
            continue
        pre = None if not cell.strategy.pretrains else {
            "ratio_overall": 0.5, "ratio_salient": 0.5, "ratio_background": 0.5,
            "seconds": 1.0, "final_loss": 1.0, "encoder": "encoder.safetensors"}
        write_json(cell.folder(run) / CELL_FILE,
                   {"cell": cell.key, "strategy": cell.strategy.name,
                    "masking": cell.strategy.masking, "seed": cell.seed,
                    "fingerprint": cell_fingerprint(config, cell), "pretrain": pre,
                    "evaluations": {"linear": {"accuracy": value, "balanced_accuracy": value}}})


def t_half(values) -> float:
    return student_t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def md_section(text: str, heading: str) -> tuple[list[str], dict[str, list[str]]]:
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    split = lambda line: [c.strip() for c in line.strip("|").split("|")]
    return split(lines[0]), {split(line)[0]: split(line) for line in lines[1:]}


# --------------------------------------------------------------------------- confidence intervals

def test_paired_delta_has_a_student_t_confidence_interval(tmp_path):
    config = parse_experiment(RAW)
    write_cells(tmp_path, config)
    results = write_results(config, tmp_path, cells_of(config))
    rows = {r["strategy"]: r for r in results["strategies"]}
    diffs = [0.55 - 0.50, 0.61 - 0.52, 0.51 - 0.47]
    stats = rows["region-gt"]["evaluations"]["linear"]["accuracy"]
    assert stats["delta"] == pytest.approx(statistics.fmean(diffs))
    assert stats["delta_std"] == pytest.approx(statistics.stdev(diffs))  # ddof 1, as the CI
    assert stats["delta_ci"] == pytest.approx(t_half(diffs)) == pytest.approx(0.0657, abs=1e-4)
    assert ci_half_width(diffs) == pytest.approx(t_half(diffs))
    # scratch has one paired seed with a value on seed 0 and 1: two pairs; seed 2 is missing
    scratch = rows["scratch"]["evaluations"]["linear"]["accuracy"]
    assert scratch["n_paired"] == 2 and scratch["delta_ci"] == pytest.approx(t_half([-0.2, -0.24]))
    assert rows["random-50"]["evaluations"]["linear"]["accuracy"]["delta_ci"] == 0.0  # itself

    with open(tmp_path / "results.csv", newline="") as handle:
        flat = {r["strategy"]: r for r in csv.DictReader(handle)}
    assert float(flat["region-gt"]["linear_accuracy_delta_ci"]) == pytest.approx(t_half(diffs))
    text = (tmp_path / "results.md").read_text()
    header, table = md_section(text, "linear (task linear-probe, primary metric accuracy)")
    lo, hi = statistics.fmean(diffs) - t_half(diffs), statistics.fmean(diffs) + t_half(diffs)
    assert table["region-gt"][header.index("Δ accuracy 95% CI")] == f"[{lo:+.3f}, {hi:+.3f}]"
    assert table["region-gt"][header.index("Δ accuracy")] == "+0.060 ± 0.026"
    overview = text.splitlines()
    assert "Δ vs random-50 95% CI" in overview[0]
    assert "t(0.975, n − 1)" in text


def test_one_paired_seed_has_no_interval(tmp_path):
    config = parse_experiment({**RAW, "seeds": [0, 5]})
    write_cells(tmp_path, config, {"scratch": [0.3, None], "random-50": [0.5, None],
                                   "region-gt": [0.6, 0.7]})
    results = write_results(config, tmp_path, cells_of(config))
    region = next(r for r in results["strategies"] if r["strategy"] == "region-gt")
    assert region["evaluations"]["linear"]["accuracy"]["n_paired"] == 1
    assert region["evaluations"]["linear"]["accuracy"]["delta_ci"] is None  # never 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["strategies"][2]["evaluations"]["linear"]["accuracy"]["delta_ci"] is None
    with open(tmp_path / "results.csv", newline="") as handle:
        assert next(r for r in csv.DictReader(handle)
                    if r["strategy"] == "region-gt")["linear_accuracy_delta_ci"] == ""
    header, table = md_section((tmp_path / "results.md").read_text(),
                               "linear (task linear-probe, primary metric accuracy)")
    assert table["region-gt"][header.index("Δ accuracy 95% CI")] == "–"


def test_a_single_seed_run_keeps_its_tables(tmp_path):
    """One seed: no interval can exist, so the tables have no CI column (as before)."""
    config = parse_experiment({**RAW, "seeds": [0]})
    write_cells(tmp_path, config, {k: v[:1] for k, v in ACCURACY.items()})
    write_results(config, tmp_path, cells_of(config))
    text = (tmp_path / "results.md").read_text()
    assert "CI" not in text
    assert text.splitlines()[0] == ("| strategy | masking | regions | settings | seeds | realized "
                                    "mask ratio | pretrain s | linear accuracy | Δ vs random-50 |")


def test_several_references_each_get_their_delta(tmp_path):
    config = parse_experiment({**RAW, "reference": ["random-50", "scratch"]})
    assert config.reference == "random-50" and config.references == ["random-50", "scratch"]
    write_cells(tmp_path, config)
    results = write_results(config, tmp_path, cells_of(config))
    assert results["reference"] == "random-50" and results["references"] == ["random-50", "scratch"]
    region = next(r for r in results["strategies"] if r["strategy"] == "region-gt")
    stats = region["evaluations"]["linear"]["accuracy"]
    assert stats["vs"]["random-50"]["delta"] == stats["delta"] == pytest.approx(0.06)
    against_scratch = [0.55 - 0.30, 0.61 - 0.28]  # scratch has no seed 2
    assert stats["vs"]["scratch"]["delta"] == pytest.approx(statistics.fmean(against_scratch))
    assert stats["vs"]["scratch"]["delta_ci"] == pytest.approx(t_half(against_scratch))
    assert region["linear_delta"] == pytest.approx(0.06)  # the first reference's old column
    with open(tmp_path / "results.csv", newline="") as handle:
        flat = next(r for r in csv.DictReader(handle) if r["strategy"] == "region-gt")
    assert float(flat["linear_accuracy_vs_scratch_delta"]) == pytest.approx(0.29)
    assert float(flat["linear_accuracy_vs_random-50_delta_ci"]) == pytest.approx(stats["delta_ci"])
    assert flat["linear_accuracy_vs_scratch_n_paired"] == "2"
    text = (tmp_path / "results.md").read_text()
    assert "Δ vs random-50" in text.splitlines()[0] and "Δ vs scratch 95% CI" in text.splitlines()[0]
    header, table = md_section(text, "linear: Δ vs scratch")
    assert table["region-gt"][header.index("Δ accuracy")] == "+0.290 ± 0.057 (2 of 3 seeds)"


@pytest.mark.parametrize("reference, message", [
    (["random-50", "nope"], "reference 'nope' is not a strategy"),
    (["random-50", "random-50"], "twice"),
    ([1], "strategy name or a list"),
])
def test_reference_list_errors(reference, message):
    with pytest.raises(DataError, match=message):
        parse_experiment({**RAW, "reference": reference}, source="exp.yaml")


def test_sample_sizes_for_a_half_width():
    for sd, target in ((0.02, 0.02), (0.05, 0.02), (0.3, 0.02)):
        n = n_for_half_width(sd, target)
        assert student_t.ppf(0.975, n - 1) * sd / math.sqrt(n) <= target
        assert n == 2 or student_t.ppf(0.975, n - 2) * sd / math.sqrt(n - 1) > target
    assert n_for_half_width(0.02, 0.02) == 7 and n_for_half_width(0.0, 0.02) == 2
    assert n_for_half_width(None, 0.02) is None


# --------------------------------------------------------------------------- matched ratio

def region_set(root: Path, regions: dict[str, np.ndarray]) -> Path:
    """A paired folder: a gray 64 x 64 image per name, its region in masks/."""
    for name, region in regions.items():
        write_png(root / "images" / f"{name}.png", np.full((64, 64), 90, np.uint8))
        write_png(root / "masks" / f"{name}.png", region.astype(np.uint8) * 255)
    return root


def hand_regions() -> dict[str, np.ndarray]:
    """On the 4 x 4 grid of 16-px cells (N = 16), at 0.8 / 0.4 (round half up):"""
    empty = lambda: np.zeros((64, 64), bool)
    one, four, none, half, thin, eight = (empty() for _ in range(6))
    one[:16, :16] = True      # 1 salient cell: 1 + round(15 x 0.4 = 6.0) = 7 masked
    four[:32, :32] = True     # 4: round(3.2) + round(4.8) = 3 + 5 = 8
    # none: empty region, masked at ratio_background overall: round(6.4) = 6
    half[:8, :16] = True      # occupancy exactly 0.5 reaches the threshold: 1 cell, 7
    half[60:, 60:] = True     # a corner at occupancy 1/16 next to it is background
    thin[40:44, 40:44] = True  # 1/16 of one cell, nothing reaches 0.5: the peak cell kept, 7
    eight[:, :32] = True      # 8 cells: round(6.4) + round(3.2) = 6 + 3 = 9
    return {"a_one": one, "b_four": four, "c_none": none, "d_half": half, "e_thin": thin,
            "f_eight": eight}


def matched_config(**changes):
    strategies = [*RAW["strategies"],
                  {"name": "random-matched", "masking": "random", "ratio": {"match": "region-gt"}},
                  {"name": "region-loc", "masking": "region", "ratio_salient": 0.8,
                   "ratio_background": 0.4},
                  {"name": "matched-loc", "masking": "random", "ratio": {"match": "region-loc"}}]
    raw = {**RAW, "localize": {"prompt": "x", "model": "unused"}, "strategies": strategies}
    return parse_experiment({**raw, **changes})


def test_matched_ratio_equals_the_hand_computation(tmp_path):
    data = region_set(tmp_path / "data", hand_regions())
    localized = tmp_path / "regions"
    for name in hand_regions():  # every cell salient: round(16 x 0.8) = 13 of 16
        write_png(localized / f"{name}.png", np.full((64, 64), 255, np.uint8))
    config = matched_config()
    prepared = Prepared(data, data / "masks", None, localized, None)
    lines = []
    resolved = resolve_matched(config, prepared, log=lines.append)
    by_name = {s.name: s for s in resolved.strategies}
    expected = (7 + 8 + 6 + 7 + 7 + 9) / (6 * 16)
    assert by_name["random-matched"].params["ratio"] == expected
    assert by_name["random-matched"].matched == {
        "strategy": "region-gt", "regions": "ground_truth", "ratio": expected, "images": 6,
        "views": 0, "grid": [4, 4], "masked_cells": 44, "grid_ratio": 7 / 16}  # round(16 x 0.4583) = 7
    assert by_name["matched-loc"].params["ratio"] == 13 / 16
    assert any(line.startswith("random-matched: ratio 0.4583") for line in lines)
    assert config.strategies[3].params == {}  # the parsed config is left as it was

    # the resolved ratio is part of the cell's settings: other regions, another cell
    cell = next(c for c in cells_of(resolved) if c.strategy.name == "random-matched")
    with pytest.raises(ValueError, match="not resolved"):
        pretrain_fingerprint(config, next(c for c in cells_of(config) if c.key == cell.key))
    first = pretrain_fingerprint(resolved, cell)
    write_png(data / "masks" / "c_none.png", np.full((64, 64), 255, np.uint8))  # 13 masked
    again = resolve_matched(config, prepared, log=lines.append)
    assert next(s for s in again.strategies if s.name == "random-matched").params["ratio"] == \
        (44 - 6 + 13) / 96
    assert pretrain_fingerprint(again, next(c for c in cells_of(again) if c.key == cell.key)) != first


def test_matched_ratio_over_augmented_views(tmp_path):
    """``views: N``: the crops and flips pretraining draws (seed k mod S, epoch k div S)."""
    import torch

    from mwm.data.layouts import open_dataset
    from mwm.masking import region_masks
    from mwm.pretrain.data import Augment, RegionImageDataset

    data = region_set(tmp_path / "data", hand_regions())
    full = tmp_path / "full"
    for name in hand_regions():
        write_png(full / f"{name}.png", np.full((64, 64), 255, np.uint8))
    strategies = [*RAW["strategies"],
                  {"name": "m", "masking": "random", "ratio": {"match": "region-gt", "views": 3}},
                  {"name": "m0", "masking": "random", "ratio": {"match": "region-gt"}},
                  {"name": "region-loc", "masking": "region", "ratio_salient": 0.8,
                   "ratio_background": 0.4},
                  {"name": "m-loc", "masking": "random", "ratio": {"match": "region-loc", "views": 2}}]
    config = parse_experiment({**RAW, "seeds": [4, 7], "strategies": strategies,
                               "localize": {"prompt": "x", "model": "unused"}})
    resolved = resolve_matched(config, Prepared(data, data / "masks", None, full, None),
                               log=lambda line: None)
    by_name = {s.name: s for s in resolved.strategies}
    samples = open_dataset(data, data / "masks", require_masks=True).samples
    masked = 0
    for seed, epoch in ((4, 0), (7, 0), (4, 1)):
        dataset = RegionImageDataset(samples, 64, augment=Augment(), seed=seed)
        dataset.set_epoch(epoch)
        regions_bhw = torch.stack([dataset[i][1] for i in range(len(dataset))])
        masked += int(region_masks(regions_bhw, 16, 0.8, 0.4).masked_bhw.sum())
    assert by_name["m"].params["ratio"] == masked / (3 * 6 * 16)
    assert by_name["m"].matched["views"] == 3 and by_name["m0"].params["ratio"] == 44 / 96
    assert by_name["m-loc"].params["ratio"] == 13 / 16  # a crop of a full region stays full


def test_matched_ratio_is_recorded_in_the_results(tmp_path):
    data = region_set(tmp_path / "data", hand_regions())
    config = parse_experiment({**RAW, "strategies": [
        *RAW["strategies"],
        {"name": "random-matched", "masking": "random", "ratio": {"match": "region-gt"}}]})
    config = resolve_matched(config, Prepared(data, data / "masks", None, None, None), log=lambda line: None)
    write_cells(tmp_path, config, {**ACCURACY, "random-matched": [0.5, 0.5, 0.5]})
    results = write_results(config, tmp_path, cells_of(config))
    row = next(r for r in results["strategies"] if r["strategy"] == "random-matched")
    assert row["matched"] == "region-gt" and row["matched_ratio"] == pytest.approx(44 / 96)
    assert row["settings"] == "ratio=0.4583 (matched to region-gt)"
    assert results["matched"]["random-matched"]["grid_ratio"] == 7 / 16
    text = (tmp_path / "results.md").read_text()
    assert "random-matched: ratio 0.4583, the mean overall mask ratio region-gt gives the 6 " \
        "train images" in text


@pytest.mark.parametrize("strategy, message", [
    ({"name": "m", "masking": "random", "ratio": {"match": "nope"}},
     r"strategy m: ratio.match 'nope' is not a strategy"),
    ({"name": "m", "masking": "random", "ratio": {"match": "random-50"}},
     r"ratio.match 'random-50' masks without regions \(masking random\)"),
    ({"name": "m", "masking": "random", "ratio": {"match": "scratch"}}, r"ratio.match 'scratch'"),
    ({"name": "m", "masking": "random", "ratio": {"matches": "region-gt"}},
     r"strategy m: ratio must be a number or \{match: STRATEGY\}"),
    ({"name": "m", "masking": "region", "ratio": {"match": "region-gt"}},
     r"strategy m: ratio.match sets the ratio of a masking that takes one"),
    ({"name": "m", "masking": "none", "ratio": {"match": "region-gt"}}, r"masking none has none"),
    ({"name": "m", "masking": "random", "ratio": {"match": "region-gt", "views": -1}},
     r"views: N, N >= 0"),
    ({"name": "m", "masking": "random", "ratio": {"match": "region-gt", "views": 1.5}},
     r"strategy m: ratio must be a number"),
])
def test_matched_ratio_config_errors(strategy, message):
    raw = {**RAW, "strategies": [*RAW["strategies"], strategy]}
    with pytest.raises(DataError, match=message):
        parse_experiment(raw, source="exp.yaml")


def test_a_matched_ratio_cannot_match_a_matched_strategy():
    raw = {**RAW, "strategies": [*RAW["strategies"],
                                 {"name": "b", "masking": "budget", "regions": "ground_truth",
                                  "ratio": {"match": "region-gt"}},
                                 {"name": "m", "masking": "random", "ratio": {"match": "b"}}]}
    with pytest.raises(DataError, match="ratio.match 'b' has a matched ratio itself"):
        parse_experiment(raw, source="exp.yaml")


# --------------------------------------------------------------------------- per-image predictions

def test_linear_probe_writes_its_predictions(tmp_path):
    """predictions.csv holds the last evaluation's outcome per image: its mean is the
    reported accuracy and its per-class recalls the balanced accuracy."""
    from mwm.data.phantoms import generate_phantoms
    from mwm.downstream.classify import FinetuneConfig, finetune

    data = tmp_path / "data"
    generate_phantoms(data, n=24, size=32, seed=0, workers=1, progress=False)
    summary = finetune(FinetuneConfig(data=str(data), out=str(tmp_path / "probe"), mode="linear",
                                      model="resnet10t", input_size=32, epochs=2, batch_size=8,
                                      workers=0, amp="none", quiet=True))
    with open(tmp_path / "probe" / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["split", "image", "label", "predicted", "correct"]
    assert len(rows) == summary["n_eval"] and {r["split"] for r in rows} == {summary["eval_split"]}
    assert all(r["correct"] == str(int(r["label"] == r["predicted"])) for r in rows)
    metrics = summary["last"]["metrics"]
    assert statistics.fmean(int(r["correct"]) for r in rows) == pytest.approx(metrics["accuracy"])
    recalls = [statistics.fmean(int(r["correct"]) for r in rows if r["label"] == c)
               for c in sorted({r["label"] for r in rows})]
    assert statistics.fmean(recalls) == pytest.approx(metrics["balanced_accuracy"])


# --------------------------------------------------------------------------- power calculation

# per seed, 8 validation images: 6 of class "a", 2 of class "b"
LABELS = ["a"] * 6 + ["b"] * 2
CORRECT = {"random": [[1, 0, 1, 0, 1, 0, 0, 1], [1, 1, 0, 0, 1, 0, 0, 0], [0, 1, 1, 0, 1, 1, 0, 0]],
           "region": [[1, 1, 1, 0, 1, 0, 1, 1], [1, 1, 1, 0, 1, 0, 0, 1], [1, 1, 1, 0, 1, 1, 0, 1]]}
SEED_ACCURACY = {"random": [0.55, 0.57, 0.56], "region": [0.60, 0.65, 0.58]}  # d: .05, .08, .02
DICE = {"random": [[0.5, 0.6, 0.7], [0.4, 0.6, 0.6], [0.5, 0.5, 0.7]],   # per image (mean of
        "region": [[0.6, 0.6, 0.9], [0.6, 0.7, 0.6], [0.6, 0.8, 0.7]]}   # its two class rows)


def pilot(root: Path) -> Path:
    """A finished run's files as the experiment and its tasks write them (hand-made)."""
    write_json(root / "results.json", {
        "name": "pilot", "evaluations": ["linear", "seg"],
        "primary": {"linear": "accuracy", "seg": "dice"},
        "metrics": {"linear": ["accuracy", "balanced_accuracy", "macro_f1", "auroc"],
                    "seg": ["dice", "nsd", "hd95"]},
        "reference": "random", "references": ["random"], "seeds": [0, 1, 2],
        "strategies": [{"strategy": "random"}, {"strategy": "region"}]})
    cells = []
    for name in ("random", "region"):
        for seed in range(3):
            cells.append({"strategy": name, "seed": seed,
                          "linear_accuracy": SEED_ACCURACY[name][seed],
                          "linear_balanced_accuracy": SEED_ACCURACY[name][seed],
                          "seg_dice": statistics.fmean(DICE[name][seed]), "seg_hd95": ""})
            folder = root / "cells" / name / f"seed{seed}"
            write_csv(folder / "eval_linear" / "predictions.csv",
                      [{"split": "val", "image": f"im{i}", "label": label,
                        "predicted": label if ok else "x", "correct": ok}
                       for i, (label, ok) in enumerate(zip(LABELS, CORRECT[name][seed]))],
                      ["split", "image", "label", "predicted", "correct"])
            rows = []
            for i, value in enumerate(DICE[name][seed]):
                for split, shift in (("val", 0.0), ("test", 0.3)):  # test rows must be ignored
                    rows += [{"split": split, "image": f"im{i}", "class": c, "present": 1,
                              "dice": value + shift + d, "nsd": 0.5, "hd95": "inf"}
                             for c, d in (("lesion", -0.1), ("edema", 0.1))]
            write_csv(folder / "eval_seg" / "per_image.csv", rows,
                      ["split", "image", "class", "present", "dice", "nsd", "hd95"])
            write_json(folder / "eval_seg" / "evaluation.json", {"metrics": {"split": "val"}})
    write_csv(root / "cells.csv", cells, list(cells[0]))
    return root


def needed(sd: float, target: float) -> int:
    """Brute force: the smallest n >= 2 with t(0.975, n - 1) sd / sqrt(n) <= target."""
    n = 2
    while student_t.ppf(0.975, n - 1) * sd / math.sqrt(n) > target:
        n += 1
    return n


def pooled_sd(per_seed: list[list[float]]) -> float:
    return math.sqrt(statistics.fmean(statistics.variance(d) for d in per_seed))


def test_power_analysis_of_a_hand_made_pilot(tmp_path):
    from mwm.experiment.power import power_analysis

    run = pilot(tmp_path / "run")
    analysis = power_analysis(run, target=0.02, metrics=["linear:accuracy", "balanced_accuracy",
                                                         "dice"])
    rows = {(r["evaluation"], r["metric"]): r for r in analysis["comparisons"]}
    assert {r["strategy"] for r in analysis["comparisons"]} == {"region"}

    accuracy = rows[("linear", "accuracy")]
    seed_diffs = [0.05, 0.08, 0.02]
    assert accuracy["pairs"] == 3 and accuracy["delta"] == pytest.approx(0.05)
    assert accuracy["sd_seeds"] == pytest.approx(0.03)
    assert accuracy["half_width_now"] == pytest.approx(t_half(seed_diffs))
    assert accuracy["seeds_needed"] == needed(0.03, 0.02) == 12
    assert accuracy["seeds_needed_split"] == needed(0.03, 0.02 / math.sqrt(2))
    image_diffs = [np.subtract(CORRECT["region"][s], CORRECT["random"][s]).tolist() for s in range(3)]
    sd = pooled_sd(image_diffs)
    assert accuracy["images"] == 8 and accuracy["sd_image"] == pytest.approx(sd)
    assert accuracy["se_images"] == pytest.approx(sd / math.sqrt(8))
    assert accuracy["images_needed"] == needed(sd, 0.02)

    # balanced accuracy: each class's images weighted 1 / (K x share), so the per-image
    # mean is the difference of the mean per-class recalls
    weights = [8 / (2 * 6)] * 6 + [8 / (2 * 2)] * 2
    weighted = [[w * d for w, d in zip(weights, diffs)] for diffs in image_diffs]
    def recall(name: str, seed: int, c: str) -> float:
        return statistics.fmean(ok for ok, label in zip(CORRECT[name][seed], LABELS) if label == c)

    for s in range(3):
        balanced = {n: (recall(n, s, "a") + recall(n, s, "b")) / 2 for n in CORRECT}
        assert statistics.fmean(weighted[s]) == pytest.approx(balanced["region"] - balanced["random"])
    balanced = rows[("linear", "balanced_accuracy")]
    assert balanced["sd_image"] == pytest.approx(pooled_sd(weighted))
    assert balanced["images_needed"] == needed(pooled_sd(weighted), 0.02)

    dice = rows[("seg", "dice")]  # the val rows only, each image the mean of its classes
    dice_diffs = [np.subtract(DICE["region"][s], DICE["random"][s]).tolist() for s in range(3)]
    assert dice["images"] == 3 and dice["sd_image"] == pytest.approx(pooled_sd(dice_diffs))
    assert dice["images_needed"] == needed(pooled_sd(dice_diffs), 0.02)
    assert analysis["design"]["linear:accuracy"]["seeds_needed"] == (12, "region vs random")


def test_power_script_writes_the_report(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("power", ROOT / "benchmarks" / "power.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    run = pilot(tmp_path / "run")
    out = tmp_path / "power.md"
    assert script.main([str(run), "--half-width", "0.02", "--metric", "seg:dice",
                        "--metric", "linear:macro_f1", "--out", str(out)]) == 0
    text = out.read_text()
    assert text in capsys.readouterr().out + "\n"
    header, table = md_section(text, "linear: macro_f1")
    row = table["region"]
    assert row[header.index("seeds needed")] == "–"  # no per-seed values in cells.csv
    assert row[header.index("images needed")] == "–"  # no per-image form
    header, table = md_section(text, "seg: dice")
    dice_diffs = [np.subtract(DICE["region"][s], DICE["random"][s]).tolist() for s in range(3)]
    assert table["region"][header.index("images needed")] == str(needed(pooled_sd(dice_diffs), 0.02))
    assert "Plan: seeds" in text and "(set by region vs random)" in text

    assert script.main([str(tmp_path / "nothing")]) == 2
    assert "results.json is missing" in capsys.readouterr().err
    assert script.main([str(run), "--metric", "seg:accuracy"]) == 2
    assert "--metric seg:accuracy: no evaluation" in capsys.readouterr().err
    assert script.main([str(run), "--reference", "nope"]) == 2
    assert "unknown: ['nope']" in capsys.readouterr().err


def test_an_experiment_resolves_and_records_the_matched_ratio(tmp_path, capsys):
    """End to end: the matched cell pretrains at the ratio its region strategy has on the
    train images, says so, and records it in cell.json and the results."""
    import yaml

    from mwm.cli import main

    raw = {"name": "matched", "data": {"phantoms": {"modality": "brain-mri", "n": 16, "size": 64}},
           "pretrain": {"model": "resnet10t", "input_size": 64, "mask_patch": 16,
                        "decoder_width": 16, "epochs": 1, "batch_size": 4, "amp": "none",
                        "channels_last": False, "stat_images": 4, "log_every": 1},
           "evaluate": [{"name": "linear", "task": "linear-probe", "epochs": 1, "batch_size": 8}],
           "seeds": [0], "reference": "region-gt",
           "strategies": [RAW["strategies"][2],
                          {"name": "random-matched", "masking": "random",
                           "ratio": {"match": "region-gt"}}]}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    assert main(["experiment", str(tmp_path / "exp.yaml"), "--out", str(out), "--quiet",
                 "--workers", "1", "--no-report"]) == 0
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if line.startswith("random-matched: ratio"))
    cell = json.loads((out / "cells" / "random-matched" / "seed0" / "cell.json").read_text())
    matched = cell["matched"]
    assert matched["strategy"] == "region-gt" and matched["regions"] == "ground_truth"
    assert f"{matched['ratio']:.4f}" in line and matched["images"] > 0
    # a random sampler masks round(16 x ratio) of the 16 cells of every image
    assert cell["pretrain"]["ratio_overall"] == pytest.approx(matched["grid_ratio"])
    assert 0.4 <= matched["ratio"] <= 0.8
    with open(out / "results.csv", newline="") as handle:
        row = next(r for r in csv.DictReader(handle) if r["strategy"] == "random-matched")
    assert float(row["matched_ratio"]) == pytest.approx(matched["ratio"])
    assert main(["experiment", str(tmp_path / "exp.yaml"), "--out", str(out), "--quiet",
                 "--workers", "1", "--no-report"]) == 0
    assert capsys.readouterr().out.count("up to date: ") == 2  # the same ratio: reused
