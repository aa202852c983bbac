"""``mwm refine``: SAM refinement of coarse region masks with box prompts.

Each connected component of a coarse mask becomes one box prompt
``(x0, y0, x1, y1)`` (the tight box in continuous pixel coordinates: pixel ``i`` spans
``[i, i + 1)``). SAM (or MedSAM, any transformers ``SamModel`` checkpoint) encodes the
image once and predicts one mask per box; the masks are united and the ``k`` largest
components kept (``k`` = the number of coarse components unless given). An empty
coarse mask gives an empty refined mask (the reference crashed on it).

Pairing is by name (file stem, any extension), never by listing order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import opt

from ..errors import DataError

from ..data.io import read_mask, read_slice
from ..data.layouts import find_images
from ..files import safe_child, write_png
from ..progress import progress as progress_bar
from .crf import image_to_rgb8
from .hub import DEFAULT_SAM
from ..regions import component_boxes, keep_largest_components



@dataclass(kw_only=True)
class RefineConfig:
    """Settings of ``mwm refine``."""

    images: str = opt(help="image folder", positional=True)
    masks: str = opt(help="coarse mask folder (paired with the images by file stem)",
                     positional=True)
    out: str = opt(help="the refined mask folder")
    model: str = opt(DEFAULT_SAM, "transformers SamModel checkpoint: hub id (SAM, MedSAM e.g. "
                     "wanglab/medsam-vit-base) or local folder")
    top_k: int | None = opt(None, "components to keep (0 or none = as many as the coarse mask "
                            "has)", low=0)
    device: str = opt("auto", "cpu, cuda, cuda:N or auto (a GPU if there is one)")
    quiet: bool = opt(False, "no progress bars")


class SamRefiner:
    """A transformers ``SamModel`` with its image processor, frozen, on one device."""

    def __init__(self, model, processor, device: str = "cpu"):
        import torch

        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.processor = processor

    @classmethod
    def from_pretrained(cls, name: str = DEFAULT_SAM, device: str = "cpu") -> "SamRefiner":
        """Load a SAM / MedSAM checkpoint (hub id or local folder), offline-safe.

        A folder must hold a transformers ``SamModel`` (``config.json``, the weights and
        ``preprocessor_config.json``); a hub id needs the network or the Hugging Face cache
        (a missing one is reported at once when the hub does not answer)."""
        from transformers import SamModel, SamProcessor

        from .hub import SAM_HINT, hub_guard, load_error

        path = Path(name).expanduser()
        if name.startswith(("/", "./", "../", "~")) and not path.is_dir():
            raise DataError(f"SAM model folder {path} not found; {SAM_HINT}.")
        with hub_guard():
            try:
                model = SamModel.from_pretrained(name)
                processor = SamProcessor.from_pretrained(name)
            except (OSError, ValueError) as err:
                raise load_error(name, err, hint=SAM_HINT) from err
        return cls(model, processor, device)

    def refine(self, image_rgb: np.ndarray, coarse: np.ndarray, top_k: int | None = None) -> np.ndarray:
        """Refined bool (H, W) mask for one RGB uint8 image and its coarse mask."""
        import torch

        if image_rgb.shape[:2] != coarse.shape:
            raise DataError(f"image is {image_rgb.shape[1]}x{image_rgb.shape[0]} but its coarse "
                            f"mask is {coarse.shape[1]}x{coarse.shape[0]}")
        boxes = component_boxes(coarse)
        if not boxes:
            return np.zeros(coarse.shape, dtype=bool)
        inputs = self.processor(images=image_rgb, input_boxes=[[list(map(float, b)) for b in boxes]],
                                return_tensors="pt")
        inputs = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        with torch.inference_mode():
            out = self.model(pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"],
                             multimask_output=False)
        masks = self.processor.image_processor.post_process_masks(
            out.pred_masks.cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu())
        union = masks[0].any(dim=(0, 1)).numpy()  # (boxes, 1, H, W) → (H, W)
        return keep_largest_components(union, top_k if top_k else len(boxes))


def refine_folder(images_dir: str | Path, masks_dir: str | Path, out_dir: str | Path,
                  refiner: SamRefiner, *, top_k: int | None = None,
                  progress: bool = True) -> dict:
    """Refine every coarse mask in ``masks_dir`` with its image (paired by name).

    When ``mwm postprocess`` wrote ``masks_dir``, only the masks its manifest lists are read
    (:func:`~mwm.runlog.stage_outputs`). Returns counts, ``failures`` and ``outputs`` (the
    names written, for the next stage)."""
    from ..runlog import stage_outputs

    images = {ref.name: ref for ref in find_images(images_dir)}
    coarse_refs = find_images(masks_dir)
    listed = stage_outputs(masks_dir, ("postprocess",))
    if listed is not None:
        coarse_refs = [ref for ref in coarse_refs if ref.path.name in listed]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    failures, written = [], []
    for ref in progress_bar(coarse_refs, total=len(coarse_refs), desc="refine", unit="img",
                            enabled=progress):
        try:
            if ref.name not in images:
                raise DataError(f"no image named {ref.name}.* in {images_dir} for this mask")
            image = read_slice(images[ref.name])
            rgb = image_to_rgb8(image)
            coarse = read_mask(ref, shape=image.shape)
            refined = refiner.refine(rgb, coarse, top_k)
            target = safe_child(out_dir, f"{ref.name}.png")
            write_png(target, refined.astype(np.uint8) * 255)
            written.append(target.name)
        except DataError as err:
            failures.append({"name": ref.name, "file": str(ref.path), "reason": str(err)})
    return {"n_masks": len(coarse_refs), "n_written": len(written), "n_failed": len(failures),
            "failures": failures, "outputs": written}
