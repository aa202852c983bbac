"""The localize pipeline as one call: a model and a prompt per image → saliency maps.

:func:`localize` is what ``mwm localize``, ``mwm experiment`` and ``mwm demo`` run: load
the vision-language model (:func:`~mwm.localize.vlm.load_vlm`), check the M2IB settings
against it, optionally tune them on validation masks (:func:`~mwm.localize.tune.tune`),
record them in ``m2ib_config.json``, and write one saliency map per image
(:func:`write_maps`).

For every image (2-D slice) one 8-bit PNG saliency map is written, named after the
image and of the image's size. Each PNG records, in a text chunk, a fingerprint of how
it was made (model, prompt(s), M2IB parameters, algorithm version). A re-run skips a
map only when its fingerprint matches the current run; anything else is recomputed,
so changing the prompt, the model or a parameter never leaves stale maps behind.

Several processes (``torchrun``) share a big set with ``shard=(rank, world)``: each takes
every ``world``-th image, with no coordination (outputs are per-image files).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..data.io import read_slice, to_model_input
from ..data.layouts import Sample, split_prompt
from ..errors import DataError
from ..config import default_of, opt
from ..files import read_png_text, safe_child, write_json, write_png
from ..progress import progress as progress_bar
from .hub import DEFAULT_VLM
from .m2ib import M2IBConfig
from .postprocess import BINARIZE_METHODS, PostprocessConfig

FINGERPRINT_KEY = "mwm-saliency"
ALGORITHM_VERSION = 1  # bump when the saliency computation changes
CONFIG_FILE = "m2ib_config.json"


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


def shard(items: list, rank: int = 0, world: int = 1) -> list:
    """Process ``rank``'s share of ``items`` among ``world`` processes (every world-th item)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world size {world}")
    return items[rank::world]


@dataclass
class LocalizeSummary:
    n_images: int = 0
    n_written: int = 0
    n_skipped: int = 0
    failures: list[dict] = field(default_factory=list)
    m2ib: dict = field(default_factory=dict)        # the settings the maps were made with
    tune_rows: list[dict] = field(default_factory=list)  # the --tune table, if tuned

    def to_dict(self) -> dict:
        return {"n_images": self.n_images, "n_written": self.n_written,
                "n_skipped": self.n_skipped, "n_failed": len(self.failures),
                "failures": self.failures}


@dataclass
class TuneSpec:
    """Validation data for :func:`localize`'s grid search: samples with masks and prompts,
    scored by DSC after ``post`` (the postprocessing the run will use)."""

    samples: list[Sample]
    post: PostprocessConfig
    n_images: int = 20
    seed: int = 0
    published: bool = False  # search only beta x layer, the published formula kept


@dataclass(kw_only=True)
class LocalizeConfig:
    """Settings of ``mwm localize``: the data, the model, M2IB, and the optional tuning."""

    images: str = opt(help="image folder, phantom folder or CSV manifest", positional=True)
    out: str = opt(help="the saliency map folder")
    prompt: str | None = opt(None, "one prompt for every image; 'a|b' averages an ensemble")
    prompts: str | None = opt(None, "per-image prompts (JSON or CSV); --prompt then covers images "
                              "the file lacks", metavar="FILE")
    model: str = opt(DEFAULT_VLM, "open_clip hf-hub:ORG/REPO, NAME:TAG, local-dir:PATH or a folder "
                     "(e.g. from `mwm clip train`), or a transformers CLIP id; the default is "
                     "BiomedCLIP")
    trust_remote_code: bool = opt(False, "allow a transformers model's own code to run")
    device: str = opt("auto", "cpu, cuda, cuda:N or auto (a GPU if there is one)")
    m2ib: M2IBConfig = opt(factory=M2IBConfig, flatten=True)
    published: bool = opt(False, "the published M2IB code's settings (standardize off, "
                          "noise-scale 1, beta 0.1, layer 7, 10 steps of 10 noise draws, lr 1); "
                          "--layer and --beta may still be given, M2IB flags that contradict it "
                          "are refused (docs/m2ib.md)")
    tune: tuple[str, str] | None = opt(None, "grid-search beta x layer x noise-scale x "
                                       "standardize (with --published: beta x layer) on "
                                       "validation masks first, scored by DSC after the "
                                       "postprocessing below; the run uses the best", nargs=2,
                                       metavar=("VAL_IMAGES", "VAL_MASKS"))
    tune_images: int = opt(20, "validation images for --tune", low=1)
    method: str = opt(default_of(PostprocessConfig, "method"), "postprocessing used to score "
                      "--tune (use the same in `mwm postprocess`)", choices=BINARIZE_METHODS)
    threshold: float = opt(default_of(PostprocessConfig, "threshold"), "--tune: threshold of "
                           "--method threshold", low=0.0, high=1.0)
    top_k: int | None = opt(None, "--tune: components kept (0 or none = all)", low=0)
    quiet: bool = opt(False, "no progress bars")

    def __post_init__(self) -> None:
        if self.published:  # every M2IB setting fixed here, so the manifest records them
            self.m2ib = self.m2ib.published()


SaliencyFn = Callable[[list[np.ndarray], list, list[str]], list[np.ndarray]]


def localize(samples: list[Sample], out: str | Path, *, model, m2ib, tune: TuneSpec | None = None,
             device: str = "auto", trust_remote_code: bool = False, model_id: str | None = None,
             shard_of: tuple[int, int] = (0, 1), write_batch: int | None = None,
             progress: bool = True) -> LocalizeSummary:
    """Saliency maps of every sample's prompt into ``out`` (see the module docstring).

    ``model``: a model name or folder (:func:`~mwm.localize.vlm.load_vlm`) or an adapter;
    ``m2ib``: an :class:`~mwm.localize.m2ib.M2IBConfig`, its settings left at None taken
    from the model folder's recommendation, else M2IB's defaults, before anything is
    written (``m2ib_config.json`` and the maps' fingerprints hold the values used);
    ``tune``: tune beta x layer x noise-scale x standardize first (any layer given is
    then not checked: the grid picks the model's) and use the best; ``model_id``: what
    identifies the model in the maps' fingerprints (default: the name, with the weight
    files of a local folder);
    ``shard_of``: ``(rank, world)`` of this process; ``write_batch``: images per call of
    the saliency function (default: M2IB's batch size; no effect on the maps).
    """
    from ..utils import resolve_device
    from .m2ib import saliency_maps
    from .vlm import VLMAdapter, load_vlm

    if isinstance(model, VLMAdapter):
        adapter = model
    else:
        adapter = load_vlm(model, device=str(resolve_device(device)),
                           trust_remote_code=trust_remote_code)
    rows: list[dict] = []
    if tune is None:
        m2ib = m2ib.for_model(adapter).validate(adapter.depth)
    else:  # the grid replaces the layer, so the default 7 need not fit a shallow model
        m2ib = m2ib.for_model(adapter, tuning=True).validate()
        m2ib, rows = _tuned(adapter, m2ib, tune, out, progress)
        m2ib = m2ib.validate(adapter.depth)
    name = model if isinstance(model, str) else adapter.name
    if model_id is None:
        model_id = model_identity(name) if isinstance(model, str) else name
    write_json(Path(out) / CONFIG_FILE, {"model": name, **m2ib.to_dict()})
    summary = write_maps(
        shard(samples, *shard_of), out,
        lambda im, pr, names: saliency_maps(adapter, im, pr, m2ib, keys=names),
        model_id=model_id, params=m2ib.to_dict(), batch_size=write_batch or m2ib.batch_size,
        progress=progress)
    summary.m2ib, summary.tune_rows = m2ib.to_dict(), rows
    return summary


def _tuned(adapter, m2ib, spec: TuneSpec, out, progress: bool):
    from .m2ib import saliency_maps
    from .tune import default_grid, pick_validation, tune

    return tune(pick_validation(spec.samples, spec.n_images, spec.seed),
                lambda im, pr, names, cfg: saliency_maps(adapter, im, pr, cfg, keys=names),
                m2ib, spec.post, out, grid=default_grid(adapter.depth, published=spec.published),
                progress=progress)


def write_maps(samples: list[Sample], out_dir: str | Path, saliency_fn: SaliencyFn, *,
               model_id: str, params: dict, batch_size: int = 8,
               progress: bool = True) -> LocalizeSummary:
    """Write one saliency PNG per sample; ``saliency_fn(images, prompts, names) -> maps``.

    ``names`` (the samples' names) seed each image's noise, so a map does not depend on
    which batch its image landed in.

    ``samples`` carry their prompt (``Sample.prompt``; a ``|``-separated prompt is an
    ensemble). Up-to-date maps are skipped, failed images recorded, the rest goes on.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = LocalizeSummary(n_images=len(samples))
    pending: list[tuple[Sample, Path, str]] = []
    for sample in samples:
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
