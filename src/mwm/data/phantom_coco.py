"""COCO instance annotations of phantom datasets (``instances*.json``)."""

from __future__ import annotations

import cv2
import numpy as np



def coco_instance(mask: np.ndarray) -> dict:
    """bbox [x, y, w, h], area and segmentation (polygons, or RLE when degenerate)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    bbox = [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
    m8 = mask.astype(np.uint8)
    contours, _ = cv2.findContours(m8, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for c in contours:
        if len(c) < 3 or cv2.contourArea(c) <= 0:
            polygons = []
            break
        polygons.append([int(p) for p in c.reshape(-1)])
    if polygons:
        segmentation: list | dict = polygons
    else:
        from pycocotools import mask as mask_utils

        rle = mask_utils.encode(np.asfortranarray(m8))
        segmentation = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
    return {"bbox": bbox, "area": int(m8.sum()), "segmentation": segmentation}


def coco_dataset(modality: str, classes: tuple[str, ...], size: int, records: list[dict],
                 keep: set[int] | None, version: str) -> dict:
    """The COCO instances file of the records (those in ``keep``; all when None); ``classes``
    without the first (no finding) are the categories."""
    categories = [{"id": i, "name": c, "supercategory": modality}
                  for i, c in enumerate(classes[1:], start=1)]
    cat_id = {c["name"]: c["id"] for c in categories}
    images, annotations = [], []
    for rec in records:
        if keep is not None and rec["index"] not in keep:
            continue
        images.append({"id": rec["index"] + 1, "file_name": rec["stem"] + ".png",
                       "width": size, "height": size})
        for ann_id, inst in zip(rec["ann_ids"], rec["instances"]):
            annotations.append({"id": ann_id, "image_id": rec["index"] + 1,
                                "category_id": cat_id[rec["label"]], "bbox": inst["bbox"],
                                "area": inst["area"], "segmentation": inst["segmentation"],
                                "iscrowd": 0})
    return {"info": {"description": f"MWM synthetic {modality} phantoms",
                     "version": version},
            "images": images, "annotations": annotations, "categories": categories}
