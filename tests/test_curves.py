"""Pretraining loss curves (`mwm.report.curves`): epoch means of the real log format, the
flatness measure and its threshold, the plot, the report's section, and the paper-scale
configs that the flatness check is for."""

import math
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from mwm.engine import CsvLog
from mwm.errors import DataError
from mwm.pretrain.train import LOG_FIELDS, LOG_NAME
from mwm.report.curves import (
    FLAT_THRESHOLD,
    MIN_EPOCHS,
    epoch_curve,
    flatness,
    pretrain_curves,
    write_pretrain_curves,
)
from mwm.report.html import render_report, write_report

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FLAT = [1.0 + 4.0 * math.exp(-e / 2.0) for e in range(20)]  # decayed long before the end
FALLING = [2.0 - 0.05 * e for e in range(20)]                 # still falling at a constant rate


def write_log(path: Path, epoch_losses: list[float], per_epoch: int = 3,
              spread: float = 0.0) -> Path:
    """A ``train_log.csv`` in the trainer's own format (its fields, its CsvLog): ``per_epoch``
    logged steps per epoch whose losses average to the epoch's value."""
    log = CsvLog(path, LOG_FIELDS)
    log.restart(lambda row: False)
    step = 0
    for epoch, loss in enumerate(epoch_losses):
        for k in range(per_epoch):
            step += 1
            offset = (k - (per_epoch - 1) / 2) * spread  # sums to 0 within the epoch
            log.append({**{f: "0" for f in LOG_FIELDS}, "step": step, "epoch": epoch,
                        "loss": f"{loss + offset:.6f}"})
    return path


def cell_log(run: Path, strategy: str, seed: int, losses: list[float], **kw) -> Path:
    folder = run / "cells" / strategy / f"seed{seed}" / "pretrain"
    folder.mkdir(parents=True, exist_ok=True)
    return write_log(folder / LOG_NAME, losses, **kw)


def hand_made_run(run: Path) -> Path:
    """Two strategies x two seeds: region-80-40 has flattened, random-60 is still falling;
    a scratch cell has no pretraining (no log)."""
    for seed, shift in ((0, 0.0), (1, 0.1)):
        cell_log(run, "region-80-40", seed, [v + shift for v in FLAT], spread=0.02)
        cell_log(run, "random-60", seed, [v + shift for v in FALLING], spread=0.02)
    (run / "cells" / "scratch" / "seed0").mkdir(parents=True)
    return run


def test_epoch_means_of_the_logged_steps(tmp_path):
    log = write_log(tmp_path / LOG_NAME, [2.0, 1.5, 1.25], per_epoch=3, spread=0.1)
    with log.open("a") as handle:  # rows without a loss (a restart) or with a NaN one
        handle.write("10,2,,0,0,0,0,0,0,0\n10,2,nan,0,0,0,0,0,0,0\n")
    curve = epoch_curve(log)
    assert curve.epochs == [1, 2, 3]  # 1-based, as the progress bar counts
    assert curve.steps == [3, 3, 3]
    assert curve.loss == pytest.approx([2.0, 1.5, 1.25], abs=1e-6)


def test_a_flat_tail_passes_and_a_falling_or_rising_one_fails():
    epochs = list(range(1, 21))
    flat = flatness(epochs, FLAT)
    assert flat.status == "flat" and flat.flat and abs(flat.value) < 0.01
    assert flat.tail == (16, 20)  # the last quarter: ceil(20 / 4) = 5 epochs
    falling = flatness(epochs, FALLING)
    # slope -0.05 over the tail's 4 epochs, against a range of 19 x 0.05
    assert falling.status == "falling" and not falling.flat
    assert falling.value == pytest.approx(0.2 / 0.95)
    assert falling.fit[0] == pytest.approx(-0.05)
    rising = flatness(epochs, FLAT[:15] + [FLAT[14] + 0.1 * k for k in range(1, 6)])
    assert rising.status == "rising" and rising.value < -FLAT_THRESHOLD
    assert flatness(epochs, [0.7] * 20).value == 0.0  # a constant curve is flat


def test_the_threshold_boundary():
    # 8 epochs: the tail is the last 3 (at least three points); a straight tail from a to 0
    # on a curve of range 1 has the flatness a
    head, epochs = [1.0, 0.6, 0.4, 0.3, 0.2], list(range(1, 9))

    def tail_from(a: float, threshold: float = FLAT_THRESHOLD):
        return flatness(epochs, head + [a, a / 2, 0.0], threshold=threshold)

    assert tail_from(FLAT_THRESHOLD).value == pytest.approx(FLAT_THRESHOLD)
    assert tail_from(FLAT_THRESHOLD).tail == (6, 8)
    assert tail_from(FLAT_THRESHOLD - 1e-6).status == "flat"
    assert tail_from(FLAT_THRESHOLD + 1e-6).status == "falling"
    assert tail_from(FLAT_THRESHOLD - 1e-6, threshold=0.04).status == "falling"
    short = flatness(list(range(1, MIN_EPOCHS)), FALLING[: MIN_EPOCHS - 1])
    assert short.value is None and short.status == "too short" and not short.flat
    assert flatness(list(range(1, MIN_EPOCHS + 1)), FALLING[:MIN_EPOCHS]).value is not None


def test_strategy_curves_average_seeds_on_their_common_epochs(tmp_path):
    cell_log(tmp_path, "b", 0, [4.0 - 0.2 * e for e in range(10)], per_epoch=2)
    cell_log(tmp_path, "b", 1, [6.0 - 0.2 * e for e in range(8)], per_epoch=2)  # still running
    cell_log(tmp_path, "a", 0, FLAT, per_epoch=1)
    (tmp_path / "results.json").write_text('{"strategies": [{"strategy": "b"}, {"strategy": "x"}]}')
    curves = pretrain_curves(tmp_path)
    assert [c.strategy for c in curves] == ["b", "a"]  # the results' order, then by name
    b = curves[0]
    assert b.epochs == list(range(1, 9)) and sorted(b.seeds) == [0, 1]
    assert b.mean == pytest.approx([5.0 - 0.2 * e for e in range(8)])
    assert b.low == pytest.approx([4.0 - 0.2 * e for e in range(8)])
    assert b.high == pytest.approx([6.0 - 0.2 * e for e in range(8)])
    assert b.flatness.value == pytest.approx(flatness(b.epochs, b.mean).value)
    assert b.flatness.value == pytest.approx(2 / 7)  # 2 of the 7 epoch-steps are in the tail
    assert b.seed_flatness[0].tail == (8, 10) and b.seed_flatness[1].tail == (6, 8)


def test_only_the_results_finished_cells_are_drawn(tmp_path):
    """Folders the results do not list (other settings, a copied run's old cells) stay out."""
    cell_log(tmp_path, "a", 0, FLAT, per_epoch=1)
    cell_log(tmp_path, "a", 1, FALLING, per_epoch=1)   # stale: not a finished cell
    cell_log(tmp_path, "old", 0, FALLING, per_epoch=1)  # a strategy the file no longer has
    (tmp_path / "results.json").write_text(
        '{"strategies": [{"strategy": "a"}], "cells": [{"strategy": "a", "seed": 0}]}')
    curves = pretrain_curves(tmp_path)
    assert [(c.strategy, sorted(c.seeds)) for c in curves] == [("a", [0])]
    assert curves[0].mean == pytest.approx(FLAT)


def test_the_plot_and_its_numbers_are_written(tmp_path):
    assert write_pretrain_curves(tmp_path) is None  # no logs: nothing written
    assert not (tmp_path / "plots").exists()
    run = hand_made_run(tmp_path / "run")
    png = write_pretrain_curves(run)
    assert png == run / "plots" / "pretrain_loss.png"
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[0] > 200 and image.shape[1] > 400
    assert image.std() > 10  # lines and text, not a blank canvas
    rows = png.with_suffix(".csv").read_text().splitlines()
    assert rows[0] == "strategy,seed,epoch,loss,logged_steps"
    assert len(rows) == 1 + 2 * 2 * 20
    *_, loss, steps = next(r for r in rows if r.startswith("random-60,1,3,")).split(",")
    assert float(loss) == pytest.approx(FALLING[2] + 0.1, abs=2e-6) and steps == "3"


def section_of(text: str, title: str) -> str:
    return text.split(f"<h2>{title}</h2>", 1)[1].split("<h2>", 1)[0]


def test_the_report_shows_the_curves_and_flags_what_has_not_flattened(tmp_path):
    assert "Pretraining loss" not in render_report(tmp_path)
    run = hand_made_run(tmp_path / "run")
    text = write_report(run).read_text()
    assert (run / "plots" / "pretrain_loss.png").is_file()  # written with the report
    section = section_of(text, "Pretraining loss")
    assert "not which is better" in section  # losses of different maskings do not compare
    images = re.findall(r'<img src="data:image/png;base64,([^"]*)"', section)
    assert len(images) == 1
    table = {cells[0]: cells for cells in
             (re.findall(r"<td>([^<]*)</td>", row) for row in section.split("<tr>")[2:])}
    assert set(table) == {"region-80-40", "random-60"}  # scratch has no pretraining
    assert table["region-80-40"][-1] == "flat" and table["region-80-40"][-2] == "2 of 2"
    assert table["random-60"][-1] == "NOT FLAT: falling" and table["random-60"][-2] == "0 of 2"
    assert table["random-60"][2] == "20" and table["random-60"][3] == "16–20"
    assert float(table["random-60"][4]) == pytest.approx(0.2 / 0.95, abs=1e-3)


def edited_config(name: str, tmp_path: Path) -> Path:
    text = (CONFIGS / name).read_text()
    edited = tmp_path / name
    edited.write_text(text.replace("/path/to/your/dataset/", f"{tmp_path}/"))
    return edited


@pytest.mark.parametrize("name, model, vit", [("paper-resnet50.yaml", "resnet50", False),
                                               ("paper-vitb16.yaml", "vit_base_patch16_224", True)])
def test_the_paper_configs_parse_and_build_every_cell(name, model, vit, tmp_path):
    from mwm.experiment import load_experiment
    from mwm.experiment.grid import cells_of, eval_settings, task_of
    from mwm.pretrain.config import PretrainConfig
    from mwm.pretrain.mae import is_vit

    with pytest.raises(DataError, match="placeholder"):
        load_experiment(CONFIGS / name)  # refuses to run until the path is edited
    config = load_experiment(edited_config(name, tmp_path))
    assert config.pretrain["model"] == model and config.pretrain["input_size"] == 224
    assert is_vit(model) == vit  # a timm VisionTransformer selects MAE, a CNN SparK
    assert len(cells_of(config)) == len(config.strategies) * len(config.seeds)
    by_name = {s.name: s for s in config.strategies}
    for needed in ("random-60", "random-70", "random-matched", "region-80-40", "region-80-40-gt",
                   "loss-guided-60"):
        assert needed in by_name, needed
    assert by_name["random-matched"].match == "region-80-40"
    assert by_name["region-80-40-gt"].regions == "ground_truth"
    assert by_name["loss-guided-60"].params == {"ratio": 0.6}
    for strategy in config.strategies:  # values too, which the parser leaves to the cell
        if strategy.pretrains:
            params = strategy.params if strategy.resolved else {**strategy.params, "ratio": 0.5}
            PretrainConfig(images=str(tmp_path), out=str(tmp_path / "o"), seed=0,
                           masking=strategy.masking,
                           regions=str(tmp_path) if strategy.reads_regions else None, **params,
                           **config.pretrain)
    tasks = {task_of(item).name for item in config.evaluate}
    assert {"linear-probe", "segment-probe"} <= tasks
    for item in config.evaluate:
        task_of(item).config(data=str(tmp_path), out=str(tmp_path / "e"), weights=None, seed=0,
                             **eval_settings(config, item))
