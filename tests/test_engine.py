"""The training engine: one schedule for every trainer, the step, resume, logs."""

import math

import pytest
import torch
from torch import nn

from mwm.engine import (CsvLog, Engine, Schedule, check_settings, cosine_between, param_groups,
                        settings_changes)
from mwm.errors import DataError


def spark_lr(step, total, warmup, peak):
    """The pretraining / fine-tuning schedule as it was written before the engine."""
    if warmup > 0 and step < warmup:
        return peak * (0.005 + 0.995 * step / warmup)
    progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    return peak * (0.001 + 0.999 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def clip_lr(step, total, peak, warmup):
    """CLIP training's schedule as it was written before the engine."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@pytest.mark.parametrize("total,warmup,peak", [(100, 10, 2e-3), (7, 0, 0.1), (50, 49, 3e-4)])
def test_one_schedule_reproduces_every_trainer_bit_for_bit(total, warmup, peak):
    spark = Schedule(peak, total, warmup, start=0.005, floor=0.001)
    clip = Schedule(peak, total, warmup, shift=1, end=total)
    for step in range(total + 3):
        assert spark.lr_at(step) == spark_lr(step, total, warmup, peak)
        assert clip.lr_at(step) == clip_lr(step, total, peak, warmup)


def test_step_decay_applies_inside_a_long_warmup():
    detect = Schedule(1.0, 12, 100, start=0.01, milestones=(8, 10), gamma=0.25)
    assert detect.lr_at(0) == pytest.approx(0.01)
    assert detect.lr_at(8) == pytest.approx((0.01 + 0.99 * 8 / 100) * 0.25)
    assert detect.lr_at(11) == pytest.approx((0.01 + 0.99 * 11 / 100) * 0.0625)
    assert cosine_between(0, 10, 0.04, 0.2) == pytest.approx(0.04)
    assert cosine_between(9, 10, 0.04, 0.2) == pytest.approx(0.2)


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))


def engine_for(model, **kw):
    groups = param_groups(model, decays=lambda name, p: p.ndim > 1, weight_decay=1.0,
                          layer=lambda name: int(name.split(".")[0]),
                          layer_scale=lambda i: 0.5 ** (2 - i))
    return Engine(model, torch.optim.AdamW(groups, lr=0.0), device=torch.device("cpu"), **kw)


def test_step_sets_scaled_lr_and_weight_decay_then_clips_and_counts():
    model = tiny()
    engine = engine_for(model, schedule=Schedule(0.1, 10), weight_decay=lambda s: 0.05,
                        clip=1e-3)
    x = torch.randn(5, 4)
    engine.backward(model(x).pow(2).sum())
    lr, wd = engine.step()
    assert engine.step_count == 1 and lr == pytest.approx(0.1)
    for group in engine.optimizer.param_groups:
        assert group["lr"] == pytest.approx(0.1 * group["lr_scale"])
        assert group["weight_decay"] == pytest.approx(0.05 * group["wd_scale"])
    assert all(p.grad is None for p in model.parameters())  # zeroed after the step
    with pytest.raises(FloatingPointError, match="step 1"):
        engine.backward(torch.tensor(float("nan")))


def test_restore_keeps_this_runs_group_scales_and_refuses_other_layouts():
    model = tiny()
    engine = engine_for(model)
    engine.backward(model(torch.randn(3, 4)).sum())
    engine.step()
    state = engine.state()
    for group in state["optimizer"]["param_groups"]:  # as earlier versions saved them
        del group["lr_scale"], group["wd_scale"]
    again = engine_for(model)
    again.restore(state)
    assert again.step_count == 1
    assert [g["lr_scale"] for g in again.optimizer.param_groups] == \
        [g["lr_scale"] for g in engine.optimizer.param_groups]
    other = Engine(model, torch.optim.AdamW(model.parameters()), device=torch.device("cpu"))
    with pytest.raises(DataError, match="parameter groups"):
        other.restore(state)


def test_groups_keep_the_order_checkpoints_store():
    model = tiny()
    first = param_groups(model, decays=lambda name, p: p.ndim > 1)
    assert [g["name"] for g in first] == ["decay", "no_decay"]  # weight before bias
    ordered = param_groups(model, decays=lambda name, p: p.ndim > 1, order=lambda key: key[1])
    assert [g["name"] for g in ordered] == ["no_decay", "decay"]


def test_resume_checks_and_logs(tmp_path):
    assert settings_changes({"a": 1, "b": 2}, {"a": 1, "b": 3}) == "b: 2 → 3"
    check_settings({"a": 1, "out": "x"}, {"a": 1, "out": "y"}, ignore=("out",))
    with pytest.raises(DataError, match="other settings .a: 1 → 2"):
        check_settings({"a": 1}, {"a": 2})
    log = CsvLog(tmp_path / "log.csv", ("step", "loss"))
    log.restart(lambda row: True)
    for step in (1, 2, 3):
        log.append({"step": step, "loss": 0.5})
    log.restart(lambda row: int(row["step"]) <= 2)  # a resume from step 2
    assert (tmp_path / "log.csv").read_text().splitlines() == ["step,loss", "1,0.5", "2,0.5"]


def test_every_command_checks_declared_ranges(tmp_path, capsys):
    from mwm.cli import main

    assert main(["refine", str(tmp_path), str(tmp_path), "--out", str(tmp_path / "o"),
                 "--top-k", "-1"]) == 2
    assert "--top-k must be a number >= 0" in capsys.readouterr().err
    assert main(["finetune", str(tmp_path), "--out", str(tmp_path / "f"),
                 "--layer-decay", "1.5"]) == 2
    assert "--layer-decay must be a number in (0.0, 1.0]" in capsys.readouterr().err
