"""`mwm experiment`: config checks, cells, sharding, resume, stale cells, results math."""

import csv
import hashlib
import json
import math
import os
import re
import statistics

import pytest
import yaml

from mwm.cli import main
from mwm.data.io import DataError
from mwm.experiment import cells_of, parse_experiment, shard_from
from mwm.experiment.config import task_of
from mwm.experiment.grid import CELL_FILE, cell_fingerprint
from mwm.experiment.results import cell_rows, mean_std, strategy_rows, write_results
from mwm.files import write_json

TINY = {
    "name": "tiny",
    "data": {"phantoms": {"modality": "brain-mri", "n": 24, "size": 64, "seed": 0}},
    "pretrain": {"model": "resnet10t", "input_size": 64, "decoder_width": 32, "epochs": 1,
                 "batch_size": 4, "amp": "none", "channels_last": False, "stat_images": 8,
                 "log_every": 1, "warmup_epochs": 0.5},
    "evaluate": [{"name": "linear", "mode": "linear", "epochs": 2, "batch_size": 8}],
    "seeds": [0],
    "reference": "random-50",
    "strategies": [{"name": "scratch", "masking": "none"},
                   {"name": "random-50", "masking": "random", "ratio": 0.5},
                   {"name": "region-gt", "masking": "region", "ratio_salient": 0.8,
                    "ratio_background": 0.4, "regions": "ground_truth"}],
}


def write_config(path, **changes):
    config = json.loads(json.dumps(TINY))
    config.update(changes)
    path.write_text(yaml.safe_dump(config))
    return path


def run(config_path, out, *extra):
    return main(["experiment", str(config_path), "--out", str(out), "--quiet", "--workers", "1",
                 "--no-report", *extra])


def test_shards_resume_and_stale_cells(tmp_path, capsys):
    config = write_config(tmp_path / "exp.yaml")
    out = tmp_path / "run"
    # two shards one after the other (as two processes sharing the folder would)
    assert run(config, out, "--shard", "0/2") == 0
    first = json.loads((out / "results.json").read_text())
    assert first["missing"] == ["random-50/seed0"]  # shard 1's cell
    assert run(config, out, "--shard", "1/2") == 0
    results = json.loads((out / "results.json").read_text())
    assert results["missing"] == []
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["strategy"] for r in rows] == ["scratch", "random-50", "region-gt"]
    by_name = {r["strategy"]: r for r in rows}
    assert float(by_name["random-50"]["ratio_overall"]) == pytest.approx(0.5)  # 2x2 grid: 2 of 4
    assert by_name["scratch"]["ratio_overall"] == "nan"
    assert float(by_name["random-50"]["linear_delta"]) == 0.0
    for name in ("random-50", "region-gt"):
        assert (out / "cells" / name / "seed0" / "pretrain" / "encoder.safetensors").is_file()
    cell_file = out / "cells" / "region-gt" / "seed0" / "cell.json"
    stamp = cell_file.stat().st_mtime_ns
    capsys.readouterr()

    # a rerun with the same settings reuses every cell
    assert run(config, out) == 0
    assert capsys.readouterr().out.count("up to date: ") == 3
    assert cell_file.stat().st_mtime_ns == stamp

    # other evaluation settings: the cell is recomputed, never reused
    changed = write_config(tmp_path / "exp2.yaml", strategies=[TINY["strategies"][0]], reference=None,
                           evaluate=[{"name": "linear", "mode": "linear", "epochs": 1, "batch_size": 8}])
    scratch_file = out / "cells" / "scratch" / "seed0" / "cell.json"
    assert json.loads(scratch_file.read_text())["evaluations"]["linear"]["epochs"] == 2
    assert run(changed, out) == 0
    assert "up to date: " not in capsys.readouterr().out
    assert json.loads(scratch_file.read_text())["evaluations"]["linear"]["epochs"] == 1


def test_region_strategy_reads_ground_truth_regions(tmp_path):
    config = write_config(tmp_path / "exp.yaml", strategies=[TINY["strategies"][2]], reference=None)
    out = tmp_path / "run"
    assert run(config, out) == 0
    cell = json.loads((out / "cells" / "region-gt" / "seed0" / "cell.json").read_text())
    assert cell["pretrain"]["ratio_salient"] > cell["pretrain"]["ratio_background"]
    assert not (out / "saliency").exists()  # ground-truth regions need no localization


@pytest.mark.parametrize("change, message", [
    ({"unknown": 1}, "unknown key"),
    ({"pretrain": {"epoch": 3}}, "pretrain"),
    ({"pretrain": {"seed": 3}}, "may not set"),
    ({"strategies": [{"name": "x", "masking": "checkerboard"}]}, "masking must be one of"),
    ({"strategies": [{"name": "../x", "masking": "random", "ratio": 0.5}]}, "names a folder"),
    ({"strategies": []}, "non-empty"),
    ({"reference": "nope"}, "reference"),
    ({"strategies": [{"name": "r", "masking": "region"}]}, "localize.prompt"),
    ({"evaluate": [{"mode": "linear"}]}, "needs a name"),
    ({"evaluate": [{"name": "x", "task": "segment-3d"}]}, "unknown task"),
    ({"evaluate": [{"name": "x", "task": "linear-probe", "mode": "finetune"}]}, "fixes mode"),
    ({"evaluate": [{"name": "x", "task": "detect", "label_smoothing": 0.1}]}, "task detect"),
])
def test_config_errors_name_the_problem(change, message):
    raw = {**TINY, **change}
    with pytest.raises(DataError, match=message):
        parse_experiment(raw, source="exp.yaml")


def test_config_error_exits_2(tmp_path, capsys):
    config = write_config(tmp_path / "bad.yaml", pretrain={"epochz": 1})
    assert main(["experiment", str(config), "--out", str(tmp_path / "o")]) == 2
    assert "bad.yaml" in capsys.readouterr().err


def test_shipped_configs_parse(tmp_path):
    """The paper-scale configs refuse to run until their placeholder path is edited."""
    from mwm.experiment import load_experiment
    from mwm.experiment.config import PLACEHOLDER

    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    names = sorted(os.listdir(root))
    assert {"phantom-brain-mri.yaml", "paper-resnet50.yaml", "paper-vitb16.yaml"} <= set(names)
    paths = []
    for name in names:
        path = os.path.join(root, name)
        with open(path) as handle:
            text = handle.read()
        if PLACEHOLDER in text:
            with pytest.raises(DataError, match="placeholder .*edit the file"):
                load_experiment(path)
            path = tmp_path / name
            path.write_text(text.replace("/path/to/your/dataset/", str(tmp_path) + "/"))
        paths.append(path)
    for path in paths:
        config = load_experiment(path)
        assert len(cells_of(config)) == len(config.strategies) * len(config.seeds)
    paper = load_experiment(tmp_path / "paper-resnet50.yaml")
    assert paper.pretrain["model"] == "resnet50" and paper.pretrain["batch_size"] == 128
    assert paper.pretrain["epochs"] == 500 and paper.pretrain["input_size"] == 224


def test_torchrun_environment_becomes_a_shard(monkeypatch):
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "3"), ("LOCAL_RANK", "1"),
                        ("MASTER_ADDR", "localhost"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)
    from mwm.engine import torchrun_env
    from mwm.runtime import detach_from_torchrun

    shard = shard_from(None, "cpu", torchrun_env())
    assert (shard.index, shard.count, shard.device) == (1, 3, "cpu")
    assert "WORLD_SIZE" in os.environ  # the library reads the ranks, it does not change them
    # the entry point detaches: no DDP setup in a cell may see torchrun's variables
    detach_from_torchrun()
    assert "WORLD_SIZE" not in os.environ and "RANK" not in os.environ
    with pytest.raises(DataError, match="K/N"):
        shard_from("2", "cpu")
    with pytest.raises(DataError):
        shard_from("3/3", "cpu")


def test_shards_cover_every_cell_once():
    config = parse_experiment({**TINY, "seeds": [0, 1, 2]})
    cells = cells_of(config)
    parts = [cells[k::4] for k in range(4)]
    keys = [c.key for part in parts for c in part]
    assert sorted(keys) == sorted(c.key for c in cells) and len(set(keys)) == len(cells) == 9


def test_results_mean_std_and_paired_delta():
    config = parse_experiment({**TINY, "seeds": [0, 1]})

    def record(strategy, seed, accuracy, ratio):
        pre = None if strategy == "scratch" else {"ratio_overall": ratio, "ratio_salient": ratio,
                                                  "ratio_background": ratio, "seconds": 10.0,
                                                  "final_loss": 1.0}
        return {"strategy": strategy, "masking": "x", "seed": seed, "pretrain": pre,
                "evaluations": {"linear": {"accuracy": accuracy}}}

    records = [record("random-50", 0, 0.50, 0.5), record("random-50", 1, 0.60, 0.5),
               record("region-gt", 0, 0.58, 0.45), record("region-gt", 1, 0.64, 0.47),
               record("scratch", 0, 0.30, None)]
    rows = {r["strategy"]: r for r in strategy_rows(config, cell_rows(config, records))}
    assert rows["region-gt"]["linear_mean"] == pytest.approx(0.61)
    assert rows["region-gt"]["linear_std"] == pytest.approx(math.sqrt(((0.03) ** 2) * 2))
    # per-seed differences 0.08 and 0.04
    assert rows["region-gt"]["linear_delta"] == pytest.approx(0.06)
    assert rows["region-gt"]["ratio_overall"] == pytest.approx(0.46)
    assert rows["scratch"]["n_seeds"] == 1 and math.isnan(rows["scratch"]["ratio_overall"])
    assert rows["scratch"]["linear_delta"] == pytest.approx(-0.20)  # only seed 0 is paired
    assert math.isnan(mean_std([])[0])


def test_region_postprocessing_with_crf_reads_the_dataset_images(tmp_path):
    # localize.postprocess.crf in an experiment: the CRF gets the images it needs from
    # the dataset, and a map it cannot use stops the run with the file named.
    import numpy as np

    from mwm.data.phantoms import generate_phantoms
    from mwm.experiment.prepare import _postprocess
    from mwm.files import write_png

    pytest.importorskip("pydensecrf.densecrf", reason="the crf extra (pydensecrf2) is not installed")
    data = tmp_path / "data"
    generate_phantoms(data, n=6, size=48, seed=1, workers=1, progress=False)
    saliency = tmp_path / "saliency"
    for mask in sorted((data / "masks").glob("*.png")):
        write_png(saliency / mask.name, np.full((48, 48), 40, np.uint8))
    write_png(saliency / "brain-mri_00000.png", np.eye(48, dtype=np.uint8) * 255)
    raw = {**TINY, "localize": {"prompt": "brain tumor", "model": "unused",
                                "postprocess": {"method": "kmeans", "top_k": 1,
                                                "crf": {"anchor": "binarization"}}}}
    config = parse_experiment(raw)
    _postprocess(config, data, saliency, tmp_path / "regions", 1, True)
    assert len(list((tmp_path / "regions").glob("*.png"))) == 6
    assert json.loads((tmp_path / "regions_done.json").read_text())["crf"] == {"anchor": "binarization"}

    write_png(saliency / "brain-mri_00001.png", np.zeros((20, 20), np.uint8))  # wrong size
    with pytest.raises(DataError, match="brain-mri_00001"):
        _postprocess(config, data, saliency, tmp_path / "regions", 1, True)


def test_every_cell_is_scored_on_every_task(tmp_path):
    """Two tasks of the registry, a linear probe and Mask R-CNN: each cell gets a column of
    each task's primary metric, and the table names it."""
    evaluate = [{"name": "probe", "task": "linear-probe", "epochs": 1, "batch_size": 8},
                {"name": "det", "task": "detect", "model": "resnet18", "max_steps": 1, "input_size": 64,
                 "roi_batch_size": 16, "rpn_batch_size": 16, "figures": 0, "eval_every": 0}]
    config = write_config(tmp_path / "exp.yaml", strategies=[TINY["strategies"][0]],
                          reference=None, evaluate=evaluate)
    out = tmp_path / "run"
    assert run(config, out) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["primary"] == {"probe": "accuracy", "det": "segm/AP"}
    cell = json.loads((out / "cells" / "scratch" / "seed0" / "cell.json").read_text())
    assert set(cell["evaluations"]) == {"probe", "det"}
    assert -1.0 <= cell["evaluations"]["det"]["segm/AP"] <= 1.0
    assert cell["evaluations"]["det"]["epochs"] == 0  # stopped by max_steps inside epoch 1
    header = (out / "results.md").read_text().splitlines()[0]
    assert "probe accuracy" in header and "det segm/AP" in header
    row = next(csv.DictReader(open(out / "cells.csv")))
    assert "det_bbox/AP50" in row and "probe_balanced_accuracy" in row


def test_a_vit_experiment_pretrains_with_mae_and_probes(tmp_path):
    """The grid takes a ViT like a CNN: MAE cells on the patch grid, probed downstream."""
    config = write_config(tmp_path / "vit.yaml",
                          pretrain={**TINY["pretrain"], "model": "vit_tiny_patch16_224",
                                    "patch_size": 8, "decoder_width": 32, "decoder_depth": 1},
                          strategies=TINY["strategies"][1:])
    out = tmp_path / "run"
    assert run(config, out) == 0
    rows = {r["strategy"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert float(rows["random-50"]["ratio_overall"]) == pytest.approx(0.5)
    assert 0.0 <= float(rows["region-gt"]["linear_mean"]) <= 1.0


# --------------------------------------------------------------------------- per-task results

SEG = {"name": "seg", "task": "segment-probe", "epochs": 1}
LINEAR = TINY["evaluate"][0]
BASE = {"scratch": 0.3, "random-50": 0.5, "region-gt": 0.6}


def fake_value(strategy: str, seed: int, evaluation: str, metric: str, index: int):
    """A hand-made metric: region-gt gains 0.05 more on seed 1 than random-50 does, so the
    paired differences (0.10, 0.15) have a spread. HD95 is missing for scratch (every value
    infinite in a real run) and infinite for random-50's seed 1."""
    if metric == "hd95" and strategy == "scratch":
        return None
    if metric == "hd95" and strategy == "random-50" and seed == 1:
        return float("inf")
    extra = 0.05 * seed if strategy == "region-gt" else 0.0
    return BASE[strategy] + 0.1 * seed + extra + 0.01 * index + (0.2 if evaluation == "seg" else 0.0)


def write_fake_cells(run, config, value=fake_value) -> None:
    """A cell.json per cell, as a finished run writes it (the current settings' fingerprint)."""
    for cell in cells_of(config):
        ratio = {"random-50": 0.5, "region-gt": 0.45 + 0.01 * cell.seed}.get(cell.strategy.name)
        pre = None if ratio is None else {"ratio_overall": ratio, "ratio_salient": ratio,
                                          "ratio_background": ratio, "seconds": 5.0,
                                          "final_loss": 1.0, "encoder": "encoder.safetensors"}
        evaluations = {item["name"]: {m: value(cell.strategy.name, cell.seed, item["name"], m, i)
                                      for i, m in enumerate(task_of(item).metrics)}
                       for item in config.evaluate}
        write_json(cell.folder(run) / CELL_FILE,
                   {"cell": cell.key, "strategy": cell.strategy.name,
                    "masking": cell.strategy.masking, "seed": cell.seed,
                    "fingerprint": cell_fingerprint(config, cell), "pretrain": pre,
                    "evaluations": evaluations})


def md_table(text: str, heading: str) -> tuple[list[str], dict[str, list[str]]]:
    """(header, {strategy: cells}) of the Markdown table under ``## heading``."""
    section = text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    split = lambda line: [c.strip() for c in line.strip("|").split("|")]
    return split(lines[0]), {split(line)[0]: split(line) for line in lines[1:]}


def test_results_report_every_metric_of_every_task_with_paired_deltas(tmp_path):
    import cv2

    config = parse_experiment({**TINY, "seeds": [0, 1], "evaluate": [LINEAR, SEG]})
    run = tmp_path / "run"
    write_fake_cells(run, config)
    results = write_results(config, run, cells_of(config))
    seg_metrics = task_of(SEG).metrics
    assert results["tasks"] == {"linear": "linear-probe", "seg": "segment-probe"}
    assert results["metrics"]["seg"] == list(seg_metrics) and results["missing"] == []

    rows = {r["strategy"]: r for r in results["strategies"]}
    for e, item in (("linear", LINEAR), ("seg", SEG)):
        for i, metric in enumerate(task_of(item).metrics):
            if metric == "hd95":
                continue
            region = [fake_value("region-gt", s, e, metric, i) for s in (0, 1)]
            random = [fake_value("random-50", s, e, metric, i) for s in (0, 1)]
            stats = rows["region-gt"]["evaluations"][e][metric]
            assert stats["mean"] == pytest.approx(statistics.fmean(region)), (e, metric)
            assert stats["std"] == pytest.approx(statistics.stdev(region))
            diffs = [a - b for a, b in zip(region, random)]
            assert stats["delta"] == pytest.approx(0.125) == pytest.approx(statistics.fmean(diffs))
            assert stats["delta_std"] == pytest.approx(statistics.stdev(diffs))
            assert stats["n"] == stats["n_paired"] == 2
    # the primary's columns of earlier versions still hold the primary
    assert rows["region-gt"]["seg_mean"] == rows["region-gt"]["evaluations"]["seg"]["dice"]["mean"]
    assert rows["region-gt"]["linear_delta"] == pytest.approx(0.125)
    # HD95: none for scratch, one finite seed of random-50, so one paired seed for region-gt
    assert rows["scratch"]["evaluations"]["seg"]["hd95"]["mean"] is None
    assert rows["random-50"]["evaluations"]["seg"]["hd95"]["n"] == 1
    hd95 = rows["region-gt"]["evaluations"]["seg"]["hd95"]
    index = seg_metrics.index("hd95")
    assert hd95["n_paired"] == 1 and hd95["delta"] == pytest.approx(
        fake_value("region-gt", 0, "seg", "hd95", index) - fake_value("random-50", 0, "seg", "hd95", index))

    with open(run / "results.csv", newline="") as handle:
        csv_rows = {r["strategy"]: r for r in csv.DictReader(handle)}
    assert float(csv_rows["region-gt"]["seg_nsd_delta_std"]) == pytest.approx(
        rows["region-gt"]["evaluations"]["seg"]["nsd"]["delta_std"])
    assert float(csv_rows["region-gt"]["linear_balanced_accuracy_mean"]) == pytest.approx(
        statistics.fmean([fake_value("region-gt", s, "linear", "balanced_accuracy", 1) for s in (0, 1)]))
    assert csv_rows["scratch"]["seg_hd95_mean"] == ""
    assert json.loads((run / "results.json").read_text())["strategies"][0]["evaluations"]["seg"]["hd95"]["mean"] is None

    text = (run / "results.md").read_text()
    assert "linear accuracy" in text.splitlines()[0] and "seg dice" in text.splitlines()[0]
    header, table = md_table(text, "seg (task segment-probe, primary metric dice)")
    assert header[:4] == ["strategy", "seeds", "realized mask ratio", "dice"]
    assert set(seg_metrics) <= set(header) and {f"Δ {m}" for m in seg_metrics} <= set(header)
    assert table["scratch"][header.index("hd95")] == "–"
    assert table["random-50"][header.index("hd95")].endswith("(1 of 2 seeds)")
    assert table["region-gt"][header.index("Δ nsd")] == "+0.125 ± 0.035"
    assert table["region-gt"][header.index("realized mask ratio")] == "0.455"
    header, table = md_table(text, "linear (task linear-probe, primary metric accuracy)")
    assert "Δ macro_f1" in header and table["random-50"][header.index("Δ auroc")] == "(reference)"

    for e in ("linear", "seg"):  # one plot per evaluation, the combined one is gone
        image = cv2.imread(str(run / "plots" / f"{e}.png"))
        assert image is not None and image.shape[0] > 100, e
    assert not (run / "accuracy_vs_ratio.png").exists()

    # a cell.json left by other settings counts as missing; a dropped evaluation loses its plot
    fewer = parse_experiment({**TINY, "seeds": [0, 1], "evaluate": [SEG]})
    stale = cells_of(fewer)[0]
    record = json.loads((stale.folder(run) / CELL_FILE).read_text())
    write_fake_cells(run, fewer)
    write_json(stale.folder(run) / CELL_FILE, record)
    again = write_results(fewer, run, cells_of(fewer))
    assert again["missing"] == [stale.key]
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["seg.png"]


def _digest(path) -> tuple[int, str]:
    return path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_changed_or_added_evaluation_reruns_alone(tmp_path, capsys):
    """Pretraining is fingerprinted without the evaluations: changing one evaluation and
    adding another reuse the encoder and the untouched evaluation; an interrupted
    evaluation resumes in its folder. The report shows the segmentation's overlays."""
    from mwm.report.html import render_report

    evaluate = [{"name": "linear", "task": "linear-probe", "epochs": 2, "batch_size": 8},
                {"name": "probe", "task": "segment-probe", "epochs": 1, "batch_size": 8,
                 "decoder_width": 8, "overlays": 2}]
    config = write_config(tmp_path / "exp.yaml", strategies=[TINY["strategies"][1]],
                          reference=None, evaluate=evaluate)
    out = tmp_path / "run"
    assert run(config, out) == 0
    cell = out / "cells" / "random-50" / "seed0"
    pretrained = {name: _digest(cell / "pretrain" / name)
                  for name in ("checkpoint.pt", "encoder.safetensors")}
    probe_result = _digest(cell / "eval_probe" / "evaluation.json")
    for name in ("linear", "probe"):
        (cell / f"eval_{name}" / "marker.txt").write_text("from the first run")
    capsys.readouterr()

    changed = write_config(tmp_path / "exp2.yaml", strategies=[TINY["strategies"][1]],
                           reference=None,
                           evaluate=[{**evaluate[0], "epochs": 1}, evaluate[1],
                                     {"name": "added", "task": "linear-probe", "epochs": 1,
                                      "batch_size": 8}])
    assert run(changed, out) == 0
    text = capsys.readouterr().out
    assert "pretraining reused" in text and "probe: dice" in text and "(reused)" in text
    assert "up to date: " not in text and "pretrained in" not in text
    assert {name: _digest(cell / "pretrain" / name) for name in pretrained} == pretrained
    assert _digest(cell / "eval_probe" / "evaluation.json") == probe_result
    assert (cell / "eval_probe" / "marker.txt").is_file()
    assert not (cell / "eval_linear" / "marker.txt").exists()  # other settings: a fresh folder
    record = json.loads((cell / CELL_FILE).read_text())
    assert list(record["evaluations"]) == ["linear", "probe", "added"]
    assert record["evaluations"]["linear"]["epochs"] == 1
    assert json.loads((cell / "eval_added" / "evaluation.json").read_text())["metrics"] == \
        record["evaluations"]["added"]
    assert (out / "plots" / "added.png").is_file()

    # an evaluation interrupted before its result (and so the cell's) was written resumes
    # in place
    (cell / "eval_probe" / "evaluation.json").unlink()
    (cell / CELL_FILE).unlink()
    assert run(changed, out) == 0
    assert "probe: dice" in capsys.readouterr().out
    assert (cell / "eval_probe" / "marker.txt").is_file()
    resumed = json.loads((cell / "eval_probe" / "evaluation.json").read_text())["metrics"]
    untimed = lambda metrics: {k: v for k, v in metrics.items() if k != "seconds"}
    assert untimed(resumed) == untimed(record["evaluations"]["probe"])
    assert {name: _digest(cell / "pretrain" / name) for name in pretrained} == pretrained

    # the segment task's own overlays, one figure each, captioned with their DSC
    page = render_report(out)
    section = page.split("<h2>Segmentation: probe</h2>", 1)[1].split("<h2>", 1)[0]
    captions = re.findall(r'<figcaption>(random-50, seed 0: [^<]+ \(val\), DSC [0-9.]+)</figcaption>',
                          section)
    assert len(captions) == 2 == len(list((cell / "eval_probe" / "overlays").glob("val_*.png")))


def test_held_out_evaluation_phantoms(tmp_path, capsys):
    """data.eval_phantoms: the probe trains on the training phantoms' train split and is
    scored on every image of a second phantom set (another seed, never pretrained on);
    enlarging that set reuses the pretraining and reruns only the evaluation."""
    data = {**TINY["data"], "eval_phantoms": {"n": 10, "seed": 5}}
    strategies = [TINY["strategies"][1]]
    config = write_config(tmp_path / "exp.yaml", data=data, strategies=strategies)
    out = tmp_path / "run"
    assert run(config, out) == 0
    rows = list(csv.DictReader(open(out / "evaluation" / "labels.csv")))
    train = [r for r in rows if r["split"] == "train"]
    held_out = [r for r in rows if r["split"] == "val"]
    assert len(held_out) == 10 and {r["split"] for r in rows} == {"train", "val"}
    assert all(r["image"].startswith("../eval_data/images/eval-") for r in held_out)
    own = list(csv.DictReader(open(out / "data" / "labels.csv")))
    assert [r["image"] for r in train] == ["../data/" + r["image"] for r in own
                                          if r["split"] == "train"]
    images = {(out / "evaluation" / r["image"]).resolve().read_bytes() for r in held_out}
    assert not images & {(out / "data" / r["image"]).read_bytes() for r in own}
    predictions = list(csv.DictReader(open(out / "cells" / "random-50" / "seed0" / "eval_linear"
                                           / "predictions.csv")))
    assert len(predictions) == 10 and {p["split"] for p in predictions} == {"val"}
    assert all(p["image"].startswith("eval-") for p in predictions)
    capsys.readouterr()

    config = write_config(tmp_path / "exp.yaml", strategies=strategies,
                          data={**TINY["data"], "eval_phantoms": {"n": 12, "seed": 5}})
    assert run(config, out) == 0
    printed = capsys.readouterr().out
    assert "pretraining reused" in printed
    predictions = list(csv.DictReader(open(out / "cells" / "random-50" / "seed0" / "eval_linear"
                                           / "predictions.csv")))
    assert len(predictions) == 12


@pytest.mark.parametrize("eval_phantoms, message", [
    ({"n": 10, "seed": 0}, "training phantoms' seed"),
    ({"n": 0}, "whole number of images"),
    ({"n": 10, "size": 32}, "unknown key"),
])
def test_held_out_evaluation_phantoms_errors(eval_phantoms, message):
    raw = {**TINY, "data": {**TINY["data"], "eval_phantoms": eval_phantoms}}
    with pytest.raises(DataError, match=message):
        parse_experiment(raw, source="exp.yaml")


def test_held_out_phantoms_need_phantoms_and_no_detection():
    with pytest.raises(DataError, match="needs data.phantoms"):
        parse_experiment({**TINY, "data": {"images": "x", "eval_phantoms": {"n": 3}}},
                         source="exp.yaml")
    with pytest.raises(DataError, match=r"\(its default\) is the training"):
        parse_experiment({**TINY, "data": {"phantoms": {"seed": 1}, "eval_phantoms": {"n": 3}}},
                         source="exp.yaml")
    detect = {"name": "det", "task": "detect", "max_steps": 1}
    with pytest.raises(DataError, match="cannot use data.eval_phantoms"):
        parse_experiment({**TINY, "evaluate": [detect],
                          "data": {**TINY["data"], "eval_phantoms": {"n": 3}}}, source="exp.yaml")


# --------------------------------------------------------------------------- shards and rank 0's stamp

class _Waited(Exception):
    pass


def test_a_waiting_shard_ignores_a_ready_stamp_made_with_another_localizer(tmp_path, monkeypatch):
    """A 'ready' stamp left by an earlier run whose CLIP (or saliency version) differs is
    stale: rank 0 is about to redo the maps, so shard 1 must wait, not read the regions."""
    from mwm.experiment import run as runner
    from mwm.experiment.grid import Shard

    config = parse_experiment({**TINY, "localize": {"prompt": "brain tumor", "clip": {"epochs": 1}},
                               "strategies": [{"name": "region", "masking": "region"}],
                               "reference": "region"})
    run_dir, clip = tmp_path / "run", tmp_path / "run" / "clip"
    clip.mkdir(parents=True)
    (clip / "open_clip_model.safetensors").write_bytes(b"earlier weights")
    stale = runner.localizer_identity(config, run_dir)
    prepared = {"data": str(tmp_path), "masks": None, "saliency": None, "regions": None,
                "localization": None}
    stamp = {"status": "ready", "settings": config.fingerprint(config.data, config.localize),
             "localizer": stale, "prepared": prepared}
    write_json(run_dir / runner.PREPARED_FILE, stamp)
    (clip / "open_clip_model.safetensors").write_bytes(b"these weights")

    def sleep(_seconds):
        raise _Waited

    monkeypatch.setattr(runner.time, "sleep", sleep)
    wait = lambda: runner._prepared(config, run_dir, Shard(1, 2), 0, True, lambda *_: None)
    with pytest.raises(_Waited):
        wait()
    write_json(run_dir / runner.PREPARED_FILE,
               {**stamp, "localizer": runner.localizer_identity(config, run_dir)})
    assert wait().data == tmp_path
