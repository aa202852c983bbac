"""Contact sheets: a PNG grid of images with their region outlines and captions."""

from __future__ import annotations

import csv
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

OUTLINE_RGB = (255, 64, 64)
SECOND_OUTLINE_RGB = (64, 220, 255)
BACKGROUND_RGB = (24, 24, 24)
TEXT_RGB = (235, 235, 235)


@dataclass
class Tile:
    """One cell of a contact sheet.

    ``image`` is uint8 (H, W) gray or (H, W, 3) RGB; ``outlines`` are bool (H, W) masks
    drawn in red; ``second_outlines`` (e.g. a predicted region) are drawn in cyan.
    """

    image: np.ndarray
    caption: str = ""
    outlines: list[np.ndarray] = field(default_factory=list)
    second_outlines: list[np.ndarray] = field(default_factory=list)


def render_tile(tile: Tile, size: int) -> np.ndarray:
    """Resize a tile's image to ``size``x``size`` (aspect kept, padded) with outlines."""
    import cv2

    rgb = tile.image if tile.image.ndim == 3 else np.repeat(tile.image[..., None], 3, axis=2)
    h, w = rgb.shape[:2]
    scale = size / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = np.full((size, size, 3), BACKGROUND_RGB, dtype=np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[top:top + new_h, left:left + new_w] = cv2.resize(
        np.ascontiguousarray(rgb, dtype=np.uint8), (new_w, new_h), interpolation=cv2.INTER_AREA)
    for masks, color in ((tile.outlines, OUTLINE_RGB), (tile.second_outlines, SECOND_OUTLINE_RGB)):
        for mask in masks:
            if not mask.any():
                continue
            resized = cv2.resize(mask.astype(np.uint8), (new_w, new_h),
                                 interpolation=cv2.INTER_NEAREST)
            contours, _ = cv2.findContours(resized, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            shifted = [c + np.array([[[left, top]]]) for c in contours]
            cv2.drawContours(canvas, shifted, -1, color, 1)
    return canvas


def contact_sheet(tiles: list[Tile], *, columns: int = 6, tile_size: int = 160,
                  caption_lines: int = 6, title: str = "") -> np.ndarray:
    """Lay ``tiles`` out in a grid with wrapped captions; return an RGB uint8 image."""
    from PIL import Image, ImageDraw, ImageFont

    if not tiles:
        raise ValueError("contact_sheet needs at least one tile")
    font = ImageFont.load_default(size=max(9, tile_size // 14))
    line_h = font.getbbox("Ag")[3] + 2
    caption_h = caption_lines * line_h + 4
    title_h = 2 * line_h if title else 0
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    pad = 4
    cell_w, cell_h = tile_size + pad, tile_size + caption_h + pad
    sheet = Image.new("RGB", (columns * cell_w + pad, rows * cell_h + pad + title_h), BACKGROUND_RGB)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, pad), title, fill=TEXT_RGB, font=font)
    chars_per_line = max(8, int(tile_size / (font.getlength("n") or 6)))
    for i, tile in enumerate(tiles):
        x = pad + (i % columns) * cell_w
        y = pad + title_h + (i // columns) * cell_h
        sheet.paste(Image.fromarray(render_tile(tile, tile_size)), (x, y))
        lines = textwrap.wrap(tile.caption, chars_per_line)[:caption_lines]
        for j, line in enumerate(lines):
            draw.text((x, y + tile_size + 2 + j * line_h), line, fill=TEXT_RGB, font=font)
    return np.asarray(sheet)


def dataset_contact_sheet(samples: list, captions: dict[str, str] | None = None, *,
                          max_tiles: int = 24, columns: int = 6, tile_size: int = 160,
                          title: str = "") -> np.ndarray:
    """Contact sheet of a dataset: images with mask outlines and captions.

    ``samples`` are :class:`mwm.data.layouts.Sample`; up to ``max_tiles`` are shown, taken
    round-robin over labels so every class appears. ``captions`` maps sample names to
    text (default: the label).
    """
    from ..data.io import read_mask, read_slice, to_model_input

    chosen = _round_robin_by_label(samples, max_tiles)
    tiles = []
    for sample in chosen:
        image = read_slice(sample.image)
        gray = (to_model_input(image)[0] * 255).round().astype(np.uint8)
        outlines = [read_mask(sample.mask, shape=image.shape)] if sample.mask is not None else []
        text = (captions or {}).get(sample.name) or sample.label or sample.name
        if sample.label and captions:
            text = f"[{sample.label}] {text}"
        tiles.append(Tile(gray, text, outlines))
    return contact_sheet(tiles, columns=columns, tile_size=tile_size, title=title)


def write_phantom_sheet(folder: str | Path, modality: str) -> Path:
    """``folder/contact_sheet.png`` for a phantom folder (images, lesion outlines, captions)."""
    from ..data.layouts import read_manifest
    from ..files import write_png

    folder = Path(folder)
    sheet = dataset_contact_sheet(read_manifest(folder / "labels.csv"),
                                  read_captions(folder / "captions.csv"),
                                  title=f"MWM phantoms: {modality} (red: lesion mask)")
    write_png(folder / "contact_sheet.png", sheet)
    return folder / "contact_sheet.png"


def read_captions(path: str | Path) -> dict[str, str]:
    """``captions.csv`` (image,caption) → {image stem: caption}; {} when there is none."""
    from ..data.io import stem_of

    path = Path(path)
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8") as handle:
        return {stem_of(row["image"]): row["caption"] for row in csv.DictReader(handle)}


def _round_robin_by_label(samples: list, limit: int) -> list:
    by_label: dict[str, list] = {}
    for sample in samples:
        by_label.setdefault(sample.label or "", []).append(sample)
    queues = [list(group) for _, group in sorted(by_label.items())]
    chosen: list = []
    while len(chosen) < limit and any(queues):
        for queue in queues:
            if queue and len(chosen) < limit:
                chosen.append(queue.pop(0))
    return chosen
