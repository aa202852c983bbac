"""Detection / instance segmentation: torchvision Mask R-CNN over a pretrained ResNet.

The reference fine-tunes Mask R-CNN R-50-FPN in Detectron2; MWM uses torchvision's
``MaskRCNN`` (no Detectron2 install needed) with the same optimization recipe:

* **Backbone**: ``resnet_fpn_backbone(arch, weights=None, trainable_layers=5)`` — every
  stage trains (Detectron2 ``FREEZE_AT 0``). The pretrained timm ResNet is loaded into
  ``backbone.body`` through :mod:`mwm.downstream.convert`, strictly: a missing, left-over
  or mis-shaped weight is a :class:`~mwm.data.io.DataError` naming the keys.
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
* **Schedule**: linear warm-up from ×0.01 over ``warmup_iters`` then steps ×0.25 at 2/3
  and 8/9 of the run (the reference's 60k/80k of 90k iterations).
* **Input**: images through :func:`mwm.data.io.read_slice` + :func:`to_model_input`
  (3 channels in [0, 1]); the model's transform standardizes with the pretraining
  ``mean``/``std`` from the weights' metadata (ImageNet's otherwise) and resizes so that
  ``min_size = max_size = input_size`` (torchvision would otherwise upscale to 800 px,
  about 5x slower). ``multiscale=(s1, s2, …)`` picks the training size per step from
  that list (evaluation uses ``input_size``). Random horizontal flips during training.
* **Data**: a COCO folder as written by :func:`mwm.data.phantoms.generate_phantoms`
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

import contextlib
import io
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import DataError

from ..data.io import SliceRef, read_slice, to_model_input
from .. import checkpoint as checkpoint_io
from ..files import write_csv, write_json, write_png
from ..utils import AMP_CHOICES, backward_step
from . import convert

__all__ = ["DetectConfig", "detect", "build_model", "CocoInstances", "evaluate",
           "param_groups", "train_step", "STAGE_LR_EXPONENTS", "METRIC_NAMES",
           "CHECKPOINT_NAME", "BEST_NAME"]

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"
STAGE_LR_EXPONENTS = {"conv1": 6, "bn1": 6, "layer1": 4, "layer2": 3, "layer3": 2, "layer4": 1}
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DetectConfig:
    """Settings of :func:`detect` (see the module docstring for the recipe)."""

    data: str
    out: str
    weights: str | None = None        # MWM export / pretrain checkpoint / timm .pth; None = random init
    model: str | None = None          # timm/torchvision ResNet name; default: weights' arch or resnet50
    input_size: int = 256
    epochs: int = 12
    batch_size: int = 2
    lr: float | None = None           # absolute lr; None → base_lr × batch_size / 2
    base_lr: float = 2.5e-4
    weight_decay: float = 1e-4
    stage_lr_decay: float = 0.6
    warmup_iters: int = 100
    warmup_factor: float = 0.01
    multiscale: tuple[int, ...] | None = None
    norm: str = "frozen"              # "frozen" (FrozenBatchNorm2d) or "bn" (BatchNorm2d)
    amp: str = "none"                 # auto | bf16 | fp16 | none (mwm.utils.resolve_amp), training only
    seed: int = 0
    workers: int = 0
    device: str = "auto"
    resume: str | None = None         # "auto" or a checkpoint path / run folder
    max_steps: int | None = None
    quiet: bool = False
    train_split: str = "train"
    eval_split: str = "val"
    rpn_batch_size: int = 256         # anchors sampled per image for the RPN loss
    roi_batch_size: int = 512         # RoIs sampled per image for the box/mask losses
    score_thresh: float = 0.05
    mask_thresh: float = 0.5
    figures: int = 4
    hflip: bool = True
    eval_every: int = 1               # evaluate every N epochs (0: only at the end)
    select: str = "segm/AP"           # metric that picks best.pt

    def __post_init__(self) -> None:
        if self.amp not in AMP_CHOICES:
            raise ValueError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0 (0 = only at the end), got {self.eval_every}")
        names = [f"{kind}/{m}" for kind in ("bbox", "segm") for m in METRIC_NAMES]
        if self.select not in names:
            raise ValueError(f"select must be one of {', '.join(names)}, got {self.select!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["multiscale"] is not None:
            d["multiscale"] = list(d["multiscale"])
        return d


# --------------------------------------------------------------------------- data

def _quiet_coco(path: Path):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _ann_file(root: Path, split: str) -> Path:
    path = root / f"instances_{split}.json"
    if not path.is_file():
        if split in ("", "all") and (root / "instances.json").is_file():
            return root / "instances.json"
        raise DataError(f"{path}: COCO annotation file not found. The data folder needs "
                        f"images/ and instances_{split}.json (mwm phantoms writes them).")
    return path


class CocoInstances(torch.utils.data.Dataset):
    """A COCO instance-segmentation split as torchvision detection targets.

    Item: ``(image (3, H, W) float in [0, 1], target)`` with ``boxes`` (xyxy), ``labels``
    (1..K), ``masks`` (N, H, W uint8), ``image_id``, ``area``, ``iscrowd``.
    """

    def __init__(self, root: str | Path, split: str = "train", *, hflip: bool = False,
                 seed: int = 0):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: data folder not found.")
        self.ann_file = _ann_file(self.root, split)
        self.coco = _quiet_coco(self.ann_file)
        self.ids = sorted(self.coco.getImgIds())
        self.cat_ids = sorted(self.coco.getCatIds())
        if not self.cat_ids:
            raise DataError(f"{self.ann_file}: no categories.")
        self.label_of = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.hflip = hflip
        self.rng = random.Random(seed)

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids) + 1

    def image_path(self, image_id: int) -> Path:
        info = self.coco.imgs[image_id]
        path = self.root / "images" / info["file_name"]
        if not path.is_file():
            alt = self.root / info["file_name"]
            path = alt if alt.is_file() else path
        return path

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> tuple[np.ndarray, dict[str, Any]]:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        pixels = to_model_input(read_slice(SliceRef(self.image_path(image_id))))
        h, w = pixels.shape[1:]
        boxes, labels, masks, areas, crowd = [], [], [], [], []
        for ann in self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id)):
            x, y, bw, bh = ann["bbox"]
            if bw <= 0 or bh <= 0:
                continue
            mask = self.coco.annToMask(ann)
            if mask.shape != (h, w):
                raise DataError(f"{self.ann_file}: image {info['file_name']} is {w}x{h} but "
                                "its annotation does not match that size.")
            boxes.append([x, y, x + bw, y + bh])
            labels.append(self.label_of[ann["category_id"]])
            masks.append(mask)
            areas.append(float(ann.get("area", bw * bh)))
            crowd.append(int(ann.get("iscrowd", 0)))
        target = {
            "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
            "labels": np.asarray(labels, np.int64),
            "masks": (np.stack(masks) if masks else np.zeros((0, h, w), np.uint8)).astype(np.uint8),
            "image_id": int(image_id), "area": np.asarray(areas, np.float32),
            "iscrowd": np.asarray(crowd, np.int64),
        }
        return pixels, target

    def __getitem__(self, index: int):
        pixels, target = self.load(index)
        if self.hflip and self.rng.random() < 0.5:
            w = pixels.shape[2]
            pixels = pixels[:, :, ::-1].copy()
            target["masks"] = target["masks"][:, :, ::-1].copy()
            boxes = target["boxes"].copy()
            boxes[:, [0, 2]] = w - target["boxes"][:, [2, 0]]
            target["boxes"] = boxes
        out = {k: (torch.as_tensor(v) if isinstance(v, np.ndarray) else v) for k, v in target.items()}
        out["image_id"] = torch.tensor(target["image_id"])
        return torch.from_numpy(pixels), out


def _collate(batch):
    return tuple(zip(*batch))


# --------------------------------------------------------------------------- model

def build_model(arch: str, num_classes: int, *, input_size: int = 256,
                multiscale: Sequence[int] | None = None, norm: str = "frozen",
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                rpn_batch_size: int = 256, roi_batch_size: int = 512,
                score_thresh: float = 0.05, weights: dict[str, torch.Tensor] | None = None,
                source: str = "the weights"):
    """A torchvision ``MaskRCNN`` with a ResNet-FPN backbone (all stages trainable).

    ``weights``: a timm ResNet state dict loaded strictly into ``backbone.body``.
    """
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d

    if norm not in ("frozen", "bn"):
        raise ValueError(f"norm must be 'frozen' or 'bn', got {norm!r}")
    tv_arch = convert.torchvision_arch(arch)
    norm_layer = FrozenBatchNorm2d if norm == "frozen" else torch.nn.BatchNorm2d
    backbone = resnet_fpn_backbone(backbone_name=tv_arch, weights=None, trainable_layers=5,
                                   norm_layer=norm_layer)
    if weights is not None:
        convert.load_into_backbone(backbone.body, weights, source=source)
    sizes = tuple(int(s) for s in (multiscale or ())) + (int(input_size),)
    model = MaskRCNN(backbone, num_classes=num_classes, min_size=sizes,
                     max_size=max(sizes), image_mean=list(mean or IMAGENET_MEAN),
                     image_std=list(std or IMAGENET_STD),
                     rpn_batch_size_per_image=rpn_batch_size,
                     box_batch_size_per_image=roi_batch_size, box_score_thresh=score_thresh)
    return model


def _stage_of(name: str) -> str | None:
    if name.startswith("backbone.body."):
        return name.split(".")[2]
    return None


def param_groups(model, lr: float, decay: float, weight_decay: float) -> list[dict]:
    """AdamW groups with stage-wise lr ``lr × decay ** STAGE_LR_EXPONENTS[stage]``."""
    groups: dict[int, list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        stage = _stage_of(name)
        exp = STAGE_LR_EXPONENTS.get(stage, 0) if stage else 0
        groups.setdefault(exp, []).append(param)
    return [{"params": params, "lr": lr * decay ** exp, "initial_lr": lr * decay ** exp,
             "lr_exp": exp, "weight_decay": weight_decay}
            for exp, params in sorted(groups.items(), reverse=True)]


def _lr_factor(step: int, total: int, warmup: int, warmup_factor: float) -> float:
    factor = 1.0
    if step < warmup:
        alpha = step / max(1, warmup)
        factor = warmup_factor * (1 - alpha) + alpha
    for milestone in (total * 2 // 3, total * 8 // 9):
        if milestone > 0 and step >= milestone:
            factor *= 0.25
    return factor


# --------------------------------------------------------------------------- evaluation

def _empty_stats() -> dict[str, float]:
    return {f"{kind}/{m}": -1.0 for kind in ("bbox", "segm") for m in METRIC_NAMES}


@torch.no_grad()
def predict(model, dataset: CocoInstances, device, *,
            mask_thresh: float = 0.5) -> tuple[list[dict], dict[int, dict]]:
    """COCO results (bbox xywh + RLE masks) for every image of ``dataset``, in fp32: under
    bf16 box coordinates would be rounded to 1 px at 128–256 px, 4 px at 512–1024 px."""
    from pycocotools import mask as mask_utils

    model.eval()
    results: list[dict] = []
    raw: dict[int, dict] = {}
    for index in range(len(dataset)):
        pixels, target = dataset.load(index)
        out = model([torch.from_numpy(pixels).to(device)])[0]
        boxes = out["boxes"].float().cpu().numpy()
        scores = out["scores"].float().cpu().numpy()
        labels = out["labels"].cpu().numpy()
        masks = (out["masks"][:, 0].float().cpu().numpy() >= mask_thresh).astype(np.uint8)
        image_id = target["image_id"]
        raw[image_id] = {"boxes": boxes, "scores": scores, "labels": labels, "masks": masks}
        for box, score, label, mask in zip(boxes, scores, labels, masks):
            rle = mask_utils.encode(np.asfortranarray(mask))
            x0, y0, x1, y1 = (float(v) for v in box)
            results.append({"image_id": int(image_id),
                            "category_id": int(dataset.cat_ids[int(label) - 1]),
                            "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                            "score": round(float(score), 5),
                            "segmentation": {"size": [int(s) for s in rle["size"]],
                                             "counts": rle["counts"].decode("ascii")}})
    return results, raw


def evaluate(coco_gt, results: list[dict], *, verbose: bool = False) -> dict[str, float]:
    """pycocotools ``COCOeval`` for bbox and segm → ``{"bbox/AP": …, "segm/APl": …}``."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    metrics = _empty_stats()
    if not coco_gt.getAnnIds():
        return metrics  # nothing to evaluate against: every metric is -1
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with sink:
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:  # no detections at all: AP 0 where there is ground truth
            coco_dt = COCO()
            coco_dt.dataset = {"images": list(coco_gt.dataset["images"]), "annotations": [],
                               "categories": list(coco_gt.dataset["categories"])}
            coco_dt.createIndex()
        for kind in ("bbox", "segm"):
            ev = COCOeval(coco_gt, coco_dt, kind)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            for name, value in zip(METRIC_NAMES, ev.stats[:6]):
                metrics[f"{kind}/{name}"] = float(value)
    return metrics


def _overlay(pixels: np.ndarray, gt_masks: np.ndarray, pred: dict, thresh: float = 0.5) -> np.ndarray:
    import cv2

    image = (np.clip(pixels.transpose(1, 2, 0), 0, 1) * 255).astype(np.uint8).copy()
    for mask in gt_masks:
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(image, contours, -1, (0, 255, 0), 1)
    for box, score, mask in zip(pred["boxes"], pred["scores"], pred["masks"]):
        if score < thresh:
            continue
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(image, contours, -1, (255, 0, 0), 1)
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        cv2.rectangle(image, (x0, y0), (x1, y1), (255, 64, 64), 1)
        cv2.putText(image, f"{score:.2f}", (x0, max(8, y0 - 2)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.3, (255, 64, 64), 1)
    return image


def write_figures(out_dir: Path, dataset: CocoInstances, raw: dict[int, dict], n: int) -> list[str]:
    """Overlay PNGs (ground truth green, predictions with score ≥ 0.5 red) for ``n`` images,
    annotated ones first."""
    order = sorted(range(len(dataset)),
                   key=lambda i: (not dataset.coco.getAnnIds(imgIds=dataset.ids[i]), i))
    paths = []
    for index in order[:max(0, n)]:
        pixels, target = dataset.load(index)
        image = _overlay(pixels, target["masks"], raw[target["image_id"]])
        stem = Path(dataset.coco.imgs[target["image_id"]]["file_name"]).stem
        path = out_dir / "figures" / f"{stem}.png"
        write_png(path, image, text={"mwm": "detect overlay: green = ground truth, red = prediction"})
        paths.append(str(path))
    return paths


# --------------------------------------------------------------------------- training

@dataclass
class RunState:
    """What ``checkpoint.pt`` carries besides weights: where the run is and what it measured."""

    step: int = 0
    epoch: int = 0
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
    checkpoint = torch.load(resume, map_location="cpu", weights_only=True)
    saved = checkpoint["config"]
    for key in ("input_size", "batch_size", "norm"):
        if saved.get(key) != getattr(cfg, key):
            raise DataError(f"--resume: the checkpoint was made with {key}={saved.get(key)!r}, "
                            f"not {getattr(cfg, key)!r}.")
    if cfg.model and saved.get("model") and cfg.model != saved["model"]:
        raise DataError(f"--resume: the checkpoint is a {saved['model']!r} model, "
                        f"not --model {cfg.model!r}.")
    cfg.model = saved.get("model")
    return checkpoint


def _batches(n: int, batch: int, seed: int, epoch: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed * 100003 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i:i + batch] for i in range(0, n, batch)]


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
    arch = cfg.model or meta.get("arch") or "resnet50"
    if (cfg.model and meta.get("arch")
            and convert.torchvision_arch(meta["arch"]) != convert.torchvision_arch(cfg.model)):
        raise DataError(f"{cfg.weights}: the weights were pretrained as {meta['arch']!r}, "
                        f"not --model {cfg.model!r}.")
    cfg.model = arch
    model = build_model(arch, num_classes, input_size=cfg.input_size, multiscale=cfg.multiscale,
                        norm=cfg.norm, mean=meta.get("mean") or IMAGENET_MEAN,
                        std=meta.get("std") or IMAGENET_STD, rpn_batch_size=cfg.rpn_batch_size,
                        roi_batch_size=cfg.roi_batch_size, score_thresh=cfg.score_thresh,
                        weights=weights, source=str(cfg.weights))
    return model, arch, meta


def train_step(model, optimizer, images, targets, *, amp_dtype: torch.dtype | None = None,
               scaler=None, step: int = 0) -> dict[str, float]:
    """One optimizer step of Mask R-CNN; the forward under autocast when ``amp_dtype`` is
    set (``scaler``: a ``GradScaler`` for fp16). Returns the losses as floats."""
    device = images[0].device
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                        enabled=amp_dtype is not None):
        losses = model(images, targets)
    loss = sum(losses.values())
    if not torch.isfinite(loss):
        raise FloatingPointError(f"step {step}: loss is {loss.item()} "
                                 f"({ {k: v.item() for k, v in losses.items()} }); "
                                 "lower --lr or use --amp none. The last checkpoint is intact.")
    backward_step(loss, optimizer, scaler)
    return {"loss": loss.item(), **{k: v.item() for k, v in losses.items()}}


def _evaluate_and_record(model, eval_set: CocoInstances, device, cfg: DetectConfig, out: Path,
                         run: RunState, best_payload) -> tuple[list[dict], dict[int, dict]]:
    """Evaluate (in fp32), add a ``metrics.csv`` row, rewrite ``metrics.json`` and save
    ``best.pt`` when ``cfg.select`` improved (ties keep the earlier). Returns the predictions."""
    results, raw = predict(model, eval_set, device, mask_thresh=cfg.mask_thresh)
    metrics = evaluate(eval_set.coco, results, verbose=not cfg.quiet)
    run.evals = [e for e in run.evals if e["step"] != run.step]
    run.evals.append({"step": run.step, "epoch": run.epoch, **metrics})
    write_csv(out / "metrics.csv", run.evals, ["step", "epoch", *metrics])
    if run.best is None or metrics[cfg.select] > run.best["metrics"][cfg.select]:
        run.best = {"step": run.step, "epoch": run.epoch, "metrics": metrics}
        checkpoint_io.save(out / BEST_NAME, best_payload())
    write_json(out / "metrics.json", {"split": cfg.eval_split, "step": run.step,
                                      "epoch": run.epoch, "images": len(eval_set),
                                      "metrics": metrics, "best": run.best})
    return results, raw


def detect(cfg: DetectConfig) -> dict[str, Any]:
    """Fine-tune (or resume) Mask R-CNN, evaluating every ``eval_every`` epochs and at the
    end; returns a summary dict."""
    from ..utils import resolve_amp, resolve_device, seed_everything

    t_start = time.perf_counter()
    torch.set_flush_denormal(True)
    out = Path(cfg.out)
    checkpoint = _load_resume(cfg)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    amp_dtype = resolve_amp(cfg.amp, device)
    train_set, eval_set = _datasets(cfg)
    model, arch, meta = _model_for(cfg, train_set.num_classes, checkpoint)
    model.to(device)
    lr = cfg.lr if cfg.lr is not None else cfg.base_lr * cfg.batch_size / 2
    optimizer = torch.optim.AdamW(param_groups(model, lr, cfg.stage_lr_decay, cfg.weight_decay),
                                  lr=lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    run = RunState()
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scaler is not None and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        run = RunState(checkpoint["step"], checkpoint["epoch"], checkpoint.get("log", []),
                       checkpoint.get("evals", []), checkpoint.get("best"))
        torch.set_rng_state(checkpoint["rng"]["torch"])
        train_set.rng.setstate(checkpoint["rng"]["flip"])
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", {**cfg.to_dict(), "lr_resolved": lr, "weights_meta": meta,
                                     "amp_dtype": _dtype_name(amp_dtype)})

    def weights_payload() -> dict:
        return {"model": model.state_dict(), "step": run.step, "epoch": run.epoch,
                "config": cfg.to_dict(), "weights_meta": meta,
                "num_classes": train_set.num_classes, "best": run.best}

    def save() -> None:
        checkpoint_io.save(out / CHECKPOINT_NAME, {
            **weights_payload(), "optimizer": optimizer.state_dict(), "log": run.log,
            "evals": run.evals, "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": {"torch": torch.get_rng_state(), "flip": train_set.rng.getstate()}})
        if run.log:
            write_csv(out / "log.csv", run.log, list(run.log[0].keys()))

    def evaluate_now():
        return run.step, _evaluate_and_record(model, eval_set, device, cfg, out, run,
                                              weights_payload)

    latest, stopped = None, False
    while run.epoch < cfg.epochs and not stopped:
        model.train()
        batches = _batches(len(train_set), cfg.batch_size, cfg.seed, run.epoch)
        for b_index in range(run.step - run.epoch * steps_per_epoch, len(batches)):
            if cfg.max_steps is not None and run.step >= cfg.max_steps:
                stopped = True
                break
            t0 = time.perf_counter()
            images, targets = _to_device(*_collate([train_set[i] for i in batches[b_index]]), device)
            factor = _lr_factor(run.step, total, cfg.warmup_iters, cfg.warmup_factor)
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor
            losses = train_step(model, optimizer, images, targets, amp_dtype=amp_dtype,
                                scaler=scaler, step=run.step)
            run.step += 1
            dt = time.perf_counter() - t0
            run.log.append({"step": run.step, "epoch": run.epoch, "lr": lr * factor, **losses,
                            "seconds": round(dt, 3)})
            if not cfg.quiet:
                print(f"step {run.step}/{total} epoch {run.epoch} loss {losses['loss']:.4f} "
                      f"({dt:.2f} s)", flush=True)
        else:
            run.epoch += 1
            if cfg.eval_every and run.epoch % cfg.eval_every == 0:
                latest = evaluate_now()
        save()

    if latest is None or latest[0] != run.step:
        latest = evaluate_now()
        save()
    results, raw = latest[1]
    write_json(out / "predictions.json", results)
    figures = write_figures(out, eval_set, raw, cfg.figures)
    step_times = [row["seconds"] for row in run.log]
    last = {k: v for k, v in run.evals[-1].items() if k not in ("step", "epoch")}
    return {"out": str(out), "arch": arch, "step": run.step, "epoch": run.epoch,
            "num_classes": train_set.num_classes, "lr": lr, "amp": cfg.amp,
            "amp_dtype": _dtype_name(amp_dtype), "metrics": last,
            "best": run.best, "evaluations": len(run.evals),
            "predictions": str(out / "predictions.json"), "figures": figures,
            "checkpoint": str(out / CHECKPOINT_NAME), "best_checkpoint": str(out / BEST_NAME),
            "seconds_per_step": float(np.median(step_times)) if step_times else None,
            "seconds": round(time.perf_counter() - t_start, 2)}
