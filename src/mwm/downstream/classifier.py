"""The classifier of ``mwm finetune``: settings, data, weights, model, evaluation and records.

:class:`Finetuner` sets a run up (splits, classes, starting weights, normalization, the
model) and keeps what both modes share: prediction and metrics, ``metrics.csv``, confusion
matrices, ``best.pt`` / ``last.pt`` payloads and ``summary.json``. The modes are
:mod:`mwm.downstream.full_finetune` and :mod:`mwm.downstream.linear_probe`; the entry point
is :func:`mwm.downstream.classify.finetune`.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import checkpoint
from ..config import check_ranges, opt
from ..data.io import read_slice, to_model_input
from ..data.layouts import Sample, open_dataset
from ..engine import (CsvLog, Engine, autocast, check_settings, init_distributed,
                      ranks_agree)
from ..errors import DataError
from ..files import write_json
from ..pretrain.config import DEFAULT_ENCODER, DEFAULT_INPUT_SIZE
from ..pretrain.data import Augment, SeededImages, crop_box, pixel_stats, resize_image
from ..utils import AMP_CHOICES, resolve_amp
from .classify_metrics import (classification_metrics, write_confusion_csv,
                               write_confusion_png)
from .vit import check_grid, is_vit, is_vit_model, patch_size_of
from .weights import BEST, FINETUNE_FORMAT, FINETUNE_META, LAST, load_weights, read_weights

__all__ = ["FinetuneConfig", "Finetuner", "ClassifyDataset", "build_classifier", "split_samples"]

MODES = ("finetune", "linear")
VIT_POOLS = ("avg", "token")
REPORTED = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")
METRICS_FIELDS = ("epoch", "step", "train_loss", "lr", *REPORTED, "seconds")
SELECT = "balanced_accuracy"
#: Settings that may change when a run is resumed.
RESUME_FREE = ("resume", "max_steps", "quiet", "workers", "device", "out", "eval_only", "weights")


@dataclass(kw_only=True)
class FinetuneConfig:
    """Everything a fine-tuning or linear-probing run depends on."""

    data: str = opt(help="class folders (train/val/test/<class>/), CSV manifest with label and "
                    "split columns, or a phantom folder", positional=True)
    out: str = opt(help="the run folder")
    weights: str | None = opt(None, "MWM encoder.safetensors, pretrain checkpoint.pt or run "
                              "folder, a timm checkpoint; none = from scratch")
    model: str | None = opt(None, f"timm architecture (default: from the weights, else "
                            f"{DEFAULT_ENCODER})")
    mode: str = opt("finetune", "finetune (all weights) or linear (frozen encoder, logistic "
                    "regression on its features)", choices=MODES)
    input_size: int = opt(DEFAULT_INPUT_SIZE, "pixels (images are resized to it)", low=8)
    patch_size: int | None = opt(None, "ViT patch size (default: the weights', else the "
                                 "architecture's); CNNs ignore it", low=1)
    vit_pool: str | None = opt(None, "ViT features for the head: avg (mean of the patch tokens "
                               "after the final norm; the default) or token (the CLS token); "
                               "CNNs ignore it", choices=VIT_POOLS)
    epochs: int = opt(50, "epochs", low=1)
    batch_size: int = opt(32, "images per step and process", low=1)
    lr: float | None = opt(None, "peak lr, used as given (default: base-lr x batch / 256)",
                           above=0.0)
    base_lr: float = opt(1e-3, "learning rate per 256 images", above=0.0)
    layer_decay: float = opt(0.7, "layer-wise lr decay", above=0.0, high=1.0)
    warmup_epochs: float = opt(5.0, "linear warm-up epochs", low=0.0)
    optimizer: str = opt("adamw", "optimizer", choices=("adamw", "lamb"))
    wd: float = opt(0.05, "weight decay (finetune); L2 weight of the probe (linear)", low=0.0)
    label_smoothing: float = opt(0.1, "label smoothing of the cross-entropy", low=0.0, high=1.0)
    mixup: float = opt(0.0, "mixup alpha (0 = off)", low=0.0)
    cutmix: float = opt(0.0, "cutmix alpha (0 = off)", low=0.0)
    ema: float | None = opt(None, "EMA decay of the weights, e.g. 0.999", above=0.0, high=0.9999999)
    amp: str = opt("auto", "mixed precision (auto = bf16 where the device has native bf16, "
                   "else fp32; fp16 with a grad scaler needs a GPU)", choices=AMP_CHOICES)
    seed: int = opt(0, "random seed")
    workers: int = opt(2, "data-loader worker processes", low=0)
    device: str = opt("auto", "cpu, cuda, cuda:N or auto (a GPU if there is one)")
    eval_only: bool = opt(False, "evaluate a fine-tuned checkpoint (best.pt / last.pt)")
    resume: str | None = checkpoint.resume_option('last.pt')
    quiet: bool = opt(False, "no progress bars")
    max_steps: int | None = checkpoint.max_steps_option()

    def __post_init__(self) -> None:
        check_ranges(self)

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


def build_classifier(cfg: FinetuneConfig, num_classes: int, weights_meta: dict) -> tuple[nn.Module, str]:
    import timm

    arch = cfg.model or weights_meta.get("arch") or DEFAULT_ENCODER
    kwargs = vit_kwargs(cfg, weights_meta) if is_vit(arch) else {}
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    except RuntimeError as err:
        raise DataError(f"--model {arch}: cannot create the timm model ({err}).") from err
    if kwargs:
        check_grid(model, cfg.input_size)
    return model, arch


def vit_kwargs(cfg: FinetuneConfig, weights_meta: dict) -> dict:
    """timm arguments of a ViT classifier: the fine-tune input size, the weights' patch
    size (or ``cfg.patch_size``, else the architecture's) and the pooling (a fine-tune
    checkpoint's own, else ``cfg.vit_pool``, default avg). ``fc_norm=False`` keeps the
    final ``norm`` (and so the exported keys) with avg pooling too."""
    saved = weights_meta.get("patch_size")
    if cfg.patch_size and saved and int(saved) != cfg.patch_size:
        raise DataError(f"--patch-size {cfg.patch_size}: the weights ({cfg.weights}) were made "
                        f"with patch size {saved}; pass --patch-size {saved} or leave it out.")
    patch = cfg.patch_size or saved
    pool = weights_meta.get("global_pool") or cfg.vit_pool or VIT_POOLS[0]
    return {"img_size": cfg.input_size, "global_pool": pool, "fc_norm": False,
            **({"patch_size": int(patch)} if patch else {})}


# --------------------------------------------------------------------------- checkpoints

def load_state(path: str | Path) -> dict:
    path = checkpoint.find(path, LAST)
    obj = checkpoint.load(path, LAST, kind="finetune")
    if not isinstance(obj, dict) or obj.get("format") != FINETUNE_FORMAT:
        raise DataError(f"--resume {path}: not an MWM fine-tune checkpoint.")
    return obj


class Finetuner:
    """One classification run: data, model and weights are set up here; :meth:`run_finetune`,
    :func:`~mwm.downstream.linear_probe.run_linear` and :meth:`run_eval` are the runs."""

    def __init__(self, cfg: FinetuneConfig):
        from ..utils import resolve_device

        self.cfg = cfg
        self.out = Path(cfg.out)
        self.t0 = time.perf_counter()
        self.dist, self.device = init_distributed(resolve_device(cfg.device))
        self.amp_dtype = resolve_amp(cfg.amp, self.device)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2 ** 32)
        random.seed(cfg.seed)
        train, evaluation, self.eval_split, self.classes, self.note = split_samples(cfg)
        self.class_index = {c: i for i, c in enumerate(self.classes)}
        self.checkpoint = self._resumed_checkpoint()
        state, meta, kind, source = self._starting_weights()
        self.model, self.arch = build_classifier(cfg, len(self.classes), meta)
        self.vit = ({"patch_size": patch_size_of(self.model), "global_pool": self.model.global_pool}
                    if is_vit_model(self.model) else {})
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
                keep_head=kind == "mwm-finetune" and same_classes, meta=meta))
        if meta.get("input_size") and int(meta["input_size"]) != cfg.input_size:
            self.weights_report["note"] = (f"weights made at input size {meta['input_size']}, "
                                           f"fine-tuning at {cfg.input_size}")
        self._datasets(train, evaluation, meta, kind)
        self.model.to(self.device)
        self.engine: Engine | None = None
        self.best: dict | None = None
        self.last_metrics: dict | None = None
        self.metrics_log = CsvLog(self.out / "metrics.csv", METRICS_FIELDS, enabled=self.dist.main)

    def _resumed_checkpoint(self) -> dict | None:
        cfg = self.cfg
        if cfg.resume is None or cfg.eval_only:
            return None
        candidate = self.out / LAST if cfg.resume == "auto" else Path(cfg.resume)
        if cfg.resume == "auto" and not candidate.is_file():
            return None
        ck = load_state(candidate)
        check_settings(ck["config"], cfg.to_dict(), ignore=RESUME_FREE)
        return ck

    def _starting_weights(self) -> tuple[dict | None, dict, str, str | None]:
        """``(state, metadata, kind, source)``: a resumed run, an evaluated checkpoint, or
        the given weights (or none: from scratch)."""
        cfg = self.cfg
        state, meta, kind, source = None, {}, "scratch", None
        if self.checkpoint is not None:
            meta = {k: self.checkpoint.get(k) for k in FINETUNE_META}
            kind, source = "resume", str(cfg.resume)
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
        return state, meta, kind, source

    def _datasets(self, train: list[Sample], evaluation: list[Sample], meta: dict, kind: str):
        """Train (augmented), plain train and eval sets with the weights' normalization, or
        with statistics of the train split when the weights carry none."""
        cfg = self.cfg
        self.train_set = ClassifyDataset(train, self.class_index, cfg.input_size, augment=True,
                                         seed=cfg.seed)
        if meta.get("mean") and meta.get("std"):
            self.mean, self.std = list(map(float, meta["mean"])), list(map(float, meta["std"]))
            self.normalization = f"{kind} metadata"
        else:
            self.mean, self.std = train_stats(self.train_set)
            self.normalization = f"computed on the train split ({len(train)} images)"
        self.train_set.mean = np.asarray(self.mean, np.float32).reshape(3, 1, 1)
        self.train_set.std = np.asarray(self.std, np.float32).reshape(3, 1, 1)
        self.eval_set = ClassifyDataset(evaluation, self.class_index, cfg.input_size,
                                        mean=self.mean, std=self.std, augment=False)
        self.plain_train_set = ClassifyDataset(train, self.class_index, cfg.input_size,
                                               mean=self.mean, std=self.std, augment=False)

    # ---- helpers

    @property
    def step(self) -> int:
        return self.engine.step_count if self.engine is not None else 0

    @property
    def epoch(self) -> int:
        return self.engine.epoch if self.engine is not None else 0

    def autocast(self):
        return autocast(self.device, self.amp_dtype)

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
            with self.autocast():
                logits = model(images.to(self.device))
            probs.append(torch.softmax(logits.float(), dim=1).cpu())
            labels.append(targets)
        model.train(was_training)
        return torch.cat(probs).numpy(), torch.cat(labels).numpy()

    def evaluate(self, model: nn.Module) -> dict:
        probs, labels = self.predict(model)
        return classification_metrics(probs, labels, self.classes)

    def _payload(self, model_state: dict, extra: dict | None = None) -> dict:
        return {"format": FINETUNE_FORMAT, "model": model_state, "arch": self.arch,
                "classes": self.classes, "mean": self.mean, "std": self.std,
                "input_size": self.cfg.input_size, "config": self.cfg.to_dict(),
                "mode": self.cfg.mode, "step": self.step, "epoch": self.epoch,
                "best": self.best, **self.vit, **(extra or {})}

    def _write_confusion(self, stem: str, metrics: dict, title: str) -> None:
        write_confusion_csv(self.out / f"{stem}.csv", metrics["confusion_matrix"], self.classes)
        write_confusion_png(self.out / f"{stem}.png", metrics["confusion_matrix"], self.classes,
                            title=title)

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
        self.metrics_log.append(row)
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
            **({"vit": self.vit} if self.vit else {}),
            **extra,
        }
        if self.dist.main:
            write_json(self.out / "summary.json", summary)
        return summary

    def _ranks_agree(self, model: nn.Module) -> bool | None:
        """Under torchrun: do all ranks hold the same weights and buffers and report the
        same last metrics? ``None`` in a single process."""
        metrics = self.last_metrics or {}
        scores = [float(metrics.get(k) or 0.0) for k in REPORTED]
        return ranks_agree(self.dist, model.state_dict().values(), scores, device=self.device)

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


def _cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}


def _brief(metrics: dict | None) -> dict | None:
    if metrics is None:
        return None
    keys = ("n", *REPORTED, "auroc_skipped", "confusion_matrix")
    return {k: metrics[k] for k in keys}
