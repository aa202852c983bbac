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

**Weights** (``weights``): an MWM ``encoder.safetensors``, an MWM pretrain
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

* ``finetune`` — all weights train. Layer-wise lr decay: parameters are grouped by the
  model's timm ``group_matcher(coarse=True)`` (ResNet: stem, layer1..layer4, head;
  ConvNeXt: stem, stages 0..3, head; other timm models likewise); a model without one
  falls back to 6 groups of equal parameter count in registration order (the last =
  the classifier). Group ``i`` of ``L`` gets ``lr * layer_decay ** (L - 1 - i)``. Peak
  lr = ``lr`` or ``base_lr * global_batch / 256``; linear warm-up over
  ``warmup_epochs`` then cosine (``mwm.pretrain.optim.lr_at``), per optimizer step.
  AdamW (betas 0.9/0.999) or LAMB; weight decay ``wd`` on weights (not on norms,
  biases). Loss: cross-entropy with ``label_smoothing``, or soft-target cross-entropy
  under mixup/cutmix (``timm.data.Mixup``). ``ema``: an exponential moving average of
  the weights (``timm.utils.ModelEmaV3``) which is then what is evaluated and saved as
  best. AMP: :func:`mwm.utils.resolve_amp` (``auto`` = bf16 where the device has native
  bf16, else fp32).
* ``linear`` — the encoder is frozen (eval mode, BN statistics untouched); pooled
  features of the train and eval images (no augmentation) are computed once, kept in
  memory, and standardized with the train features' mean/std. A logistic regression
  (``nn.Linear``, cross-entropy + ``wd/2 * ||W||²``, no label smoothing) is fitted
  full-batch with L-BFGS (strong-Wolfe line search), 20 iterations per "epoch"; the
  standardization is folded into the timm classifier, so the saved model is a plain
  timm classifier. ``lr``/``optimizer``/mixup/EMA do not apply.

**Evaluation and outputs** (in ``out``): after every epoch, accuracy, balanced
accuracy, macro-F1, one-vs-rest AUROC (:mod:`~mwm.downstream.classify_metrics`), a row
in ``metrics.csv``, ``confusion_last.{csv,png}``; the **best** epoch is chosen by
balanced accuracy (robust to class imbalance; ties keep the earlier epoch) and saved to
``best.pt`` with ``confusion_best.{csv,png}``; ``last.pt`` holds the full state
(model, optimizer, EMA, step, epoch, config, classes, mean/std, best so far) and is
written atomically at every epoch end and when ``max_steps`` stops a run.
``summary.json`` holds the configuration, data counts, weights report, and best/last
metrics. ``eval_only`` loads ``weights`` (an MWM fine-tune checkpoint) or else
``out/best.pt``, evaluates, and writes ``eval_metrics.json`` and ``confusion_eval.*``.

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

import csv
import dataclasses
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn

from ..errors import DataError

from ..data.io import read_slice, to_model_input
from ..pretrain.export import key_problems
from ..data.layouts import Sample, open_dataset
from .. import checkpoint
from ..files import write_json, write_text
from ..progress import progress as progress_bar
from ..pretrain.data import Augment, SeededImages, crop_box, pixel_stats, resize_image
from ..utils import AMP_CHOICES, backward_step, end_distributed, resolve_amp
from .classify_metrics import (classification_metrics, write_confusion_csv,
                               write_confusion_png)

__all__ = ["FinetuneConfig", "finetune", "classification_metrics", "load_weights",
           "build_classifier", "layer_groups", "ClassifyDataset"]

FORMAT = "mwm-finetune"
LAST, BEST = "last.pt", "best.pt"
METRICS_FIELDS = ("epoch", "step", "train_loss", "lr", "accuracy", "balanced_accuracy",
                  "macro_f1", "auroc", "seconds")
SELECT = "balanced_accuracy"
FALLBACK_GROUPS = 6
LBFGS_ITERS_PER_EPOCH = 20


@dataclass
class FinetuneConfig:
    data: str
    out: str
    weights: str | None = None
    model: str | None = None
    mode: str = "finetune"
    input_size: int = 224
    epochs: int = 50
    batch_size: int = 32
    lr: float | None = None
    base_lr: float = 1e-3
    layer_decay: float = 0.7
    warmup_epochs: float = 5.0
    optimizer: str = "adamw"
    wd: float = 0.05
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    ema: float | None = None
    amp: str = "auto"
    seed: int = 0
    workers: int = 2
    device: str = "auto"
    eval_only: bool = False
    resume: str | None = None
    quiet: bool = False
    max_steps: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("finetune", "linear"):
            raise ValueError(f"mode must be 'finetune' or 'linear', got {self.mode!r}")
        if self.optimizer not in ("adamw", "lamb"):
            raise ValueError(f"optimizer must be 'adamw' or 'lamb', got {self.optimizer!r}")
        if self.amp not in AMP_CHOICES:
            raise ValueError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise ValueError(f"ema must be a decay in (0, 1), got {self.ema}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.epochs < 1 or self.batch_size < 1 or self.input_size < 8:
            raise ValueError("epochs and batch_size must be >= 1 and input_size >= 8")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- data

class ClassifyDataset(SeededImages):
    """Labelled samples → ``(image_3ss float32 standardized, class index)``."""

    def __init__(self, samples: list[Sample], class_index: dict[str, int], input_size: int, *,
                 mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), augment: bool = False,
                 seed: int = 0):
        super().__init__(samples, input_size, mean=mean, std=std, seed=seed)
        self.targets = [class_index[s.label] for s in samples]
        self.augment = augment

    def load(self, index: int) -> np.ndarray:
        """(H, W, 3) float32 in [0, 1], not resized."""
        return to_model_input(read_slice(self.samples[index].image)).transpose(1, 2, 0)

    def __getitem__(self, index: int):
        image = self.load(index)
        if self.augment:
            rng = self.rng(index)
            top, left, h, w = crop_box(image.shape[0], image.shape[1], Augment(), rng)
            image = image[top:top + h, left:left + w]
            if rng.random() < 0.5:
                image = image[:, ::-1]
        return self.standardized(resize_image(image, self.input_size)), self.targets[index]


def train_stats(dataset: ClassifyDataset) -> tuple[list[float], list[float]]:
    """Per-channel mean/std over all pixels of the resized train images (one pass)."""
    mean, std = pixel_stats(resize_image(dataset.load(i), dataset.input_size)
                            for i in range(len(dataset)))
    return list(mean), list(std)


def split_samples(cfg: FinetuneConfig):
    """(train samples, eval samples, eval split name, classes, note)."""
    data = open_dataset(cfg.data)
    labelled = [s for s in data.samples if s.label is not None]
    if not labelled or not data.classes:
        raise DataError(f"{cfg.data}: no labelled images; classification needs class folders "
                        "or a CSV manifest with a 'label' column.")
    if len(data.classes) < 2:
        raise DataError(f"{cfg.data}: only one class ({data.classes[0]!r}); need at least two.")
    train = [s for s in labelled if s.split == "train"]
    if not train:
        raise DataError(f"{cfg.data}: no 'train' split. Give every image a split "
                        "(train/val/test) — class folders under train/, or a 'split' column.")
    note = None
    evaluation = [s for s in labelled if s.split == "val"]
    split = "val"
    if not evaluation:
        evaluation = [s for s in labelled if s.split == "test"]
        split = "test"
        note = "no 'val' split: evaluating on 'test' (do not select models on it for a report)."
        if not evaluation:
            raise DataError(f"{cfg.data}: no 'val' or 'test' split to evaluate on.")
    return train, evaluation, split, list(data.classes), note


# --------------------------------------------------------------------------- weights

def _unwrap(state: Any) -> dict:
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError("not a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _is_pretrain_checkpoint(obj: Any) -> bool:
    return (isinstance(obj, dict) and isinstance(obj.get("config"), dict)
            and "masking" in obj["config"] and isinstance(obj.get("model"), dict))


def read_weights(path: str | os.PathLike) -> tuple[dict, dict, str]:
    """``(state dict, metadata, kind)`` of a weights file or run folder.

    ``kind``: ``mwm-export``, ``mwm-pretrain``, ``mwm-finetune`` or ``timm``. The metadata
    may carry ``arch``, ``mean``, ``std``, ``input_size`` (and ``classes`` for fine-tune).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"--weights {path}: no such file or folder.")
    if path.is_dir():
        for name in ("encoder.safetensors", "checkpoint.pt", BEST, LAST):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise DataError(f"--weights {path}: the folder holds no encoder.safetensors, "
                            f"checkpoint.pt, {BEST} or {LAST}.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        from ..pretrain.export import FORMAT as EXPORT_FORMAT, read_metadata

        meta = read_metadata(path)
        state = load_file(str(path))
        return state, meta, "mwm-export" if meta.get("format") == EXPORT_FORMAT else "timm"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle / zip errors of all kinds
        raise DataError(f"--weights {path}: not a readable PyTorch weights file ({err}).") from err
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        meta = {k: obj.get(k) for k in ("arch", "mean", "std", "input_size", "classes")}
        return obj["model"], meta, "mwm-finetune"
    if _is_pretrain_checkpoint(obj):
        from ..pretrain.spark import SparKModel

        config = obj["config"]
        spark = SparKModel(config["model"], input_size=config["input_size"],
                           decoder_width=config.get("decoder_width"),
                           norm_pix_loss=config.get("norm_pix_loss", True))
        try:
            spark.load_state_dict(obj["model"])
        except RuntimeError as err:
            raise DataError(f"--weights {path}: the pretrain checkpoint does not match its own "
                            f"configuration ({err}).") from err
        meta = {"arch": obj.get("arch", config["model"]), "mean": obj.get("mean"),
                "std": obj.get("std"), "input_size": obj.get("input_size", config["input_size"])}
        return spark.encoder_state_dict(), meta, "mwm-pretrain"
    try:
        return _unwrap(obj), {}, "timm"
    except DataError as err:
        raise DataError(f"--weights {path}: {err} (expected an MWM export, an MWM checkpoint or "
                        "a timm state dict, optionally under 'state_dict'/'model'/'module').") from None


def load_weights(model: nn.Module, state: dict, *, source: str = "weights",
                 keep_head: bool = False) -> dict:
    """Load ``state`` into ``model`` strictly on the backbone; return a key report.

    Head keys in ``state`` are dropped (reported as ``ignored_head_keys``) unless
    ``keep_head`` and their shapes match. Any other missing / unexpected / mis-shaped
    key raises :class:`DataError` naming them.
    """
    from ..pretrain.export import _classifier_keys

    own = model.state_dict()
    head = _classifier_keys(model)
    ignored = [k for k in state if k in head and not (keep_head and k in own
                                                      and own[k].shape == state[k].shape)]
    state = {k: v for k, v in state.items() if k not in ignored}
    parts = key_problems(own, state, may_miss=head.__contains__)
    if parts:
        arch = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        raise DataError(f"{source}: the weights do not match the encoder {arch!r} — "
                        + "; ".join(parts) + ". Only the classifier head may differ; pass "
                        "--model with the architecture the weights were made for.")
    model.load_state_dict(state, strict=False)
    head_missing = sorted(k for k in own if k in head and k not in state)
    return {"loaded": len(state), "missing_head_keys": head_missing,
            "ignored_head_keys": sorted(ignored)}


def build_classifier(cfg: FinetuneConfig, num_classes: int, weights_meta: dict) -> tuple[nn.Module, str]:
    import timm

    arch = cfg.model or weights_meta.get("arch") or "resnet50"
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    except RuntimeError as err:
        raise DataError(f"--model {arch}: cannot create the timm model ({err}).") from err
    return model, arch


# --------------------------------------------------------------------------- optimizer

def layer_groups(model: nn.Module) -> tuple[dict[str, int], int, str]:
    """``(parameter name → layer id, number of layers, how)`` for layer-wise lr decay."""
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


def build_optimizer(model: nn.Module, cfg: FinetuneConfig) -> tuple[torch.optim.Optimizer, str]:
    ids, n_layers, how = layer_groups(model)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.ndim <= 1 or name.endswith(".bias"))
        key = (ids[name], decay)
        if key not in groups:
            groups[key] = {"params": [], "lr_scale": cfg.layer_decay ** (n_layers - 1 - ids[name]),
                           "decay": decay, "weight_decay": cfg.wd if decay else 0.0,
                           "name": f"layer{ids[name]}_{'decay' if decay else 'no_decay'}"}
        groups[key]["params"].append(param)
    ordered = [groups[k] for k in sorted(groups)]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(ordered, lr=1.0, betas=(0.9, 0.999)), how
    from timm.optim import Lamb

    return Lamb(ordered, lr=1.0, betas=(0.9, 0.999), max_grad_norm=None), how


# --------------------------------------------------------------------------- checkpoints

def load_state(path: str | Path) -> dict:
    path = checkpoint.find(path, LAST)
    obj = checkpoint.load(path, LAST)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise DataError(f"--resume {path}: not an MWM fine-tune checkpoint.")
    return obj


# --------------------------------------------------------------------------- the run

class Finetuner:
    def __init__(self, cfg: FinetuneConfig):
        from ..pretrain.train import init_distributed
        from ..utils import resolve_device

        self.cfg = cfg
        self.out = Path(cfg.out)
        self.t0 = time.perf_counter()
        self.device = resolve_device(cfg.device)
        self.dist = init_distributed(self.device)
        if self.device.type == "cuda" and self.dist.world > 1:
            self.device = torch.device("cuda", self.dist.local_rank)
        if self.device.type == "cpu":
            torch.set_flush_denormal(True)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2 ** 32)
        random.seed(cfg.seed)

        train, evaluation, self.eval_split, self.classes, self.note = split_samples(cfg)
        self.class_index = {c: i for i, c in enumerate(self.classes)}

        # what to start from: a resumed run, an evaluated checkpoint, or weights
        self.checkpoint = None
        if cfg.resume is not None and not cfg.eval_only:
            candidate = self.out / LAST if cfg.resume == "auto" else Path(cfg.resume)
            if cfg.resume != "auto" or candidate.is_file():
                self.checkpoint = load_state(candidate)
        state, meta, kind, source = None, {}, "scratch", None
        if self.checkpoint is not None:
            ck = self.checkpoint
            meta = {k: ck.get(k) for k in ("arch", "mean", "std", "input_size", "classes")}
            kind, source = "resume", str(cfg.resume)
            self._check_resume()
        elif cfg.eval_only:
            source = cfg.weights or (self.out / BEST)
            if cfg.weights is None and not (self.out / BEST).is_file():
                raise DataError(f"--eval-only: no --weights and no {self.out / BEST}; pass a "
                                "fine-tuned checkpoint (best.pt / last.pt).")
            state, meta, kind = read_weights(source)
        elif cfg.weights is not None:
            source = cfg.weights
            state, meta, kind = read_weights(cfg.weights)
        if cfg.eval_only and kind != "mwm-finetune":
            raise DataError(f"--eval-only needs a fine-tuned checkpoint (best.pt / last.pt); "
                            f"{source} is a {kind} file with no trained classifier.")
        if meta.get("classes") and list(meta["classes"]) != self.classes:
            if kind == "resume" or cfg.eval_only:
                raise DataError(f"{source}: the checkpoint was trained on classes {meta['classes']}, "
                                f"the data has {self.classes}.")
        self.model, self.arch = build_classifier(cfg, len(self.classes), meta)
        if (kind in ("resume", "mwm-finetune") and meta.get("arch")
                and cfg.model and cfg.model != meta["arch"]):
            raise DataError(f"{source}: made for {meta['arch']!r}, not --model {cfg.model!r}.")
        self.weights_report: dict = {"kind": kind, "source": str(source) if source else None}
        if self.checkpoint is not None:
            self.model.load_state_dict(self.checkpoint["model"])
        if state is not None:
            same_classes = list(meta.get("classes") or []) == self.classes
            self.weights_report.update(load_weights(
                self.model, state, source=str(source),
                keep_head=kind == "mwm-finetune" and same_classes))
        if meta.get("input_size") and int(meta["input_size"]) != cfg.input_size:
            self.weights_report["note"] = (f"weights made at input size {meta['input_size']}, "
                                           f"fine-tuning at {cfg.input_size}")

        # normalization
        self.train_set = ClassifyDataset(train, self.class_index, cfg.input_size, augment=True,
                                         seed=cfg.seed)
        if meta.get("mean") and meta.get("std"):
            self.mean, self.std = list(map(float, meta["mean"])), list(map(float, meta["std"]))
            self.normalization = f"{kind} metadata"
        else:
            self.mean, self.std = train_stats(self.train_set)
            self.normalization = f"computed on the train split ({len(train)} images)"
        for ds in (self.train_set,):
            ds.mean = np.asarray(self.mean, np.float32).reshape(3, 1, 1)
            ds.std = np.asarray(self.std, np.float32).reshape(3, 1, 1)
        self.eval_set = ClassifyDataset(evaluation, self.class_index, cfg.input_size,
                                        mean=self.mean, std=self.std, augment=False)
        self.plain_train_set = ClassifyDataset(train, self.class_index, cfg.input_size,
                                               mean=self.mean, std=self.std, augment=False)
        self.model.to(self.device)
        self.step, self.epoch = 0, 0
        self.best: dict | None = None
        self.last_metrics: dict | None = None

    # ---- helpers

    def _check_resume(self) -> None:
        saved = {k: v for k, v in self.checkpoint["config"].items()
                 if k not in ("resume", "max_steps", "quiet", "workers", "device", "out",
                              "eval_only", "weights")}
        mine = self.cfg.to_dict()
        changed = {k: (v, mine.get(k)) for k, v in saved.items() if mine.get(k) != v}
        if changed:
            detail = ", ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in changed.items())
            raise DataError(f"--resume: the checkpoint was made with other settings ({detail}). "
                            "Resume with the same settings or start a new run folder.")

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return resolve_amp(self.cfg.amp, self.device)

    def _autocast(self):
        dtype = self.amp_dtype
        return torch.autocast(self.device.type, dtype=dtype or torch.float32,
                              enabled=dtype is not None)

    def _loader(self, dataset, batch_sampler=None, batch_size=None):
        kwargs = dict(num_workers=self.cfg.workers, pin_memory=self.device.type == "cuda")
        if batch_sampler is not None:
            return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, **kwargs)
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, **kwargs)

    @torch.no_grad()
    def predict(self, model: nn.Module, dataset=None) -> tuple[np.ndarray, np.ndarray]:
        dataset = dataset or self.eval_set
        was_training = model.training
        model.eval()
        probs, labels = [], []
        for images, targets in self._loader(dataset, batch_size=self.cfg.batch_size):
            with self._autocast():
                logits = model(images.to(self.device))
            probs.append(torch.softmax(logits.float(), dim=1).cpu())
            labels.append(targets)
        model.train(was_training)
        return torch.cat(probs).numpy(), torch.cat(labels).numpy()

    def evaluate(self, model: nn.Module) -> dict:
        probs, labels = self.predict(model)
        return classification_metrics(probs, labels, self.classes)

    def _payload(self, model_state: dict, extra: dict | None = None) -> dict:
        return {"format": FORMAT, "model": model_state, "arch": self.arch,
                "classes": self.classes, "mean": self.mean, "std": self.std,
                "input_size": self.cfg.input_size, "config": self.cfg.to_dict(),
                "mode": self.cfg.mode, "step": self.step, "epoch": self.epoch,
                "best": self.best, **(extra or {})}

    def _write_confusion(self, stem: str, metrics: dict, title: str) -> None:
        write_confusion_csv(self.out / f"{stem}.csv", metrics["confusion_matrix"], self.classes)
        write_confusion_png(self.out / f"{stem}.png", metrics["confusion_matrix"], self.classes,
                            title=title)

    def _truncate_metrics(self) -> None:
        path = self.out / "metrics.csv"
        rows = []
        if path.is_file():
            with path.open(newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if int(r["epoch"]) <= self.epoch]
        lines = [",".join(METRICS_FIELDS)] + [",".join(r.get(k, "") for k in METRICS_FIELDS)
                                              for r in rows]
        write_text(path, "\n".join(lines) + "\n")

    def _record(self, metrics: dict, train_loss: float | None, lr: float | None,
                eval_model: nn.Module, seconds: float) -> None:
        """After an epoch: metrics row, confusion matrices, best.pt when improved."""
        self.last_metrics = metrics
        if not self.dist.main:
            return
        row = {"epoch": self.epoch, "step": self.step,
               "train_loss": "" if train_loss is None else f"{train_loss:.6f}",
               "lr": "" if lr is None else f"{lr:.6g}",
               **{k: "" if metrics[k] is None else f"{metrics[k]:.6f}"
                  for k in ("accuracy", "balanced_accuracy", "macro_f1", "auroc")},
               "seconds": f"{seconds:.2f}"}
        with (self.out / "metrics.csv").open("a") as handle:
            handle.write(",".join(str(row[k]) for k in METRICS_FIELDS) + "\n")
        self._write_confusion("confusion_last", metrics, f"epoch {self.epoch} ({self.eval_split})")
        if self.best is None or metrics[SELECT] > self.best["metrics"][SELECT]:
            self.best = {"epoch": self.epoch, "step": self.step, "metrics": _brief(metrics)}
            checkpoint.save(self.out / BEST, self._payload(_cpu_state(eval_model)))
            self._write_confusion("confusion_best", metrics,
                                  f"best: epoch {self.epoch} ({self.eval_split})")

    def _summary(self, extra: dict) -> dict:
        cfg = self.cfg
        summary = {
            "out_dir": str(self.out), "mode": cfg.mode, "arch": self.arch, "classes": self.classes,
            "n_train": len(self.train_set), "n_eval": len(self.eval_set),
            "eval_split": self.eval_split, "note": self.note,
            "normalization": {"source": self.normalization, "mean": self.mean, "std": self.std},
            "input_size": cfg.input_size, "resize": "resize to input_size x input_size (no padding)",
            "weights": self.weights_report, "selection": SELECT,
            "epochs_done": self.epoch, "steps": self.step,
            "best": self.best,
            "last": {"epoch": self.epoch, "metrics": _brief(self.last_metrics)
                     if self.last_metrics else None},
            "paths": {k: str(self.out / v) for k, v in (("best", BEST), ("last", LAST),
                                                       ("metrics", "metrics.csv"))
                      if (self.out / v).exists()},
            "seconds": time.perf_counter() - self.t0,
            "world_size": self.dist.world,
            "config": cfg.to_dict(),
            **extra,
        }
        if self.dist.main:
            write_json(self.out / "summary.json", summary)
        return summary

    def _sync_bn_stats(self, model: nn.Module, ema=None) -> None:
        """Average BatchNorm running statistics over the ranks (no-op in one process).

        DDP keeps parameters equal but each rank's BN running mean/var follow its own
        batches; without this, ranks would evaluate (and rank 0 save) different models.
        """
        if self.dist.world == 1:
            return
        from timm.utils import distribute_bn

        for module in (model, ema.module if ema is not None else None):
            if module is not None:
                distribute_bn(module, self.dist.world, reduce=True)

    def _ranks_agree(self, model: nn.Module) -> bool | None:
        """Under torchrun: do all ranks hold the same weights and buffers and report the
        same last metrics? ``None`` in a single process."""
        if self.dist.world == 1:
            return None
        metrics = self.last_metrics or {}
        sums = [float(v.double().sum()) for v in model.state_dict().values()]
        scores = [float(metrics.get(k) or 0.0) for k in ("accuracy", "balanced_accuracy",
                                                         "macro_f1", "auroc")]
        local = torch.tensor(sums + scores, dtype=torch.float64, device=self.device)
        gathered = [torch.zeros_like(local) for _ in range(self.dist.world)]
        torch_dist.all_gather(gathered, local)
        return all(torch.equal(g, gathered[0]) for g in gathered)

    # ---- eval only

    def run_eval(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        metrics = self.evaluate(self.model)
        self.last_metrics = metrics
        if self.dist.main:
            write_json(self.out / "eval_metrics.json",
                       {"split": self.eval_split, "weights": self.weights_report, **metrics})
            self._write_confusion("confusion_eval", metrics, f"eval ({self.eval_split})")
        return {"out_dir": str(self.out), "eval_only": True, "eval_split": self.eval_split,
                "note": self.note, "classes": self.classes, "weights": self.weights_report,
                "metrics": metrics, "normalization": self.normalization,
                "paths": {"metrics": str(self.out / "eval_metrics.json")}}

    # ---- full fine-tuning

    def run_finetune(self) -> dict:
        from ..pretrain.optim import lr_at, peak_lr
        from ..pretrain.train import epoch_batches

        cfg = self.cfg
        model = self.model
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        else:
            ddp = model
        optimizer, self.grouping = build_optimizer(model, cfg)
        ema = None
        if cfg.ema is not None:
            from timm.utils import ModelEmaV3

            ema = ModelEmaV3(model, decay=cfg.ema)
        scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            from timm.data import Mixup

            mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix,
                          label_smoothing=cfg.label_smoothing, num_classes=len(self.classes))
            from timm.loss import SoftTargetCrossEntropy

            criterion = SoftTargetCrossEntropy()
        else:
            criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

        n_train = len(self.train_set)
        batch = min(cfg.batch_size, n_train // self.dist.world)
        if mixup is not None:
            batch -= batch % 2
        if batch < 1 or (mixup is not None and batch < 2):
            raise DataError(f"{n_train} train images are too few for {self.dist.world} processes.")
        self.batch = batch
        steps_per_epoch = n_train // (batch * self.dist.world)
        total = cfg.epochs * steps_per_epoch
        warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
        peak = peak_lr(cfg.base_lr, batch * self.dist.world, cfg.lr)

        if self.checkpoint is not None:
            ck = self.checkpoint
            model.load_state_dict(ck["model_train"])
            optimizer.load_state_dict(ck["optimizer"])
            if ema is not None:
                if ck.get("ema") is None:
                    raise DataError("--resume: the checkpoint has no EMA weights but --ema is set.")
                ema.module.load_state_dict(ck["ema"])
            if scaler is not None and ck.get("scaler"):
                scaler.load_state_dict(ck["scaler"])
            self.step, self.epoch, self.best = int(ck["step"]), int(ck["epoch"]), ck.get("best")

        self.out.mkdir(parents=True, exist_ok=True)
        if self.dist.main:
            self._truncate_metrics()
        stop = cfg.max_steps if cfg.max_steps is not None else total
        lr, loss_value = None, None

        def save_last():
            if self.dist.main:
                checkpoint.save(self.out / LAST, self._payload(
                    _cpu_state(ema.module if ema is not None else model),
                    {"model_train": _cpu_state(model), "optimizer": optimizer.state_dict(),
                     "ema": _cpu_state(ema.module) if ema is not None else None,
                     "scaler": scaler.state_dict() if scaler is not None else None,
                     "rng": checkpoint.rng_state()}))

        model.train()
        while self.epoch < cfg.epochs and self.step < stop:
            epoch_t0 = time.perf_counter()
            self.train_set.set_epoch(self.epoch)
            batches = epoch_batches(n_train, batch, self.epoch, cfg.seed, self.dist, steps_per_epoch)
            skip = self.step - self.epoch * steps_per_epoch
            losses = []
            bar = progress_bar(self._loader(self.train_set, batch_sampler=batches[skip:]),
                               total=len(batches) - skip, unit="batch",
                               desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                               enabled=not cfg.quiet and self.dist.main)
            for images, targets in bar:
                images, targets = images.to(self.device), targets.to(self.device)
                step_seed = (cfg.seed * 1_000_003 + self.step) * 1_009 + self.dist.rank
                torch.manual_seed(step_seed)
                np.random.seed(step_seed % 2 ** 32)
                if mixup is not None:
                    images, targets = mixup(images, targets)
                lr = lr_at(self.step, total, warmup, peak)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group["lr_scale"]
                with self._autocast():
                    logits = ddp(images)
                loss = criterion(logits.float(), targets)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at step {self.step}: lower "
                                             "--lr or use --amp none; the last checkpoint is intact.")
                backward_step(loss, optimizer, scaler)
                if ema is not None:
                    ema.update(model, step=self.step)
                losses.append(float(loss.detach()))
                self.step += 1
                if self.step >= stop:
                    break
            loss_value = float(np.mean(losses)) if losses else None
            if self.step % steps_per_epoch == 0 and self.step // steps_per_epoch > self.epoch:
                self.epoch += 1
                self._sync_bn_stats(model, ema)
                eval_model = ema.module if ema is not None else model
                metrics = self.evaluate(eval_model)
                self._record(metrics, loss_value, lr, eval_model, time.perf_counter() - epoch_t0)
                save_last()
        self._sync_bn_stats(model, ema)
        save_last()
        if self.last_metrics is None or self.step % steps_per_epoch:
            self.last_metrics = self.evaluate(ema.module if ema is not None else model)
        return self._summary({"steps_per_epoch": steps_per_epoch, "batch_size": batch,
                              "peak_lr": peak, "layer_groups": self.grouping,
                              "final_train_loss": loss_value,
                              "ranks_agree": self._ranks_agree(ema.module if ema is not None
                                                               else model)})

    # ---- linear probing

    @torch.no_grad()
    def features(self, dataset) -> tuple[torch.Tensor, torch.Tensor]:
        feats, labels = [], []
        for images, targets in progress_bar(self._loader(dataset, batch_size=self.cfg.batch_size),
                                            desc="features", unit="batch",
                                            enabled=not self.cfg.quiet and self.dist.main):
            with self._autocast():
                f = self.model.forward_head(self.model.forward_features(images.to(self.device)),
                                            pre_logits=True)
            feats.append(f.float().flatten(1).cpu())
            labels.append(targets)
        return torch.cat(feats).double(), torch.cat(labels)

    def run_linear(self) -> dict:
        cfg = self.cfg
        model = self.model
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        t0 = time.perf_counter()
        x_train, y_train = self.features(self.plain_train_set)
        x_eval, y_eval = self.features(self.eval_set)
        feature_seconds = time.perf_counter() - t0
        mu = x_train.mean(0)
        sd = x_train.std(0, unbiased=False).clamp_min(1e-6)
        z_train = (x_train - mu) / sd
        k = len(self.classes)
        probe = nn.Linear(z_train.shape[1], k).double()
        nn.init.zeros_(probe.weight)
        nn.init.zeros_(probe.bias)
        optimizer = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=LBFGS_ITERS_PER_EPOCH,
                                      history_size=20, line_search_fn="strong_wolfe",
                                      tolerance_grad=1e-9, tolerance_change=1e-12)
        if self.checkpoint is not None:
            ck = self.checkpoint
            probe.load_state_dict(ck["probe"])
            optimizer.load_state_dict(ck["optimizer"])
            self.step, self.epoch, self.best = int(ck["step"]), int(ck["epoch"]), ck.get("best")
        self.out.mkdir(parents=True, exist_ok=True)
        if self.dist.main:
            self._truncate_metrics()

        def closure():
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(probe(z_train), y_train) \
                + 0.5 * cfg.wd * probe.weight.pow(2).sum()
            loss.backward()
            return loss

        head = model.get_classifier()
        if not isinstance(head, nn.Linear):
            raise DataError(f"--mode linear: {self.arch}'s classifier is {type(head).__name__}, "
                            "not a single linear layer.")

        def fold():
            """Put standardization + probe into the timm head: W' = W/sd, b' = b - W'·mu."""
            w = probe.weight.detach() / sd
            head.weight.copy_(w.to(head.weight))
            head.bias.copy_((probe.bias.detach() - w @ mu).to(head.bias))

        stop = cfg.max_steps if cfg.max_steps is not None else cfg.epochs
        loss_value = None
        while self.epoch < cfg.epochs and self.step < stop:
            epoch_t0 = time.perf_counter()
            loss_value = float(optimizer.step(closure).detach())
            self.step += 1
            self.epoch += 1
            with torch.no_grad():
                fold()
                probs = torch.softmax(probe((x_eval - mu) / sd), dim=1).numpy()
            metrics = classification_metrics(probs, y_eval.numpy(), self.classes)
            self._record(metrics, loss_value, None, model, time.perf_counter() - epoch_t0)
            if self.dist.main:
                checkpoint.save(self.out / LAST, self._payload(
                    _cpu_state(model), {"probe": probe.state_dict(),
                                        "optimizer": optimizer.state_dict(), "rng": checkpoint.rng_state()}))
        with torch.no_grad():
            fold()
        if self.last_metrics is None:
            self.last_metrics = self.evaluate(model)
        return self._summary({"feature_dim": int(x_train.shape[1]),
                              "feature_seconds": feature_seconds,
                              "final_train_loss": loss_value, "solver": "lbfgs",
                              "ranks_agree": self._ranks_agree(model)})


def _cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}


def _brief(metrics: dict | None) -> dict | None:
    if metrics is None:
        return None
    keys = ("n", "accuracy", "balanced_accuracy", "macro_f1", "auroc", "auroc_skipped",
            "confusion_matrix")
    return {k: metrics[k] for k in keys}


def finetune(cfg: FinetuneConfig) -> dict:
    """Fine-tune, linear-probe or evaluate (``cfg.eval_only``); return the summary dict.

    See the module docstring for data, weights, modes, outputs and resume.
    """
    runner, finished = Finetuner(cfg), False
    try:
        if cfg.eval_only:
            summary = runner.run_eval()
        elif cfg.mode == "linear":
            summary = runner.run_linear()
        else:
            summary = runner.run_finetune()
        finished = True
        return summary
    finally:
        end_distributed(finished)
