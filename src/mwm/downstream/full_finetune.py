"""``mwm finetune --mode finetune``: all weights train, through the training engine.

Layer-wise lr decay over the model's layer groups (:func:`~mwm.downstream.classify.
finetune_optimizer`), warm-up + cosine (:class:`mwm.engine.Schedule`), cross-entropy with
label smoothing or soft targets under mixup/cutmix (``timm.data.Mixup``), an optional EMA
of the weights (``timm.utils.ModelEmaV3``, then what is evaluated and saved as best),
evaluation after every epoch, ``last.pt`` with the full state for ``--resume``. Mixup and
dropout draw from per-step seeds, so a resumed run repeats an uninterrupted one. The
shared setup, evaluation and records are :class:`~mwm.downstream.classify.Finetuner`'s.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from .. import checkpoint
from ..engine import (SPARK_FLOOR, SPARK_WARMUP_START, Engine, Schedule, average_bn_stats,
                      build_optimizer, epoch_batches, param_groups, peak_lr, step_seed)
from ..errors import DataError
from ..progress import progress as progress_bar
from .classifier import LAST, Finetuner, _cpu_state
from .vit import is_vit_model, layer_ids as vit_layer_ids

FALLBACK_GROUPS = 6


# --------------------------------------------------------------------------- optimizer

def layer_groups(model: nn.Module) -> tuple[dict[str, int], int, str]:
    """``(parameter name → layer id, number of layers, how)`` for layer-wise lr decay.

    A ViT gets MAE's ids (:func:`mwm.downstream.vit.layer_id`: embeddings 0, block i
    i + 1, final norm and head last) rather than timm's matcher, which puts the final
    norm with the last block."""
    if is_vit_model(model):
        ids, n_layers = vit_layer_ids(model)
        return ids, n_layers, "vit blocks (MAE)"
    names = [n for n, _ in model.named_parameters()]
    if hasattr(model, "group_matcher"):
        try:
            from timm.models import group_parameters

            groups = group_parameters(model, model.group_matcher(coarse=True))
            ids = {name: int(i) for i, members in groups.items() for name in members}
            if set(ids) == set(names):
                order = sorted(set(ids.values()))
                remap = {v: r for r, v in enumerate(order)}
                return {n: remap[ids[n]] for n in names}, len(order), "timm group_matcher"
        except (NotImplementedError, TypeError, AttributeError):
            pass
    params = dict(model.named_parameters())
    head = set()
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(classifier, nn.Module):
        head = {id(p) for p in classifier.parameters()}
    body = [n for n in names if id(params[n]) not in head]
    total = sum(params[n].numel() for n in body) or 1
    ids, seen = {}, 0
    for name in body:
        ids[name] = min(FALLBACK_GROUPS - 2, int(seen * (FALLBACK_GROUPS - 1) / total))
        seen += params[name].numel()
    for name in names:
        ids.setdefault(name, FALLBACK_GROUPS - 1)
    return ids, FALLBACK_GROUPS, "parameter order"


def finetune_optimizer(model: nn.Module, cfg) -> tuple[torch.optim.Optimizer, str]:
    """AdamW (betas 0.9/0.999) or LAMB over layer groups with ``layer_decay`` lr scales;
    weight decay on weights, not on norms and biases (nor, as MAE, on a ViT's position
    embeddings and class token). Returns (optimizer, grouping used)."""
    ids, n_layers, how = layer_groups(model)
    exempt = set(model.no_weight_decay()) if is_vit_model(model) else set()
    groups = param_groups(model, decays=lambda name, p: not (p.ndim <= 1 or name.endswith(".bias")
                                                             or name in exempt),
                          weight_decay=cfg.wd, layer=ids.__getitem__,
                          layer_scale=lambda i: cfg.layer_decay ** (n_layers - 1 - i),
                          order=lambda key: key)  # by layer, no-decay first (as saved)
    return build_optimizer(groups, cfg.optimizer, betas=(0.9, 0.999)), how



def loss_and_mixup(runner: Finetuner):
    cfg = runner.cfg
    if cfg.mixup > 0 or cfg.cutmix > 0:
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix,
                      label_smoothing=cfg.label_smoothing, num_classes=len(runner.classes))
        return SoftTargetCrossEntropy(), mixup
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing), None

def batch_size(runner, mixup) -> int:
    n_train = len(runner.train_set)
    batch = min(runner.cfg.batch_size, n_train // runner.dist.world)
    if mixup is not None:
        batch -= batch % 2
    if batch < 1 or (mixup is not None and batch < 2):
        raise DataError(f"{n_train} train images are too few for {runner.dist.world} processes.")
    return batch

def run_finetune(runner: Finetuner) -> dict:
    cfg, model = runner.cfg, runner.model
    criterion, mixup = loss_and_mixup(runner)
    runner.batch = batch = batch_size(runner, mixup)
    runner.steps_per_epoch = len(runner.train_set) // (batch * runner.dist.world)
    total = cfg.epochs * runner.steps_per_epoch
    schedule = Schedule(peak_lr(cfg.base_lr, batch * runner.dist.world, cfg.lr), total,
                        int(round(cfg.warmup_epochs * runner.steps_per_epoch)),
                        start=SPARK_WARMUP_START, floor=SPARK_FLOOR)
    optimizer, runner.grouping = finetune_optimizer(model, cfg)
    runner.engine = Engine(model, optimizer, device=runner.device, amp=cfg.amp,
                         schedule=schedule, dist=runner.dist)
    runner.ema = None
    if cfg.ema is not None:
        from timm.utils import ModelEmaV3

        runner.ema = ModelEmaV3(model, decay=cfg.ema)
    if runner.checkpoint is not None:
        restore(runner)
    runner.out.mkdir(parents=True, exist_ok=True)
    runner.metrics_log.restart(lambda row: int(row["epoch"]) <= runner.epoch)
    stop = cfg.max_steps if cfg.max_steps is not None else total
    lr, loss_value = None, None
    model.train()
    while runner.epoch < cfg.epochs and runner.step < stop:
        epoch_t0 = time.perf_counter()
        lr, loss_value = train_epoch(runner, criterion, mixup, stop)
        per_epoch = runner.steps_per_epoch
        if runner.step % per_epoch == 0 and runner.step // per_epoch > runner.epoch:
            runner.engine.epoch += 1
            average_bn_stats(runner.dist, model, ema_module(runner))
            metrics = runner.evaluate(eval_model(runner))
            runner._record(metrics, loss_value, lr, eval_model(runner),
                         time.perf_counter() - epoch_t0)
            save_last(runner)
    average_bn_stats(runner.dist, model, ema_module(runner))
    save_last(runner)
    if runner.last_metrics is None or runner.step % runner.steps_per_epoch:
        runner.last_metrics = runner.evaluate(eval_model(runner))
    return runner._summary({"steps_per_epoch": runner.steps_per_epoch, "batch_size": batch,
                          "peak_lr": schedule.peak, "layer_groups": runner.grouping,
                          "final_train_loss": loss_value,
                          "ranks_agree": runner._ranks_agree(eval_model(runner))})

def train_epoch(runner, criterion, mixup, stop: int) -> tuple[float | None, float | None]:
    """One epoch of optimizer steps (from where a resumed run stopped): (lr, mean loss)."""
    cfg, engine = runner.cfg, runner.engine
    runner.train_set.set_epoch(runner.epoch)
    batches = epoch_batches(len(runner.train_set), runner.batch, runner.epoch, cfg.seed,
                            runner.dist,
                            runner.steps_per_epoch)
    skip = runner.step - runner.epoch * runner.steps_per_epoch
    losses, lr = [], None
    bar = progress_bar(runner._loader(runner.train_set, batch_sampler=batches[skip:]),
                       total=len(batches) - skip, unit="batch",
                       desc=f"epoch {runner.epoch + 1}/{cfg.epochs}",
                       enabled=not cfg.quiet and runner.dist.main)
    for images, targets in bar:
        images, targets = images.to(runner.device), targets.to(runner.device)
        seed = step_seed(cfg.seed, runner.step, runner.dist.rank)  # mixup and dropout
        torch.manual_seed(seed)
        np.random.seed(seed % 2 ** 32)
        if mixup is not None:
            images, targets = mixup(images, targets)
        with engine.autocast():
            logits = engine.module(images)
        loss = criterion(logits.float(), targets)
        engine.backward(loss)
        lr, _ = engine.step()
        if runner.ema is not None:
            runner.ema.update(runner.model, step=runner.step - 1)
        losses.append(float(loss.detach()))
        if runner.step >= stop:
            break
    return lr, (float(np.mean(losses)) if losses else None)

def ema_module(runner) -> nn.Module | None:
    return runner.ema.module if runner.ema is not None else None

def eval_model(runner) -> nn.Module:
    return ema_module(runner) or runner.model

def restore(runner) -> None:
    ck = runner.checkpoint
    runner.model.load_state_dict(ck["model_train"])
    runner.engine.restore(ck)
    if runner.ema is not None:
        if ck.get("ema") is None:
            raise DataError("--resume: the checkpoint has no EMA weights but --ema is set.")
        runner.ema.module.load_state_dict(ck["ema"])
    runner.best = ck.get("best")

def save_last(runner) -> None:
    if runner.dist.main:
        ema = ema_module(runner)
        checkpoint.save(runner.out / LAST, runner._payload(
            _cpu_state(eval_model(runner)),
            {"model_train": _cpu_state(runner.model), **runner.engine.state(),
             "ema": _cpu_state(ema) if ema is not None else None,
             "rng": checkpoint.rng_state()}))
