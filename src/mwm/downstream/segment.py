"""``mwm segment``: semantic segmentation on top of a (pretrained) encoder.

**Data.** Any layout :func:`~mwm.data.layouts.open_dataset` reads whose samples have masks
and splits (a phantom folder, a CSV manifest with ``mask`` and ``split`` columns). Labels:
``binary`` (lesion vs background: mask > 0) or ``classes`` (a label per lesion class: the
sample's ``label`` inside its mask; class ``none`` and unlabelled masks count as
background-only images). Images and masks are resized to ``input_size`` (masks nearest).

**Model** (:mod:`mwm.downstream.segment_decoders`). The encoder is built by timm with
``num_classes=0`` and loaded strictly by :func:`~mwm.downstream.weights.load_weights`,
like ``mwm finetune`` (a ViT at ``input_size`` with the weights' patch size, its position
embeddings resampled). A CNN's feature pyramid (timm ``forward_intermediates``) goes into a
UNet-style decoder; a ViT's four block outputs are first brought to strides P/8-P
(UNETR-style in 2-D). ``probe`` freezes the encoder (weights and BatchNorm statistics),
``finetune`` trains everything.

**Loss.** Cross-entropy + soft Dice (mean over the foreground classes).

**Metrics** (per image and foreground class, then means): DSC, NSD (2 px) and HD95 from
:mod:`mwm.metrics`, with ``mwm evaluate``'s empty conventions (both empty: DSC = NSD = 1,
HD95 = 0; one empty: DSC = NSD = 0, HD95 = inf; the HD95 mean is over finite values and
``hd95_infinite`` counts the rest).

**Outputs.** ``metrics.csv`` (one row per epoch, val), ``best.pt`` (best val DSC),
``last.pt`` (full state, for ``--resume``), ``per_image.csv`` and ``overlays/`` (val and
test, last model), ``summary.json``.
"""

from __future__ import annotations

import csv
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .. import checkpoint
from ..config import check_ranges, opt
from ..data.io import read_mask, read_slice, to_model_input
from ..data.layouts import Sample, open_dataset
from ..engine import (
    CsvLog,
    Engine,
    Schedule,
    build_optimizer,
    check_settings,
    epoch_batches,
    param_groups,
    peak_lr,
)
from ..errors import DataError
from ..files import write_json
from ..metrics import dice, hausdorff95, nsd
from ..pretrain.config import DEFAULT_ENCODER, DEFAULT_INPUT_SIZE
from ..pretrain.data import SeededImages, pixel_stats, resize_image
from ..utils import AMP_CHOICES
from .segment_decoders import SegNet
from .tasks import EvalTask, register_task
from .vit import check_grid, is_vit
from .weights import BEST, LAST, load_weights, read_weights

__all__ = ["SegmentConfig", "aggregate", "image_metrics", "segment"]

SEGMENT_FORMAT = checkpoint.SEGMENT_FORMAT
MODES = ("finetune", "probe")
LABELS = ("binary", "classes")
REPORTED = ("dice", "nsd", "hd95")
METRICS_FIELDS = ("epoch", "step", "train_loss", "lr", *REPORTED, "seconds")
RESUME_FREE = ("resume", "max_steps", "quiet", "workers", "device", "out", "weights")
NSD_TOLERANCE = 2.0


@dataclass(kw_only=True)
class SegmentConfig:
    """Everything a segmentation run depends on."""

    data: str = opt(help="images with masks and splits: a phantom folder or a CSV manifest "
                    "with mask and split columns", positional=True)
    out: str = opt(help="the run folder")
    weights: str | None = opt(None, "MWM encoder.safetensors, pretrain checkpoint.pt or run "
                              "folder, a timm checkpoint; none = from scratch")
    model: str | None = opt(None, f"timm CNN architecture (default: from the weights, else "
                            f"{DEFAULT_ENCODER})")
    mode: str = opt("finetune", "finetune (all weights) or probe (frozen encoder, the decoder "
                    "trains)", choices=MODES)
    labels: str = opt("binary", "binary (lesion vs background) or classes (one label per "
                      "lesion class, from the samples' labels)", choices=LABELS)
    input_size: int = opt(DEFAULT_INPUT_SIZE, "pixels (images and masks are resized to it)",
                          low=16)
    patch_size: int | None = opt(None, "ViT patch size (default: the weights', else the "
                                 "architecture's); CNNs ignore it", low=1)
    decoder_width: int = opt(64, "channels of every decoder level", low=4)
    epochs: int = opt(20, "epochs", low=1)
    batch_size: int = opt(8, "images per step", low=1)
    lr: float | None = opt(None, "peak lr (default: base-lr x batch / 256)", above=0.0)
    base_lr: float = opt(1e-3, "learning rate per 256 images", above=0.0)
    warmup_epochs: float = opt(1.0, "linear warm-up epochs", low=0.0)
    optimizer: str = opt("adamw", "optimizer", choices=("adamw", "lamb"))
    wd: float = opt(1e-4, "weight decay (not on norms and biases)", low=0.0)
    overlays: int = opt(8, "overlay PNGs (image | truth | prediction) per split", low=0)
    amp: str = opt("auto", "mixed precision", choices=AMP_CHOICES)
    seed: int = opt(0, "random seed")
    workers: int = opt(0, "data-loader worker processes", low=0)
    device: str = opt("auto", "cpu, cuda, cuda:N or auto")
    resume: str | None = checkpoint.resume_option('last.pt')
    quiet: bool = opt(False, "no progress output")
    max_steps: int | None = checkpoint.max_steps_option()

    def __post_init__(self) -> None:
        check_ranges(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- data

class SegmentDataset(SeededImages):
    """Samples → ``(standardized image (3, S, S), label map (S, S) int64)``."""

    def __init__(self, samples: list[Sample], classes: list[str], input_size: int, *,
                 mean, std, augment: bool = False, seed: int = 0):
        super().__init__(samples, input_size, mean=mean, std=std, seed=seed)
        self.index = {c: i for i, c in enumerate(classes)}
        self.binary = classes == ["background", "lesion"]
        self.augment = augment

    def image(self, i: int) -> np.ndarray:
        """(S, S, 3) float32 in [0, 1]."""
        image = to_model_input(read_slice(self.samples[i].image)).transpose(1, 2, 0)
        return resize_image(image, self.input_size)

    def target(self, i: int) -> np.ndarray:
        import cv2

        sample = self.samples[i]
        mask = np.asarray(read_mask(sample.mask)) > 0
        mask = cv2.resize(mask.astype(np.uint8), (self.input_size,) * 2,
                          interpolation=cv2.INTER_NEAREST) > 0
        value = 1 if self.binary else self.index.get(sample.label or "", 0)
        return (mask * value).astype(np.int64)

    def __getitem__(self, i: int):
        image, target = self.image(i), self.target(i)
        if self.augment and self.rng(i).random() < 0.5:
            image, target = image[:, ::-1], target[:, ::-1]
        return self.standardized(image), torch.from_numpy(np.ascontiguousarray(target))


def split_samples(cfg: SegmentConfig) -> tuple[dict[str, list[Sample]], list[str]]:
    """``({split: samples with masks}, classes)``; class 0 is the background."""
    data = open_dataset(cfg.data)
    masked = [s for s in data.samples if s.mask is not None]
    if not masked:
        raise DataError(f"{cfg.data}: no image has a mask; segmentation needs masks (a phantom "
                        "folder, or a CSV manifest with a 'mask' column).")
    splits = {name: [s for s in masked if s.split == name] for name in ("train", "val", "test")}
    if not splits["train"]:
        raise DataError(f"{cfg.data}: no masked image in the 'train' split; give every image a "
                        "split (train/val/test).")
    if not splits["val"] and not splits["test"]:
        raise DataError(f"{cfg.data}: no 'val' or 'test' split to evaluate on.")
    if cfg.labels == "binary":
        return splits, ["background", "lesion"]
    lesions = sorted({s.label for s in masked if s.label and s.label != "none"})
    if not lesions:
        raise DataError(f"{cfg.data}: --labels classes needs lesion labels; no sample has one. "
                        "Use --labels binary.")
    return splits, ["background", *lesions]


# --------------------------------------------------------------------------- model

def build_encoder(cfg: SegmentConfig, meta: dict) -> tuple[nn.Module, str]:
    """The timm encoder without its head; a ViT at ``input_size`` with the weights' patch
    size (``patch_size`` must agree)."""
    import timm

    arch = cfg.model or meta.get("arch") or DEFAULT_ENCODER
    kwargs = {}
    if is_vit(arch):
        saved = meta.get("patch_size")
        if cfg.patch_size and saved and int(saved) != cfg.patch_size:
            raise DataError(f"--patch-size {cfg.patch_size}: the weights ({cfg.weights}) were "
                            f"made with patch size {saved}; pass --patch-size {saved}.")
        patch = cfg.patch_size or saved
        kwargs = {"img_size": cfg.input_size, **({"patch_size": int(patch)} if patch else {})}
    try:
        encoder = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    except RuntimeError as err:
        raise DataError(f"--model {arch}: cannot create the timm model ({err}).") from err
    if kwargs:
        check_grid(encoder, cfg.input_size)
    if not hasattr(encoder, "forward_intermediates"):
        raise DataError(f"--model {arch}: timm gives no feature maps for it.")
    return encoder, arch


# --------------------------------------------------------------------------- loss, metrics

def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + (1 - soft Dice), the Dice averaged over the foreground classes."""
    ce = F.cross_entropy(logits, target)
    probs = torch.softmax(logits, dim=1)[:, 1:]
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].to(probs.dtype)
    inter = (probs * onehot).sum(dim=(0, 2, 3))
    total = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    soft_dice = (2 * inter + 1.0) / (total + 1.0)
    return ce + (1.0 - soft_dice.mean())


def image_metrics(pred: np.ndarray, truth: np.ndarray, classes: list[str]) -> list[dict]:
    """One row per foreground class of one image: DSC, NSD and HD95 of ``pred == c`` vs
    ``truth == c`` (empty conventions of :mod:`mwm.metrics`)."""
    rows = []
    for c, name in enumerate(classes[1:], start=1):
        p, t = pred == c, truth == c
        rows.append({"class": name, "dice": dice(p, t), "nsd": nsd(p, t, NSD_TOLERANCE),
                     "hd95": hausdorff95(p, t)})
    return rows


def aggregate(rows: list[dict]) -> dict:
    """Means over images and classes; HD95 over its finite values only."""
    if not rows:
        return {"n": 0, "dice": None, "nsd": None, "hd95": None, "hd95_infinite": 0}
    finite = [r["hd95"] for r in rows if np.isfinite(r["hd95"])]
    return {"n": len({r.get("image") for r in rows}),
            "dice": float(np.mean([r["dice"] for r in rows])),
            "nsd": float(np.mean([r["nsd"] for r in rows])),
            "hd95": float(np.mean(finite)) if finite else None,
            "hd95_infinite": len(rows) - len(finite)}


# --------------------------------------------------------------------------- the run

class Segmenter:
    """One segmentation run: data, model, weights, the engine, evaluation and records."""

    def __init__(self, cfg: SegmentConfig):
        from ..utils import resolve_device

        self.cfg, self.out, self.t0 = cfg, Path(cfg.out), time.perf_counter()
        self.device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.splits, self.classes = split_samples(cfg)
        self.eval_split = "val" if self.splits["val"] else "test"
        path = checkpoint.resume_path(cfg.resume, self.out, LAST)
        self.checkpoint = checkpoint.load(path, LAST, kind="segment") if path is not None else None
        if self.checkpoint is not None:
            check_settings(self.checkpoint["config"], cfg.to_dict(), ignore=RESUME_FREE)
        state, meta, kind = read_weights(cfg.weights) if cfg.weights else (None, {}, "scratch")
        encoder, self.arch = build_encoder(cfg, meta)
        self.weights_report = {"kind": kind, "source": cfg.weights}
        if state is not None:
            self.weights_report.update(load_weights(encoder, state, source=str(cfg.weights),
                                                    meta=meta))
        self.model = SegNet(encoder, cfg.decoder_width, len(self.classes), cfg.mode == "probe")
        self.mean, self.std, self.normalization = self._normalization(meta, kind)
        self.sets = {name: SegmentDataset(samples, self.classes, cfg.input_size, mean=self.mean,
                                          std=self.std, augment=name == "train", seed=cfg.seed)
                     for name, samples in self.splits.items() if samples}
        self.model.to(self.device)
        self.best: dict | None = None
        self.log = CsvLog(self.out / "metrics.csv", METRICS_FIELDS)

    def _normalization(self, meta: dict, kind: str):
        if meta.get("mean") and meta.get("std"):
            return list(map(float, meta["mean"])), list(map(float, meta["std"])), f"{kind} metadata"
        plain = SegmentDataset(self.splits["train"], self.classes, self.cfg.input_size,
                               mean=(0, 0, 0), std=(1, 1, 1))
        mean, std = pixel_stats(plain.image(i) for i in range(len(plain)))
        return list(mean), list(std), "train split statistics"

    def _engine(self) -> Engine:
        cfg, n_train = self.cfg, len(self.sets["train"])
        self.batch = min(cfg.batch_size, n_train)
        self.per_epoch = n_train // self.batch
        total = cfg.epochs * self.per_epoch
        schedule = Schedule(peak_lr(cfg.base_lr, self.batch, cfg.lr), total,
                            round(cfg.warmup_epochs * self.per_epoch))
        groups = param_groups(self.model, weight_decay=cfg.wd,
                              decays=lambda name, p: p.ndim > 1 and not name.endswith(".bias"))
        return Engine(self.model, build_optimizer(groups, cfg.optimizer), device=self.device,
                      amp=cfg.amp, schedule=schedule)

    def run(self) -> dict:
        cfg = self.cfg
        self.engine = engine = self._engine()
        if self.checkpoint is not None:
            self.model.load_state_dict(self.checkpoint["model_train"])
            engine.restore(self.checkpoint)
            self.best = self.checkpoint.get("best")
        self.out.mkdir(parents=True, exist_ok=True)
        self.log.restart(lambda row: int(row["epoch"]) <= engine.epoch)
        stop = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * self.per_epoch
        loss = None
        while engine.epoch < cfg.epochs and engine.step_count < stop:
            t0 = time.perf_counter()
            lr, loss = self._train_epoch(stop)
            if engine.step_count == (engine.epoch + 1) * self.per_epoch:
                engine.epoch += 1
                self._record(lr, loss, time.perf_counter() - t0)
                self._save_last()
        self._save_last()
        return self._finish(loss)

    def _train_epoch(self, stop: int) -> tuple[float | None, float | None]:
        engine, train = self.engine, self.sets["train"]
        train.set_epoch(engine.epoch)
        batches = epoch_batches(len(train), self.batch, engine.epoch, self.cfg.seed,
                                engine.dist, self.per_epoch)
        skip = engine.step_count - engine.epoch * self.per_epoch
        loader = torch.utils.data.DataLoader(train, batch_sampler=batches[skip:],
                                             num_workers=self.cfg.workers)
        self.model.train()
        losses, lr = [], None
        for images, targets in loader:
            with engine.autocast():
                logits = engine.module(images.to(self.device))
            loss = dice_ce_loss(logits.float(), targets.to(self.device))
            engine.backward(loss)
            lr, _ = engine.step()
            losses.append(float(loss.detach()))
            if engine.step_count >= stop:
                break
        return lr, (float(np.mean(losses)) if losses else None)

    @torch.no_grad()
    def predict(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(predicted label maps, truth label maps) of a split, (N, S, S) each."""
        self.model.eval()
        loader = torch.utils.data.DataLoader(self.sets[split], batch_size=self.cfg.batch_size,
                                             num_workers=self.cfg.workers)
        preds, truths = [], []
        for images, targets in loader:
            with self.engine.autocast():
                logits = self.model(images.to(self.device))
            preds.append(logits.float().argmax(1).cpu().numpy())
            truths.append(targets.numpy())
        self.model.train()
        return np.concatenate(preds), np.concatenate(truths)

    def evaluate(self, split: str) -> tuple[dict, list[dict]]:
        preds, truths = self.predict(split)
        rows = []
        for sample, pred, truth in zip(self.sets[split].samples, preds, truths):
            for row in image_metrics(pred, truth, self.classes):
                rows.append({"split": split, "image": sample.name, **row})
        self._last_maps = (preds, truths)
        return aggregate(rows), rows

    def _record(self, lr, loss, seconds: float) -> None:
        metrics, _ = self.evaluate(self.eval_split)
        self.last_metrics = metrics
        fmt = lambda v: "" if v is None else f"{v:.6f}"
        self.log.append({"epoch": self.engine.epoch, "step": self.engine.step_count,
                         "train_loss": fmt(loss), "lr": "" if lr is None else f"{lr:.6g}",
                         **{k: fmt(metrics[k]) for k in REPORTED}, "seconds": f"{seconds:.2f}"})
        if self.best is None or metrics["dice"] > self.best["metrics"]["dice"]:
            self.best = {"epoch": self.engine.epoch, "metrics": metrics}
            checkpoint.save(self.out / BEST, self._payload())

    def _payload(self, extra: dict | None = None) -> dict:
        return {"format": SEGMENT_FORMAT, "model": _cpu_state(self.model), "arch": self.arch,
                "classes": self.classes, "mean": self.mean, "std": self.std,
                "input_size": self.cfg.input_size, "config": self.cfg.to_dict(),
                "best": self.best, "step": self.engine.step_count, "epoch": self.engine.epoch,
                **(extra or {})}

    def _save_last(self) -> None:
        checkpoint.save(self.out / LAST, self._payload(
            {"model_train": _cpu_state(self.model), **self.engine.state(),
             "rng": checkpoint.rng_state()}))

    def _finish(self, loss) -> dict:
        results, per_image = {}, []
        for split in ("val", "test"):
            if split in self.sets:
                results[split], rows = self.evaluate(split)
                per_image += rows
                write_overlays(self.out / "overlays", split, self.sets[split],
                               *self._last_maps, self.cfg.overlays)
        write_per_image(self.out / "per_image.csv", per_image)
        summary = {"out_dir": str(self.out), "mode": self.cfg.mode, "arch": self.arch,
                   "classes": self.classes, "labels": self.cfg.labels,
                   "n": {k: len(v) for k, v in self.sets.items()}, "eval_split": self.eval_split,
                   "decoder": f"{'unetr' if self.model.neck is not None else 'unet'} (width {self.cfg.decoder_width})", "loss": "ce + dice",
                   "normalization": {"source": self.normalization, "mean": self.mean,
                                     "std": self.std},
                   "weights": self.weights_report, "epochs_done": self.engine.epoch,
                   "steps": self.engine.step_count, "final_train_loss": loss,
                   "best": self.best, "last": results, "seconds": time.perf_counter() - self.t0,
                   "config": self.cfg.to_dict()}
        write_json(self.out / "summary.json", summary)
        return summary


def _cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}


def write_per_image(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=("split", "image", "class", *REPORTED))
        writer.writeheader()
        writer.writerows(rows)


def write_overlays(folder: Path, split: str, dataset: SegmentDataset, preds: np.ndarray,
                   truths: np.ndarray, count: int) -> None:
    """``<split>_<image>.png``: the image | the truth | the prediction, classes coloured."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    palette = np.vstack([[0, 0, 0], rng.integers(64, 256, (len(dataset.index), 3))])
    for i in range(min(count, len(dataset))):
        image = (dataset.image(i) * 255).clip(0, 255).astype(np.uint8)
        panels = [image] + [np.where(m[..., None] > 0, palette[m], image).astype(np.uint8)
                            for m in (truths[i], preds[i])]
        cv2.imwrite(str(folder / f"{split}_{dataset.samples[i].name}.png"),
                    np.concatenate(panels, axis=1)[..., ::-1])


def segment(cfg: SegmentConfig) -> dict:
    """Train and evaluate a segmentation model; return the summary (see the module doc)."""
    return Segmenter(cfg).run()


def _segment_task(cfg: SegmentConfig) -> dict:
    summary = segment(cfg)
    metrics = summary["last"][summary["eval_split"]]
    return {"split": summary["eval_split"], "epochs": summary["epochs_done"],
            "seconds": summary["seconds"], **{k: metrics[k] for k in REPORTED}}


register_task(EvalTask("segment", "semantic segmentation (UNet decoder), every weight trained",
                       SegmentConfig, _segment_task, REPORTED, "dice",
                       fixed={"mode": "finetune"}))
register_task(EvalTask("segment-probe", "semantic segmentation, a UNet decoder on the frozen "
                       "encoder", SegmentConfig, _segment_task, REPORTED, "dice",
                       fixed={"mode": "probe"}))
