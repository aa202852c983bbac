"""``mwm finetune --mode linear``: a logistic regression on the frozen encoder's features.

The encoder is frozen (eval mode, BN statistics untouched); pooled features (a ViT's:
mean patch token or class token, ``vit_pool``) of the train
and eval images (no augmentation) are computed once, kept in memory, and standardized with
the train features' mean/std. The probe (``nn.Linear``, cross-entropy + ``wd/2 * ||W||²``,
no label smoothing) is fitted full-batch with L-BFGS (strong-Wolfe line search),
:data:`LBFGS_ITERS_PER_EPOCH` iterations per "epoch", one engine step each. The
standardization is folded into the timm classifier, so the saved model is a plain timm
classifier. At the end the final probe's prediction for every evaluation image is written
to ``predictions.csv`` (:func:`~mwm.downstream.classify_metrics.write_predictions`).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from .. import checkpoint
from ..engine import Dist, Engine
from ..errors import DataError
from ..progress import progress as progress_bar
from .classifier import LAST, Finetuner, _cpu_state
from .classify_metrics import (
    PREDICTIONS_FILE,
    classification_metrics,
    write_predictions,
)

LBFGS_ITERS_PER_EPOCH = 20


@torch.no_grad()
def features(runner: Finetuner, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) float64 pooled features of ``dataset`` and its (N,) labels."""
    model, feats, labels = runner.model, [], []
    for images, targets in progress_bar(runner._loader(dataset, batch_size=runner.cfg.batch_size),
                                        desc="features", unit="batch",
                                        enabled=not runner.cfg.quiet and runner.dist.main):
        with runner.autocast():
            f = model.forward_head(model.forward_features(images.to(runner.device)),
                                   pre_logits=True)
        feats.append(f.float().flatten(1).cpu())
        labels.append(targets)
    return torch.cat(feats).double(), torch.cat(labels)


def run_linear(runner: Finetuner) -> dict:
    cfg, model = runner.cfg, runner.model
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise DataError(f"--mode linear: {runner.arch}'s classifier is {type(head).__name__}, "
                        "not a single linear layer.")
    t0 = time.perf_counter()
    x_train, y_train = features(runner, runner.plain_train_set)
    x_eval, y_eval = features(runner, runner.eval_set)
    feature_seconds = time.perf_counter() - t0
    mu = x_train.mean(0)
    sd = x_train.std(0, unbiased=False).clamp_min(1e-6)
    z_train = (x_train - mu) / sd
    probe = nn.Linear(z_train.shape[1], len(runner.classes)).double()
    nn.init.zeros_(probe.weight)
    nn.init.zeros_(probe.bias)
    optimizer = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=LBFGS_ITERS_PER_EPOCH,
                                  history_size=20, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-9, tolerance_change=1e-12)
    # the probe lives on the CPU in float64 and is the same on every rank: no DDP
    runner.engine = engine = Engine(probe, optimizer, device=torch.device("cpu"), dist=Dist())
    if runner.checkpoint is not None:
        probe.load_state_dict(runner.checkpoint["probe"])
        engine.restore(runner.checkpoint)
        runner.best = runner.checkpoint.get("best")
    runner.out.mkdir(parents=True, exist_ok=True)
    runner.metrics_log.restart(lambda row: int(row["epoch"]) <= runner.epoch)

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(probe(z_train), y_train) \
            + 0.5 * cfg.wd * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    def fold():
        """Put standardization + probe into the timm head: W' = W/sd, b' = b - W'·mu."""
        w = probe.weight.detach() / sd
        head.weight.copy_(w.to(head.weight))
        head.bias.copy_((probe.bias.detach() - w @ mu).to(head.bias))

    stop = cfg.max_steps if cfg.max_steps is not None else cfg.epochs
    loss_value = None
    while runner.epoch < cfg.epochs and runner.step < stop:
        epoch_t0 = time.perf_counter()
        loss_value = float(engine.closure_step(closure).detach())
        engine.epoch += 1
        with torch.no_grad():
            fold()
            probs = torch.softmax(probe((x_eval - mu) / sd), dim=1).numpy()
        metrics = classification_metrics(probs, y_eval.numpy(), runner.classes)
        runner._record(metrics, loss_value, None, model, time.perf_counter() - epoch_t0)
        if runner.dist.main:
            checkpoint.save(runner.out / LAST, runner._payload(
                _cpu_state(model), {"probe": probe.state_dict(), **engine.state(),
                                    "rng": checkpoint.rng_state()}))
    with torch.no_grad():
        fold()
        probs = torch.softmax(probe((x_eval - mu) / sd), dim=1).numpy()
    if runner.last_metrics is None:
        runner.last_metrics = runner.evaluate(model)
    if runner.dist.main:  # the per-image outcome of the last evaluation
        write_predictions(runner.out / PREDICTIONS_FILE, [s.name for s in runner.eval_set.samples],
                          probs, y_eval.numpy(), runner.classes, runner.eval_split)
    return runner._summary({"feature_dim": int(x_train.shape[1]),
                            "feature_seconds": feature_seconds,
                            "final_train_loss": loss_value, "solver": "lbfgs",
                            "ranks_agree": runner._ranks_agree(model)})
