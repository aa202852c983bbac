"""``mwm finetune``: classification fine-tuning and linear probing of a (pretrained) encoder.

**Data.** Any labelled layout :func:`~mwm.data.layouts.open_dataset` reads: class
folders (``train/<class>/*``), a CSV manifest with ``label`` and ``split`` columns, or
a phantom folder (``labels.csv``). The model trains on ``train`` and is evaluated on
``val``; without a ``val`` split it is evaluated on ``test`` (the summary says so in
``eval_split``). The classes are ``Dataset.classes`` (sorted label names); the head has
one output per class. Images go through :func:`~mwm.data.io.to_model_input`, are
**resized** to ``input_size`` x ``input_size`` (no padding, aspect ratio not kept —
exactly as in pretraining) and standardized with the mean/std of the weights'
metadata (MWM export or pretrain checkpoint); without them, mean/std are computed in one
pass over the train split (``normalization`` in the summary records which). Training
images get a seeded random resized crop (area 0.67–1) and horizontal flip.

**Weights** (``weights``, read by :mod:`mwm.downstream.weights`): an MWM
``encoder.safetensors``, an MWM pretrain
``checkpoint.pt`` or its run folder (the encoder is extracted through
``SparKModel.encoder_state_dict()``), a timm/PyTorch state dict (``.pth``/``.pt``/
``.bin``/``.safetensors``, optionally nested under ``state_dict``/``model``/``module``,
``module.`` prefixes stripped), an MWM fine-tune checkpoint (``best.pt``/``last.pt``),
or ``None`` (random init). Loading is strict on the backbone: any missing, unexpected
or mis-shaped key outside the classifier head raises :class:`~mwm.data.io.DataError`
naming the keys; head keys in the file are dropped and reported
(``weights.ignored_head_keys``) — except from an MWM fine-tune checkpoint with the same
classes, whose head is kept. Files are read with ``weights_only=True`` or safetensors.

**Modes.**

* ``finetune`` (:mod:`mwm.downstream.full_finetune`) — all weights train, with
  layer-wise lr decay: parameters are grouped by the model's timm
  ``group_matcher(coarse=True)`` (ResNet: stem, layer1..layer4, head; ConvNeXt: stem,
  stages 0..3, head); a model without one falls back to 6 groups of equal parameter count
  in registration order (the last = the classifier). Group ``i`` of ``L`` gets
  ``lr * layer_decay ** (L - 1 - i)``; peak lr = ``lr`` or ``base_lr * global_batch / 256``.
* ``linear`` (:mod:`mwm.downstream.linear_probe`) — a logistic regression on the frozen
  encoder's pooled features, folded into the timm classifier; ``lr``/``optimizer``/
  mixup/EMA do not apply.

**ViTs** (timm ``vit_*``): built at ``img_size=input_size`` with the weights' patch size
(``patch_size`` overrides; it must agree), the weights' ``pos_embed`` resampled to the
model's patch grid (timm's ``resample_abs_pos_embed``) before the strict load; layer ids
as in MAE (embeddings 0, block i i + 1, final norm and head ``depth + 1``, lr ×
``layer_decay ** (depth + 1 - id)``); features for the head and the probe are the mean
of the normed patch tokens (``vit_pool="avg"``, default) or the class token (``token``).

**Evaluation and outputs** (in ``out``): after every epoch, accuracy, balanced
accuracy, macro-F1, one-vs-rest AUROC (:mod:`~mwm.downstream.classify_metrics`), a row
in ``metrics.csv``, ``confusion_last.{csv,png}``; the **best** epoch is chosen by
balanced accuracy (robust to class imbalance; ties keep the earlier epoch) and saved to
``best.pt`` with ``confusion_best.{csv,png}``; ``last.pt`` holds the full state
(model, optimizer, EMA, step, epoch, config, classes, mean/std, best so far) and is
written atomically at every epoch end and when ``max_steps`` stops a run.
``summary.json`` holds the configuration, data counts, weights report, and best/last
metrics; with ``linear``, ``predictions.csv`` the last evaluation's prediction for every
evaluation image (split, image, label, predicted, correct: the per-image outcome a paired
comparison of two encoders needs). ``eval_only`` loads ``weights`` (an MWM fine-tune
checkpoint) or else ``out/best.pt``, evaluates, and writes ``eval_metrics.json`` and
``confusion_eval.*``.

**Resume**: ``resume="auto"`` continues from ``out/last.pt`` if present (else starts
fresh); a path (file or run folder) must exist, or :class:`DataError`. Data order is a
function of ``(seed, epoch)``, augmentation of ``(seed, epoch, index)``, mixup and
dropout of ``(seed, step)``, so a resumed run repeats an uninterrupted one.

**Distributed**: under ``torchrun`` every process takes its share of each global batch
(DistributedDataParallel; gloo on CPU, NCCL on GPU). BatchNorm running statistics are
averaged over the ranks before every evaluation and at the end, so every process
evaluates the same model over the whole eval split; only rank 0 writes. At the end the
ranks compare weights, buffers and metrics (``summary["ranks_agree"]``). Linear probing
runs identically on every rank. Tested with 2 CPU processes.
"""

from __future__ import annotations

from ..engine import end_distributed
from .classifier import REPORTED, Finetuner, FinetuneConfig
from .classify_metrics import classification_metrics
from .full_finetune import run_finetune
from .linear_probe import run_linear
from .tasks import EvalTask, register_task
from .weights import load_weights, read_weights

__all__ = ["FinetuneConfig", "Finetuner", "REPORTED", "classification_metrics", "finetune",
           "load_weights", "read_weights"]


def finetune(cfg: FinetuneConfig) -> dict:
    """Fine-tune, linear-probe or evaluate (``cfg.eval_only``); return the summary dict.

    See the module docstring for data, weights, modes, outputs and resume.
    """
    runner, finished = Finetuner(cfg), False
    try:
        if cfg.eval_only:
            summary = runner.run_eval()
        elif cfg.mode == "linear":
            summary = run_linear(runner)
        else:
            summary = run_finetune(runner)
        finished = True
        return summary
    finally:
        end_distributed(finished)


# --------------------------------------------------------------------------- tasks

def _classify_task(cfg: FinetuneConfig) -> dict:
    summary = finetune(cfg)
    metrics = summary["last"]["metrics"]
    return {"split": summary["eval_split"], "epochs": summary["epochs_done"],
            "seconds": summary["seconds"], **{k: metrics[k] for k in REPORTED if k in metrics}}


register_task(EvalTask("linear-probe", "logistic regression on the frozen encoder's features",
                       FinetuneConfig, _classify_task, REPORTED, "accuracy",
                       fixed={"mode": "linear"}))
register_task(EvalTask("finetune", "classification, every weight trained", FinetuneConfig,
                       _classify_task, REPORTED, "accuracy", fixed={"mode": "finetune"}))
