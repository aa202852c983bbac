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
so changing the prompt, the model or a parameter never leaves stale maps behind. With
the contrastive objective the fingerprint also holds the image's contrast prompts.

With ``presence`` (``mwm localize --abstain``, :mod:`mwm.localize.presence`) it also
scores whether each image holds the prompt's finding at all and writes ``presence.csv``
and ``presence.json``; ``mwm postprocess`` gives the images found absent an empty region.

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
from .presence import (PRESENCE_FILES, ContrastRule, PresenceSpec, abstain, dataset_info,
                       load_contrast_file, parse_contrast, read_threshold)

FINGERPRINT_KEY = "mwm-saliency"
ALGORITHM_VERSION = 1  # bump when the saliency computation changes
CONFIG_FILE = "m2ib_config.json"


def fingerprint(model_id: str, prompt: str | Sequence[str], params: dict,
                contrast: Sequence[str] | None = None) -> str:
    """A short stable hash of everything that determines one saliency map (``contrast``:
    the contrastive objective's prompts; None leaves the hash as it was before them)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    record = {"model": model_id, "prompts": prompts, "params": params,
              "version": ALGORITHM_VERSION}
    if contrast is not None:
        record["contrast"] = list(contrast)
    blob = json.dumps(record, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


# What identifies a local model folder: its weights and its configuration files.
IDENTITY_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json")


def model_identity(name: str) -> str:
    """The model name; for a local folder, a hash of the contents of its weight and
    configuration files instead of its path.

    Retraining a local model into the same folder changes its identity, so maps made with
    the old weights are recomputed; a copied or moved folder (a run copied elsewhere, whose
    CLIP is ``local-dir:RUN/clip``) keeps it, so its maps are reused.
    """
    path = Path(name[len("local-dir:"):] if name.startswith("local-dir:") else name)
    if not path.is_dir():
        return name
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.suffix in IDENTITY_SUFFIXES and p.is_file()):
        digest.update(f"{file.name}\0".encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return f"local-dir:sha256:{digest.hexdigest()[:20]}"


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
    presence: dict | None = None                    # presence.json's content, with --abstain
    contrast: dict | None = None                    # {prompt: contrast prompts}, when read

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
    prompt: str | None = opt(None, "one prompt for every image, over a manifest's prompt column; "
                             "'a|b' averages an ensemble")
    prompts: str | None = opt(None, "per-image prompts (JSON or CSV), over --prompt and the "
                              "manifest; --prompt then covers images the file lacks",
                              metavar="FILE")
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
    contrast: str | None = opt(None, "contrast prompts 'a|b|c' for every image (--objective "
                               "contrastive, --abstain; default: the modality's normal prompt "
                               "and the other findings of findings.csv, docs/presence.md)")
    contrast_file: str | None = opt(None, "per-prompt contrast prompts, JSON {prompt: "
                                    "[contrast, ...]}; --contrast covers prompts it lacks",
                                    metavar="FILE")
    abstain: bool = opt(False, "decide per image whether the prompt's finding is there at all "
                        "(presence score against the contrast prompts, threshold calibrated on "
                        "validation masks); `mwm postprocess` gives absent images an empty "
                        "region (docs/presence.md)")
    presence_threshold: str | None = opt(None, "--abstain: this threshold, or the one of an "
                                         "earlier presence.json, instead of calibrating",
                                         metavar="VALUE|presence.json")
    quiet: bool = opt(False, "no progress bars")

    def __post_init__(self) -> None:
        if self.published:  # every M2IB setting fixed here, so the manifest records them
            self.m2ib = self.m2ib.published()
        if (self.contrast or self.contrast_file) and not self.uses_contrast:
            raise DataError("--contrast / --contrast-file are read by --objective contrastive "
                            "and --abstain; with neither they would change nothing. Add one, "
                            "or leave them out.")
        if self.presence_threshold is not None and not self.abstain:
            raise DataError("--presence-threshold is the threshold of --abstain; add --abstain "
                            "or leave it out.")

    @property
    def uses_contrast(self) -> bool:
        return self.abstain or self.m2ib.objective == "contrastive"

    def contrast_rule(self) -> ContrastRule | None:
        """The contrast prompts of each prompt (None when nothing reads them)."""
        if not self.uses_contrast:
            return None
        return ContrastRule(parse_contrast(self.contrast) if self.contrast else None,
                            load_contrast_file(self.contrast_file) if self.contrast_file else {},
                            dataset_info(self.images))

    def presence_spec(self, samples: list[Sample], tune: TuneSpec | None,
                      rule: ContrastRule | None) -> PresenceSpec | None:
        """What --abstain decides with: --presence-threshold, else calibration on --tune's
        images (test-split ones left out), else on the dataset's val split with masks."""
        if not self.abstain:
            return None
        if self.presence_threshold is not None:
            threshold, source, calibration = read_threshold(self.presence_threshold)
            return PresenceSpec(threshold=threshold, source=source,
                                given_calibration=calibration)
        if tune is not None:
            kept = [s for s in tune.samples if s.split != "test"]
            if not kept:  # say why, rather than ask for the --tune the user already gave
                raise DataError(f"--abstain: every one of the {len(tune.samples)} --tune image(s) "
                                f"in {self.tune[0]} is in the test split, and the presence "
                                "threshold is never calibrated on test images; give val-split "
                                "images to --tune, or --presence-threshold VALUE|presence.json.")
            return PresenceSpec(kept, source=f"--tune {self.tune[0]} {self.tune[1]}")
        return val_calibration(samples, rule.info.findings if rule else [], self.images)

    def outputs(self, samples: list[Sample]) -> list[str]:
        """The files the next stage reads (the manifest lists them)."""
        return [f"{s.name}.png" for s in samples] + (list(PRESENCE_FILES) if self.abstain else [])


def val_calibration(samples: list[Sample], findings: list[dict], where) -> PresenceSpec:
    """Calibration on the samples of the val split that have a mask."""
    val = [s for s in samples if s.split == "val" and s.mask is not None]
    if not val:
        raise DataError(f"--abstain: {where} has no val-split images with masks to calibrate "
                        "the presence threshold on; give --tune VAL_IMAGES VAL_MASKS, or "
                        "--presence-threshold VALUE|presence.json.")
    return PresenceSpec(val, source=f"the val split of {where} ({len(val)} images)",
                        findings=findings)


SaliencyFn = Callable[[list[np.ndarray], list, list[str]], list[np.ndarray]]


def localize(samples: list[Sample], out: str | Path, *, model, m2ib, tune: TuneSpec | None = None,
             contrast: ContrastRule | None = None, presence: PresenceSpec | None = None,
             device: str = "auto", trust_remote_code: bool = False, model_id: str | None = None,
             shard_of: tuple[int, int] = (0, 1), write_batch: int | None = None,
             progress: bool = True) -> LocalizeSummary:
    """Saliency maps of every sample's prompt into ``out`` (see the module docstring).

    ``model``: a model name or folder (:func:`~mwm.localize.vlm.load_vlm`) or an adapter;
    ``m2ib``: an :class:`~mwm.localize.m2ib.M2IBConfig`, its settings left at None taken
    from the model folder's recommendation, else M2IB's defaults, before anything is
    written (``m2ib_config.json`` and the maps' fingerprints hold the values used);
    ``tune``: tune beta x layer x noise-scale x standardize first (any layer given is
    then not checked: the grid picks the model's) and use the best; ``contrast``: each
    prompt's contrast prompts (the contrastive objective and ``presence`` read them;
    default: :func:`~mwm.localize.presence.default_contrast` without a dataset);
    ``presence``: abstention first (rank 0 writes ``presence.csv`` / ``presence.json``
    for every sample); ``model_id``: what identifies the model in the maps' fingerprints
    (default: the name, with the weight files of a local folder);
    ``shard_of``: ``(rank, world)`` of this process; ``write_batch``: images per call of
    the saliency function (default: M2IB's batch size; no effect on the maps).
    """
    from ..utils import resolve_device
    from .vlm import VLMAdapter, load_vlm

    if isinstance(model, VLMAdapter):
        adapter = model
    else:
        adapter = load_vlm(model, device=str(resolve_device(device)),
                           trust_remote_code=trust_remote_code)
    name = model if isinstance(model, str) else adapter.name
    rule = contrast if contrast is not None else ContrastRule()
    checked = m2ib.for_model(adapter, tuning=tune is not None)
    checked.validate(None if tune is not None else adapter.depth)
    found = None
    if presence is not None and shard_of[0] == 0:  # before the maps: a calibration error is quick
        found = _presence(adapter, samples, out, checked, rule, presence, name, progress)
    m2ib, rows = checked, []
    if tune is not None:  # the grid replaces the layer: the default 7 need not fit the model
        m2ib, rows = _tuned(adapter, checked, tune, out, progress, rule)
        m2ib = m2ib.validate(adapter.depth)
    if model_id is None:
        model_id = model_identity(name) if isinstance(model, str) else name
    record = {"model": name, **m2ib.to_dict()}
    if m2ib.objective == "contrastive" or presence is not None:
        record["contrast"] = rule.lists([s.prompt for s in samples])
    write_json(Path(out) / CONFIG_FILE, record)
    summary = write_maps(shard(samples, *shard_of), out, _saliency_fn(adapter, m2ib, rule),
                         model_id=model_id, params=m2ib.to_dict(),
                         batch_size=write_batch or m2ib.batch_size, progress=progress,
                         contrast_of=rule.for_prompt if m2ib.objective == "contrastive" else None)
    summary.m2ib, summary.tune_rows, summary.contrast = m2ib.to_dict(), rows, record.get("contrast")
    if found is not None:
        known = {f["name"] for f in summary.failures}
        summary.failures += [f for f in found.pop("failures") if f["name"] not in known]
        summary.presence = found
    return summary


def _saliency_fn(adapter, m2ib, rule: ContrastRule):
    """``(images, prompts, names[, config]) -> maps`` with each image's contrast prompts
    when the objective is contrastive (the published objective refuses them)."""
    from .m2ib import saliency_maps

    def run(images, prompts, names, cfg=None):
        cfg = m2ib if cfg is None else cfg
        contrast = ([rule.for_prompt(p) for p in prompts] if cfg.objective == "contrastive"
                    else None)
        return saliency_maps(adapter, images, prompts, cfg, keys=names, contrast=contrast)
    return run


def _presence(adapter, samples, out, m2ib, rule: ContrastRule, spec: PresenceSpec, name: str,
              progress: bool) -> dict:
    from .m2ib import presence_scores

    def score(images, prompts, contrast):
        return presence_scores(adapter, images, prompts, contrast, temperature=m2ib.temperature)

    return abstain(samples, out, score, spec, rule, progress=progress,
                   record={"model": name, "temperature": m2ib.temperature,
                           "score": "log-softmax of the prompt among {prompt} and its contrast "
                                    "prompts, logits cos / temperature, whole image"})


def _tuned(adapter, m2ib, spec: TuneSpec, out, progress: bool, rule: ContrastRule):
    from .tune import default_grid, pick_validation, tune

    return tune(pick_validation(spec.samples, spec.n_images, spec.seed),
                _saliency_fn(adapter, m2ib, rule), m2ib, spec.post, out,
                grid=default_grid(adapter.depth, published=spec.published), progress=progress)


def write_maps(samples: list[Sample], out_dir: str | Path, saliency_fn: SaliencyFn, *,
               model_id: str, params: dict, batch_size: int = 8, progress: bool = True,
               contrast_of: Callable[[list[str]], list[str]] | None = None) -> LocalizeSummary:
    """Write one saliency PNG per sample; ``saliency_fn(images, prompts, names) -> maps``.

    ``names`` (the samples' names) seed each image's noise, so a map does not depend on
    which batch its image landed in.

    ``samples`` carry their prompt (``Sample.prompt``; a ``|``-separated prompt is an
    ensemble). ``contrast_of(prompts)``: the contrast prompts of a prompt, when they shape
    the map (they are then part of its fingerprint). Up-to-date maps are skipped, failed
    images recorded, the rest goes on.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = LocalizeSummary(n_images=len(samples))
    pending: list[tuple[Sample, Path, str]] = []
    for sample in samples:
        target = safe_child(out_dir, f"{sample.name}.png")
        prompts = split_prompt(sample.prompt)
        stamp = fingerprint(model_id, prompts, params,
                            contrast_of(prompts) if contrast_of is not None else None)
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
