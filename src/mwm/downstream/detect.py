"""Detection / instance segmentation: torchvision Mask R-CNN over a pretrained ResNet or ViT.

The reference fine-tunes Mask R-CNN R-50-FPN in Detectron2; MWM uses torchvision's
``MaskRCNN`` (no Detectron2 install needed) with the same optimization recipe:

* **Backbone**: ``resnet_fpn_backbone(arch, weights=None, trainable_layers=5)`` — every
  stage trains (Detectron2 ``FREEZE_AT 0``). The pretrained timm ResNet is loaded into
  ``backbone.body`` through :mod:`mwm.downstream.convert`, strictly: a missing, left-over
  or mis-shaped weight is a :class:`~mwm.data.io.DataError` naming the keys. A timm ViT
  instead gets ViTDet's simple feature pyramid (:class:`~mwm.downstream.vit.ViTBackbone`:
  the stride-P token map resampled to strides 4-32 plus ``pool``, the same interface),
  loaded as strictly (``pos_embed`` resampled to another input size), its blocks decayed
  by ``stage_lr_decay ** (depth + 1 - layer id)``; ``norm`` does not apply to it.
* **Normalization** (``norm``): ``"frozen"`` (default) = ``FrozenBatchNorm2d`` keeping the
  pretrained BN statistics and affine parameters fixed; ``"bn"`` = trainable
  ``BatchNorm2d``. The reference uses SyncBN over 8 GPUs (16 images per BN batch); with
  2 images per step on one device BN statistics are too noisy, hence the frozen default.
  FPN and heads have no normalization (torchvision's default heads: 2-fc box head,
  4-conv mask head).
* **Optimizer**: AdamW, weight decay 1e-4, ``lr = base_lr × batch_size / 2`` (the
  reference's 2.5e-4 is for 2 images per step) unless ``lr`` is given. Stage-wise lr decay
  ``lr × stage_lr_decay ** exp`` with the exponents of :data:`STAGE_LR_EXPONENTS`:
  stem 6, res2 (layer1) 4, res3 3, res4 2, res5 1, FPN and heads 0 — the reference
  states "stem 6 … res5 1, heads 0"; its two ends are kept literally.
* **Schedule** (:class:`mwm.engine.Schedule`): linear warm-up from ×0.01 over
  ``warmup_iters`` then steps ×0.25 at 2/3 and 8/9 of the run (the reference's 60k/80k of
  90k iterations); a milestone inside a long warm-up already applies.
* **Input**: images through :func:`mwm.data.io.read_slice` + :func:`to_model_input`
  (3 channels in [0, 1]); the model's transform standardizes with the pretraining
  ``mean``/``std`` from the weights' metadata (ImageNet's otherwise) and resizes so that
  ``min_size = max_size = input_size`` (torchvision would otherwise upscale to 800 px,
  about 5x slower). ``multiscale=(s1, s2, …)`` picks the training size per step from
  that list (evaluation uses ``input_size``). Random horizontal flips during training.
* **Data** (:mod:`mwm.downstream.coco`): a COCO folder as written by
  :func:`mwm.data.phantoms.generate_phantoms`
  (``images/`` + ``instances_{train,val}.json``); categories become labels 1..K
  (``num_classes = K + 1``); images without annotations are kept as negatives.
* **Precision**: ``amp`` follows :func:`mwm.utils.resolve_amp` (default ``none``) for the
  training forward; evaluation always runs in fp32 (bf16 would round box coordinates).
* **Evaluation** every ``eval_every`` epochs and at the end of the run; ``best.pt`` keeps
  the model of the best evaluation by ``select`` (default ``segm/AP``; ties keep the
  earlier).
* **Outputs** in ``out``: ``checkpoint.pt`` (the last full state, atomic, every epoch;
  resume with ``resume="auto"`` or a path — a missing path is a :class:`DataError`),
  ``best.pt``, ``log.csv`` (per step), ``metrics.csv`` (per evaluation), ``metrics.json``
  (latest evaluation, pycocotools ``COCOeval`` bbox + segm: AP, AP50, AP75, APs, APm,
  APl; -1 where a size range has no ground truth; and ``best``), ``predictions.json``
  (COCO results of the final model, masks as RLE), ``figures/<stem>.png`` overlays
  (ground truth green, predictions red), and ``config.json``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .. import checkpoint as checkpoint_io
from ..config import check_ranges, default_of, opt
from ..engine import (Engine, EngineCounters, Schedule, build_optimizer, check_settings,
                      epoch_batches, param_groups)
from ..errors import DataError
from ..files import write_csv, write_json
from ..pretrain.config import DEFAULT_ENCODER
from ..utils import AMP_CHOICES
from . import convert
from .tasks import EvalTask, register_task
from .coco import METRIC_NAMES, CocoInstances, _collate, evaluate, predict, write_figures
from .vit import ViTBackbone, is_vit, layer_id as vit_layer_id
from .weights import load_weights

__all__ = ["DetectConfig", "detect", "build_model", "CocoInstances", "evaluate",
           "stage_groups", "train_step", "STAGE_LR_EXPONENTS", "METRIC_NAMES",
           "CHECKPOINT_NAME", "BEST_NAME"]

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"
STAGE_LR_EXPONENTS = {"conv1": 6, "bn1": 6, "layer1": 4, "layer2": 3, "layer3": 2, "layer4": 1}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Detection's epoch shuffle is seeded by seed * SHUFFLE_STRIDE + epoch (its stream since
#: detection was written; other trainers use the engine's default).
SHUFFLE_STRIDE = 100_003
SELECTABLE = tuple(f"{kind}/{m}" for kind in ("bbox", "segm") for m in METRIC_NAMES)


@dataclass(kw_only=True)
class DetectConfig:
    """Settings of :func:`detect` (see the module docstring for the recipe)."""

    data: str = opt(help="folder with images/ and instances_train.json, instances_val.json "
                    "(a phantom folder)", positional=True)
    out: str = opt(help="the run folder")
    weights: str | None = opt(None, "MWM encoder.safetensors, pretrain checkpoint or timm .pth "
                              "(none: random init)")
    model: str | None = opt(None, f"ResNet or timm ViT architecture (default: from the "
                            f"weights, else {DEFAULT_ENCODER})")
    input_size: int = opt(256, "pixels: images are resized so that min = max size = this",
                          low=32)
    epochs: int = opt(12, "epochs", low=1)
    batch_size: int = opt(2, "images per step", low=1)
    lr: float | None = opt(None, "used as given (default: base-lr x batch / 2)", above=0.0)
    base_lr: float = opt(2.5e-4, "learning rate per 2 images", above=0.0)
    weight_decay: float = opt(1e-4, "AdamW weight decay", low=0.0)
    stage_lr_decay: float = opt(0.6, "lr x this ** exponent per backbone stage (stem 6 ... res5 1)",
                                above=0.0, high=1.0)
    warmup_iters: int = opt(100, "linear warm-up steps", low=0)
    warmup_factor: float = opt(0.01, "lr factor at the start of the warm-up", low=0.0, high=1.0)
    multiscale: tuple[int, ...] | None = opt(None, "train sizes to pick from", parse=int,
                                             nargs="+")
    norm: str = opt("frozen", "backbone normalization: frozen BN statistics or trainable BN",
                    choices=("frozen", "bn"))
    amp: str = opt("none", "mixed precision of training (auto = bf16 where the device has "
                   "native bf16, else fp32; fp16 needs a GPU); evaluation always runs in fp32",
                   choices=AMP_CHOICES)
    seed: int = opt(0, "random seed")
    workers: int = opt(0, "data-loader worker processes (unused: images load in the loop)",
                       low=0)
    device: str = opt("auto", "cpu, cuda, cuda:N or auto (a GPU if there is one)")
    resume: str | None = checkpoint_io.resume_option()
    max_steps: int | None = checkpoint_io.max_steps_option()
    quiet: bool = opt(False, "no progress lines")
    train_split: str = opt("train", "COCO split to train on (instances_<split>.json)")
    eval_split: str = opt("val", "COCO split to evaluate on")
    rpn_batch_size: int = opt(256, "anchors sampled per image for the RPN loss", low=1)
    roi_batch_size: int = opt(512, "RoIs sampled per image for the box/mask losses", low=1)
    score_thresh: float = opt(0.05, "lowest detection score kept", low=0.0, high=1.0)
    mask_thresh: float = opt(0.5, "mask probability threshold", low=0.0, high=1.0)
    figures: int = opt(4, "overlay figures to write", low=0)
    hflip: bool = opt(True, "random horizontal flips during training")
    eval_every: int = opt(1, "evaluate every N epochs and keep best.pt by --select (0: only at "
                          "the end)", low=0)
    select: str = opt("segm/AP", "metric that picks best.pt", choices=SELECTABLE)

    def __post_init__(self) -> None:
        if self.multiscale is not None:
            self.multiscale = tuple(int(s) for s in self.multiscale)
        check_ranges(self)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["multiscale"] is not None:
            d["multiscale"] = list(d["multiscale"])
        return d


# --------------------------------------------------------------------------- model

def build_model(arch: str, num_classes: int, *,
                input_size: int = default_of(DetectConfig, "input_size"),
                multiscale: Sequence[int] | None = None,
                norm: str = default_of(DetectConfig, "norm"),
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                rpn_batch_size: int = default_of(DetectConfig, "rpn_batch_size"),
                roi_batch_size: int = default_of(DetectConfig, "roi_batch_size"),
                score_thresh: float = default_of(DetectConfig, "score_thresh"),
                weights: dict[str, torch.Tensor] | None = None, source: str = "the weights",
                patch_size: int | None = None):
    """A torchvision ``MaskRCNN`` with a ResNet-FPN or a ViT simple-pyramid backbone (all
    stages trainable).

    ``weights``: a timm state dict loaded strictly into ``backbone.body``;
    ``patch_size``: a ViT's (default: the architecture's).
    """
    from torchvision.models.detection import MaskRCNN

    if norm not in ("frozen", "bn"):
        raise ValueError(f"norm must be 'frozen' or 'bn', got {norm!r}")
    if is_vit(arch):
        backbone = vit_backbone(arch, input_size, patch_size, weights, source)
    else:
        backbone = resnet_backbone(arch, norm, weights, source)
    sizes = tuple(int(s) for s in (multiscale or ())) + (int(input_size),)
    model = MaskRCNN(backbone, num_classes=num_classes, min_size=sizes,
                     max_size=max(sizes), image_mean=list(mean or IMAGENET_MEAN),
                     image_std=list(std or IMAGENET_STD),
                     rpn_batch_size_per_image=rpn_batch_size,
                     box_batch_size_per_image=roi_batch_size, box_score_thresh=score_thresh)
    return model


def resnet_backbone(arch: str, norm: str, weights: dict | None, source: str):
    """torchvision's ResNet-FPN, the timm ResNet ``weights`` loaded into its ``body``."""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d

    tv_arch = convert.torchvision_arch(arch)
    norm_layer = FrozenBatchNorm2d if norm == "frozen" else torch.nn.BatchNorm2d
    backbone = resnet_fpn_backbone(backbone_name=tv_arch, weights=None, trainable_layers=5,
                                   norm_layer=norm_layer)
    if weights is not None:
        convert.load_into_backbone(backbone.body, weights, source=source)
    return backbone


def vit_backbone(arch: str, input_size: int, patch_size: int | None, weights: dict | None,
                 source: str) -> ViTBackbone:
    """A timm ViT (no head, ``dynamic_img_size``: any padded batch size and ``multiscale``
    work) under the simple feature pyramid, ``weights`` loaded strictly (only a head may be
    left over; ``pos_embed`` resampled to the grid of ``input_size`` padded to 32 px, the
    batch size the model's transform makes)."""
    import timm

    kwargs = {"patch_size": int(patch_size)} if patch_size else {}
    try:
        body = timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True,
                                 img_size=math.ceil(input_size / 32) * 32, **kwargs)
    except RuntimeError as err:
        raise DataError(f"--model {arch}: cannot create the timm model ({err}).") from err
    backbone = ViTBackbone(body)
    if weights is not None:
        load_weights(body, weights, source=source, meta={})
    return backbone


BODY = "backbone.body."


def _stage_of(name: str) -> str | None:
    if name.startswith(BODY):
        return name.split(".")[2]
    return None


def stage_groups(model, decay: float, weight_decay: float) -> list[dict]:
    """Optimizer groups with stage-wise lr ``× decay ** STAGE_LR_EXPONENTS[stage]`` (layer id
    = the exponent; FPN and heads 0) and weight decay on every parameter (as the reference).
    A ViT's exponent is ``depth + 1 - layer id`` (MAE's / ViTDet's ids: embeddings
    ``depth + 1``, block i ``depth - i``, the final norm 0)."""
    backbone = getattr(model, "backbone", None)
    depth = len(backbone.body.blocks) if isinstance(backbone, ViTBackbone) else None

    def exponent(name: str) -> int:
        if depth is not None:
            body = name.startswith(BODY)
            return depth + 1 - vit_layer_id(name[len(BODY):], depth) if body else 0
        stage = _stage_of(name)
        return STAGE_LR_EXPONENTS.get(stage, 0) if stage else 0

    return param_groups(model, decays=lambda name, p: True, weight_decay=weight_decay,
                        layer=exponent, layer_scale=lambda e: decay ** e,
                        order=lambda key: -key[0])  # stem first (as saved)


def train_step(engine: Engine, images, targets) -> dict[str, float]:
    """One optimizer step of Mask R-CNN through ``engine`` (its autocast for the forward);
    returns the losses as floats."""
    with engine.autocast():
        losses = engine.module(images, targets)
    loss = sum(losses.values())
    engine.backward(loss)
    engine.step()
    return {"loss": loss.item(), **{k: v.item() for k, v in losses.items()}}


# --------------------------------------------------------------------------- training

@dataclass
class RunState:
    """What ``checkpoint.pt`` carries besides weights and the engine's state."""

    log: list = field(default_factory=list)     # one row per training step (log.csv)
    evals: list = field(default_factory=list)   # one row per evaluation (metrics.csv)
    best: dict | None = None                    # {"step", "epoch", "metrics"} of best.pt


def _dtype_name(dtype: torch.dtype | None) -> str:
    return str(dtype).replace("torch.", "") if dtype is not None else "float32"


def _load_resume(cfg: DetectConfig) -> dict | None:
    """The checkpoint to continue from (``None`` for a fresh run); refuses changed settings."""
    resume = checkpoint_io.resume_path(cfg.resume, cfg.out, CHECKPOINT_NAME)
    if resume is None:
        return None
    checkpoint = checkpoint_io.read(resume, "--resume", kind="detect")
    saved = checkpoint["config"]
    check_settings(saved, cfg.to_dict(), only=("input_size", "batch_size", "norm"))
    if cfg.model and saved.get("model") and cfg.model != saved["model"]:
        raise DataError(f"--resume: the checkpoint is a {saved['model']!r} model, "
                        f"not --model {cfg.model!r}.")
    return checkpoint


def _to_device(images, targets, device):
    images = [im.to(device) for im in images]
    targets = [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
               for t in targets]
    return images, targets


def _datasets(cfg: DetectConfig) -> tuple[CocoInstances, CocoInstances]:
    train_set = CocoInstances(cfg.data, cfg.train_split, hflip=cfg.hflip, seed=cfg.seed)
    eval_set = CocoInstances(cfg.data, cfg.eval_split)
    if eval_set.cat_ids != train_set.cat_ids:
        raise DataError(f"{eval_set.ann_file}: categories differ from {train_set.ann_file}.")
    return train_set, eval_set


def _model_for(cfg: DetectConfig, num_classes: int, checkpoint: dict | None):
    """``(model, arch, weights metadata)``: pretrained weights for a fresh run, else random
    init (the checkpoint's weights are loaded by the caller)."""
    weights, meta = None, {}
    if checkpoint is None and cfg.weights:
        weights, meta = convert.load_timm_state(cfg.weights)
    elif checkpoint is not None:
        meta = checkpoint.get("weights_meta", {})
    arch = cfg.model or meta.get("arch") or DEFAULT_ENCODER
    if cfg.model and meta.get("arch") and not _same_arch(meta["arch"], cfg.model):
        raise DataError(f"{cfg.weights}: the weights were pretrained as {meta['arch']!r}, "
                        f"not --model {cfg.model!r}.")
    model = build_model(arch, num_classes, input_size=cfg.input_size, multiscale=cfg.multiscale,
                        norm=cfg.norm, mean=meta.get("mean") or IMAGENET_MEAN,
                        std=meta.get("std") or IMAGENET_STD, rpn_batch_size=cfg.rpn_batch_size,
                        roi_batch_size=cfg.roi_batch_size, score_thresh=cfg.score_thresh,
                        weights=weights, source=str(cfg.weights),
                        patch_size=meta.get("patch_size"))
    return model, arch, meta


def _same_arch(saved: str, given: str) -> bool:
    """Whether weights pretrained as ``saved`` fit ``--model given`` (timm tags aside)."""
    if is_vit(saved) or is_vit(given):
        return saved.split(".")[0] == given.split(".")[0]
    return convert.torchvision_arch(saved) == convert.torchvision_arch(given)


class _DetectRun(EngineCounters):
    def __init__(self, cfg: DetectConfig):
        from ..utils import resolve_device, seed_everything

        self.t_start = time.perf_counter()
        self.out = Path(cfg.out)
        checkpoint = _load_resume(cfg)
        if checkpoint is not None:
            cfg = dataclasses.replace(cfg, model=checkpoint["config"].get("model"))
        seed_everything(cfg.seed)
        self.device = resolve_device(cfg.device)
        self.train_set, self.eval_set = _datasets(cfg)
        self.model, self.arch, self.meta = _model_for(cfg, self.train_set.num_classes, checkpoint)
        self.cfg = cfg = dataclasses.replace(cfg, model=self.arch)
        self.model.to(self.device)
        self.lr = cfg.lr if cfg.lr is not None else cfg.base_lr * cfg.batch_size / 2
        self.steps_per_epoch = math.ceil(len(self.train_set) / cfg.batch_size)
        self.total = total = cfg.epochs * self.steps_per_epoch
        schedule = Schedule(self.lr, total, cfg.warmup_iters, start=cfg.warmup_factor,
                            milestones=(total * 2 // 3, total * 8 // 9), gamma=0.25)
        optimizer = build_optimizer(stage_groups(self.model, cfg.stage_lr_decay, cfg.weight_decay),
                                    "adamw")
        self.engine = Engine(self.model, optimizer, device=self.device, amp=cfg.amp,
                             schedule=schedule)
        self.state = RunState()
        if checkpoint is not None:
            self.model.load_state_dict(checkpoint["model"])
            self.engine.restore(checkpoint)
            self.state = RunState(checkpoint.get("log", []), checkpoint.get("evals", []),
                                  checkpoint.get("best"))
            torch.set_rng_state(checkpoint["rng"]["torch"])
            self.train_set.rng.setstate(checkpoint["rng"]["flip"])

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / "config.json", {**cfg.to_dict(), "lr_resolved": self.lr,
                                              "weights_meta": self.meta,
                                              "amp_dtype": _dtype_name(self.engine.amp_dtype)})
        latest, stopped = None, False
        while self.epoch < cfg.epochs and not stopped:
            stopped = self._train_epoch()
            if not stopped:
                self.engine.epoch += 1
                if cfg.eval_every and self.epoch % cfg.eval_every == 0:
                    latest = self._evaluate()
            self._save()
        if latest is None or latest[0] != self.step:
            latest = self._evaluate()
            self._save()
        return self._finish(*latest[1])

    def _train_epoch(self) -> bool:
        """The rest of this epoch's steps; True when ``max_steps`` stopped it."""
        cfg = self.cfg
        self.model.train()
        batches = epoch_batches(len(self.train_set), cfg.batch_size, self.epoch, cfg.seed,
                                self.engine.dist, self.steps_per_epoch,
                                stride=SHUFFLE_STRIDE)
        for batch in batches[self.step - self.epoch * self.steps_per_epoch:]:
            if cfg.max_steps is not None and self.step >= cfg.max_steps:
                return True
            t0 = time.perf_counter()
            images, targets = _to_device(*_collate([self.train_set[i] for i in batch]), self.device)
            lr = self.engine.schedule.lr_at(self.step)
            losses = train_step(self.engine, images, targets)
            dt = time.perf_counter() - t0
            self.state.log.append({"step": self.step, "epoch": self.epoch, "lr": lr, **losses,
                                   "seconds": round(dt, 3)})
            if not cfg.quiet:
                print(f"step {self.step}/{self.total} epoch {self.epoch} loss "
                      f"{losses['loss']:.4f} ({dt:.2f} s)", flush=True)
        return False

    def _weights_payload(self) -> dict:
        return {"model": self.model.state_dict(), "step": self.step, "epoch": self.epoch,
                "config": self.cfg.to_dict(), "weights_meta": self.meta,
                "num_classes": self.train_set.num_classes, "best": self.state.best}

    def _save(self) -> None:
        checkpoint_io.save(self.out / CHECKPOINT_NAME, {
            **self._weights_payload(), **self.engine.state(), "log": self.state.log,
            "evals": self.state.evals,
            "rng": {"torch": torch.get_rng_state(), "flip": self.train_set.rng.getstate()}})
        if self.state.log:
            write_csv(self.out / "log.csv", self.state.log, list(self.state.log[0].keys()))

    def _evaluate(self) -> tuple[int, tuple[list[dict], dict[int, dict]]]:
        """Evaluate (in fp32), add a ``metrics.csv`` row, rewrite ``metrics.json`` and save
        ``best.pt`` when ``select`` improved (ties keep the earlier); returns the predictions."""
        cfg, state, out = self.cfg, self.state, self.out
        results, raw = predict(self.model, self.eval_set, self.device, mask_thresh=cfg.mask_thresh)
        metrics = evaluate(self.eval_set.coco, results, verbose=not cfg.quiet)
        state.evals = [e for e in state.evals if e["step"] != self.step]
        state.evals.append({"step": self.step, "epoch": self.epoch, **metrics})
        write_csv(out / "metrics.csv", state.evals, ["step", "epoch", *metrics])
        if state.best is None or metrics[cfg.select] > state.best["metrics"][cfg.select]:
            state.best = {"step": self.step, "epoch": self.epoch, "metrics": metrics}
            checkpoint_io.save(out / BEST_NAME, self._weights_payload())
        write_json(out / "metrics.json", {"split": cfg.eval_split, "step": self.step,
                                          "epoch": self.epoch, "images": len(self.eval_set),
                                          "metrics": metrics, "best": state.best})
        return self.step, (results, raw)

    def _finish(self, results: list[dict], raw: dict[int, dict]) -> dict[str, Any]:
        out, state = self.out, self.state
        write_json(out / "predictions.json", results)
        figures = write_figures(out, self.eval_set, raw, self.cfg.figures)
        step_times = [row["seconds"] for row in state.log]
        last = {k: v for k, v in state.evals[-1].items() if k not in ("step", "epoch")}
        return {"out": str(out), "arch": self.arch, "step": self.step, "epoch": self.epoch,
                "num_classes": self.train_set.num_classes, "lr": self.lr, "amp": self.cfg.amp,
                "amp_dtype": _dtype_name(self.engine.amp_dtype), "metrics": last,
                "best": state.best, "evaluations": len(state.evals),
                "predictions": str(out / "predictions.json"), "figures": figures,
                "checkpoint": str(out / CHECKPOINT_NAME), "best_checkpoint": str(out / BEST_NAME),
                "seconds_per_step": float(np.median(step_times)) if step_times else None,
                "seconds": round(time.perf_counter() - self.t_start, 2)}


def detect(cfg: DetectConfig) -> dict[str, Any]:
    """Fine-tune (or resume) Mask R-CNN, evaluating every ``eval_every`` epochs and at the
    end; returns a summary dict."""
    return _DetectRun(cfg).run()


def _detect_task(cfg: DetectConfig) -> dict:
    summary = detect(cfg)
    return {"split": cfg.eval_split, "epochs": summary["epoch"], "seconds": summary["seconds"],
            **summary["metrics"]}


register_task(EvalTask("detect", "Mask R-CNN instance segmentation, COCO box and mask AP",
                       DetectConfig, _detect_task, SELECTABLE, "segm/AP", inherits=("model",)))
