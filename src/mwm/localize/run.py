"""``mwm localize``: saliency maps for a folder of images, resumable and shardable.

For every image (2-D slice) one 8-bit PNG saliency map is written, named after the
image and of the image's size. Each PNG records, in a text chunk, a fingerprint of how
it was made (model, prompt(s), M2IB parameters, algorithm version). A re-run skips a
map only when its fingerprint matches the current run; anything else is recomputed,
so changing the prompt, the model or a parameter never leaves stale maps behind.

Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) each process takes every
``WORLD_SIZE``-th image, so a big set is shared between processes or GPUs with no
coordination: outputs are per-image files.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import DataError

from ..data.io import read_slice, to_model_input
from ..data.layouts import Sample
from ..files import read_png_text, safe_child, write_png
from ..progress import progress as progress_bar

FINGERPRINT_KEY = "mwm-saliency"
ALGORITHM_VERSION = 1  # bump when the saliency computation changes


def fingerprint(model_id: str, prompt: str | Sequence[str], params: dict) -> str:
    """A short stable hash of everything that determines one saliency map."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    blob = json.dumps({"model": model_id, "prompts": prompts, "params": params,
                       "version": ALGORITHM_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def model_identity(name: str) -> str:
    """The model name, plus size and mtime of its weight files for local folders.

    Retraining a local model into the same folder changes its identity, so maps made
    with the old weights are recomputed.
    """
    path = Path(name[len("local-dir:"):] if name.startswith("local-dir:") else name)
    if not path.is_dir():
        return name
    stats = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime))
                   for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    return f"{name}|{stats}"


def shard(items: list, rank: int | None = None, world: int | None = None) -> list:
    """This process's share of ``items`` under torchrun (every WORLD_SIZE-th item)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world size {world}")
    return items[rank::world]


@dataclass
class LocalizeSummary:
    n_images: int = 0
    n_written: int = 0
    n_skipped: int = 0
    failures: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"n_images": self.n_images, "n_written": self.n_written,
                "n_skipped": self.n_skipped, "n_failed": len(self.failures),
                "failures": self.failures}


SaliencyFn = Callable[[list[np.ndarray], list, list[str]], list[np.ndarray]]


def localize_samples(samples: list[Sample], out_dir: str | Path, saliency_fn: SaliencyFn, *,
                     model_id: str, params: dict, batch_size: int = 8,
                     progress: bool = True, shard_items: bool = True) -> LocalizeSummary:
    """Write one saliency PNG per sample; ``saliency_fn(images, prompts, names) -> maps``.

    ``names`` (the samples' names) seed each image's noise, so a map does not depend on
    which batch its image landed in.

    ``samples`` carry their prompt (``Sample.prompt``; a ``|``-separated prompt is an
    ensemble). Up-to-date maps are skipped, failed images recorded, the rest goes on.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = shard(samples) if shard_items else samples
    summary = LocalizeSummary(n_images=len(todo))
    pending: list[tuple[Sample, Path, str]] = []
    for sample in todo:
        target = safe_child(out_dir, f"{sample.name}.png")
        stamp = fingerprint(model_id, split_prompt(sample.prompt), params)
        if read_png_text(target).get(FINGERPRINT_KEY) == stamp:
            summary.n_skipped += 1
        else:
            pending.append((sample, target, stamp))
    batches = [pending[i:i + batch_size] for i in range(0, len(pending), batch_size)]
    for batch in progress_bar(batches, total=len(batches), desc="localize", unit="batch",
                              enabled=progress):
        _run_batch(batch, saliency_fn, summary)
    return summary


def split_prompt(prompt: str | None) -> list[str]:
    """``"brain tumor|glioma"`` → an ensemble of two prompts."""
    if not prompt:
        raise DataError("empty prompt")
    return [p.strip() for p in prompt.split("|") if p.strip()]


def _run_batch(batch: list[tuple[Sample, Path, str]], saliency_fn: SaliencyFn,
               summary: LocalizeSummary) -> None:
    images, prompts, ready = [], [], []
    for sample, target, stamp in batch:
        try:
            images.append(to_model_input(read_slice(sample.image)))
            prompts.append(split_prompt(sample.prompt))
            ready.append((sample, target, stamp))
        except DataError as err:
            summary.failures.append({"name": sample.name, "file": str(sample.image.path),
                                     "reason": str(err)})
    if not ready:
        return
    maps = saliency_fn(images, prompts, [sample.name for sample, _, _ in ready])
    for (sample, target, stamp), saliency in zip(ready, maps):
        pixels = np.clip(np.round(np.asarray(saliency) * 255.0), 0, 255).astype(np.uint8)
        write_png(target, pixels, text={FINGERPRINT_KEY: stamp})
        summary.n_written += 1
