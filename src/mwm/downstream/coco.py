"""COCO instance data and evaluation for detection: the dataset, predictions, COCO AP, overlays.

* :class:`CocoInstances` — a COCO split (``images/`` + ``instances_<split>.json``) as
  torchvision detection targets;
* :func:`predict` — COCO results (bbox xywh + RLE masks) of a model, in fp32;
* :func:`evaluate` — pycocotools ``COCOeval`` for bbox and segm (AP, AP50, AP75, APs, APm,
  APl; -1 where a size range has no ground truth);
* :func:`write_figures` — overlays (ground truth green, predictions red).
"""

from __future__ import annotations

import contextlib
import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.io import SliceRef, read_slice, to_model_input
from ..errors import DataError
from ..files import write_png

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


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
