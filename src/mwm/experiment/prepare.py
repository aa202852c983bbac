"""Stages shared by every cell of an experiment: the data and the text-guided regions.

Each stage writes its own folder under the run directory and is reused when it is
already complete with the same settings (phantoms via a stamp, the CLIP via its own
resume, saliency maps via their fingerprints); regions are redone whenever a map was
rewritten or the postprocessing settings changed, and scoring always reruns, so nothing
goes stale.

Layout::

    RUN/data/          the dataset (phantoms as ``mwm phantoms`` writes them)
    RUN/eval_data/     with data.eval_phantoms: the held-out evaluation phantoms, and
    RUN/evaluation/    labels.csv: data's train split + every eval_data image as val
    RUN/clip/          the small CLIP trained on the data's captions (when localize.clip)
    RUN/saliency/      one M2IB map per image (8-bit PNG); with localize.abstain also
                       presence.csv / presence.json (calibrated on the val split)
    RUN/regions/       binary region masks (postprocessed maps; empty where absent)
    RUN/localization/  DSC / NSD of the regions against the masks on the test split, and
                       selectivity.json (multi-finding data: DSC against the image's own
                       mask minus DSC against its other findings; null otherwise)
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import DataError
from ..files import read_json_or_none, write_csv, write_json
from ..localize.presence import PRESENCE_CSV
from ..localize.selectivity import SELECTIVITY_JSON, finding_selectivity
from .config import ExperimentConfig

# The phantom localizer of the demo and the phantom experiment, chosen on validation
# images within minutes (benchmarks/results/localization.md): the scratch-tiny preset
# (64 px, 4-px patches, fixed 2-D positions) and M2IB on its last block with half the
# noise scale, its map averaged over 3 x 3 sub-patch shifts and smoothed by 0.4 patch.
# The benchmark localizes better with the token-max loss and the maps of blocks 1 and 2
# averaged, but block 1 costs about 10x the M2IB time; set `clip: {token_max_weight: 1}`
# and `m2ib: {layer: [1, 2]}` to use it. The token-max loss with block 2 alone helps some
# CLIP seeds and hurts others (benchmark seeds 0-3: -0.15 / +0.04 / +0.22 / +0.12; the
# demo's seed-0 CLIP: DSC 0.37 -> 0.30), so it is off here.
# An experiment's phantom dataset when its file leaves a setting out.
PHANTOM_DATA = dict(modality="brain-mri", n=400, size=128, seed=0)
PHANTOM_CLIP = dict(model="scratch-tiny", epochs=10, batch_size=32, prompt_mix=0.2,
                    token_max_weight=0.0)
PHANTOM_M2IB = dict(layer=2, noise_scale=0.5, shifts=3, smooth=0.4)
# The published binarization (2-cluster k-means), one region per image, the component
# with the most saliency (not the largest) kept. No CRF by default: it is an optional extra.
DEFAULT_POSTPROCESS = dict(method="kmeans", top_k=1, rank="mass")
CLIP_DIR = "clip"  # RUN/clip: the CLIP an experiment trains for its localizer


@dataclass
class Prepared:
    data: Path                      # dataset root (labels.csv manifest)
    masks: Path | None              # the dataset's own region masks (ground truth)
    saliency: Path | None
    regions: Path | None
    localization: dict | None       # evaluate_folders summary, None without ground truth
    evaluation: Path | None = None  # RUN/evaluation (data.eval_phantoms), else the data's splits

    @property
    def eval_root(self) -> Path:
        """What the evaluations train and score on: RUN/evaluation, else the data."""
        return self.evaluation or self.data

    def regions_for(self, source: str) -> Path:
        path = {"localized": self.regions, "ground_truth": self.masks,
                "saliency": self.saliency}[source]
        if path is None:
            raise DataError(f"regions '{source}' are not available for this dataset "
                            "(no masks, or no localization configured).")
        return path


def prepare(config: ExperimentConfig, run: Path, *, workers: int | None = None,
            quiet: bool = False, log=print) -> Prepared:
    data = _dataset(config, run / "data", workers, quiet, log)
    evaluation = _evaluation_data(config, data, run, workers, quiet, log)
    masks = data / "masks" if (data / "masks").is_dir() else None
    if not config.needs_localization():
        return Prepared(data, masks, None, None, None, evaluation)
    saliency, n_new_maps = _saliency(config, data, run, quiet, log)
    regions = run / "regions"
    _postprocess(config, data, saliency, regions, n_new_maps, quiet)
    scores = _score(data, regions, run / "localization", quiet) if masks else None
    if scores:
        sel = scores["selectivity"]
        log(f"regions: {regions} (mean DSC {scores['metrics']['dice']['mean']:.3f} on "
            f"{scores['n_gt']} test images"
            + (f"; selectivity {sel['selectivity']['mean']:+.3f} on {sel['n']}" if sel else "")
            + ")")
    return Prepared(data, masks, saliency, regions, scores, evaluation)


def _dataset(config: ExperimentConfig, out: Path, workers: int | None, quiet: bool, log) -> Path:
    if "images" in config.data:
        root = Path(config.data["images"])
        if not root.exists():
            raise DataError(f"{config.source}: data.images {root} does not exist.")
        return root
    return _phantoms({**PHANTOM_DATA, **config.data["phantoms"]}, out, workers, quiet, log)


def _phantoms(params: dict, out: Path, workers: int | None, quiet: bool, log,
              stem_prefix: str = "") -> Path:
    """A phantom folder with these settings: reused when its stamp matches, else made anew."""
    from ..data.phantoms import generate_phantoms
    from ..report.contact_sheet import write_phantom_sheet

    stamp = out / "phantoms_done.json"
    settings = {**params, "stem_prefix": stem_prefix} if stem_prefix else params
    if read_json_or_none(stamp) == settings:
        log(f"phantoms: {out} (up to date)")
        return out
    if out.exists():
        shutil.rmtree(out)  # other settings: regenerate rather than mix two datasets
    summary = generate_phantoms(out, **params, stem_prefix=stem_prefix, workers=workers,
                                progress=not quiet)
    write_phantom_sheet(out, params["modality"])
    write_json(stamp, settings)
    log(f"phantoms: {out} ({summary.n} images; "
        + ", ".join(f"{k} {v}" for k, v in summary.class_counts.items()) + ")")
    return out


def _evaluation_data(config: ExperimentConfig, data: Path, run: Path, workers: int | None,
                     quiet: bool, log) -> Path | None:
    """With ``data.eval_phantoms``: ``RUN/evaluation/labels.csv``, a manifest of the training
    phantoms' train split (the labelled images the evaluations train on) and every image of
    a second phantom set as the ``val`` split (what they are scored on). Never localized."""
    if not config.held_out_phantoms:
        return None
    params = {**PHANTOM_DATA, **config.data["phantoms"], **config.held_out_phantoms}
    held_out = _phantoms(params, run / "eval_data", workers, quiet, log, stem_prefix="eval-")
    out = run / "evaluation"
    rows = [{**row, "split": "train"} for row in _manifest_rows(data, out)
            if row["split"] == "train"]
    rows += [{**row, "split": "val"} for row in _manifest_rows(held_out, out)]
    write_csv(out / "labels.csv", rows, fieldnames=list(rows[0]))
    n_train = sum(row["split"] == "train" for row in rows)
    log(f"evaluation: {out / 'labels.csv'} (train {n_train} images of {data}; val "
        f"{params['n']} held-out phantoms, seed {params['seed']})")
    return out


def _manifest_rows(folder: Path, seen_from: Path) -> list[dict]:
    """A phantom folder's labels.csv rows with the image and mask paths relative to the
    folder ``seen_from`` (where the new manifest goes)."""
    with (folder / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    prefix = Path(os.path.relpath(folder.resolve(), seen_from.resolve())).as_posix()
    for row in rows:
        for column in ("image", "mask"):
            if row.get(column):
                row[column] = f"{prefix}/{row[column]}"
    return rows


def localizer_name(config: ExperimentConfig, run: Path) -> str:
    """The model the run's saliency maps come from: ``localize.model``, or the CLIP the run
    trains into ``RUN/clip`` (as a ``local-dir:`` name)."""
    if config.localize.get("clip") is None:
        return str(config.localize["model"])
    return f"local-dir:{run / CLIP_DIR}"


def _vlm_name(config: ExperimentConfig, data: Path, run: Path, quiet: bool, log) -> str:
    """The localizer: the named model, or a CLIP trained once on the data's captions.

    A trained CLIP is reused as long as its settings are the same, even when its time
    budget stopped it before its last epoch (a rerun does not train it further, which
    would change every saliency map).
    """
    clip, name = config.localize.get("clip"), localizer_name(config, run)
    if clip is None:
        return name
    from ..clip import ClipTrainConfig, train_clip

    clip_dir, settings = run / CLIP_DIR, {**PHANTOM_CLIP, **clip}
    stamp = run / "clip_done.json"
    if read_json_or_none(stamp) == settings and (clip_dir / "open_clip_model.safetensors").is_file():
        log(f"CLIP: {clip_dir} (up to date)")
        return name
    if stamp.exists():
        stamp.unlink()
    options = dict(settings)
    seconds = options.pop("seconds", None)
    summary = train_clip(ClipTrainConfig(pairs=str(data), out=str(clip_dir), time_limit=seconds,
                                         quiet=quiet, **options))
    write_json(stamp, settings)
    done = len(summary.log)
    loss = None if summary.final_loss is None else round(summary.final_loss, 3)
    log(f"CLIP: {clip_dir} ({done} of {summary.epochs} epochs"
        f"{', stopped by its time budget' if summary.stopped_early else ''}; last loss {loss})")
    return name


def _saliency(config: ExperimentConfig, data: Path, run: Path, quiet: bool,
              log) -> tuple[Path, int]:
    """The saliency folder and how many maps this call (re)wrote."""
    from ..data.layouts import open_dataset
    from ..localize.m2ib import M2IBConfig
    from ..localize.pipeline import localize, val_calibration

    name = _vlm_name(config, data, run, quiet, log)
    section = config.localize
    defaults = PHANTOM_M2IB if "clip" in section else {}
    m2ib = M2IBConfig(**{**defaults, **(section.get("m2ib") or {}),
                         **{k: section[k] for k in ("objective", "temperature") if k in section}})
    prompt = str(section["prompt"])
    samples = [replace(s, prompt=s.prompt or prompt) for s in open_dataset(data).samples]
    rule = _contrast_rule(section, data) if section.get("abstain") or \
        m2ib.objective == "contrastive" else None
    presence = val_calibration(samples, rule.info.findings, data) if section.get("abstain") \
        else None
    out = run / "saliency"
    # on the CPU, as always: a map's fingerprint does not name the device, and CPU and GPU
    # noise streams differ, so one folder never mixes the two
    summary = localize(samples, out, model=name, m2ib=m2ib, contrast=rule, presence=presence,
                       device="cpu", progress=not quiet,
                       write_batch=int(section.get("batch_size", 8)))
    log(f"saliency: {out} ({summary.n_written} new, {summary.n_skipped} up to date)")
    if summary.presence:
        found = summary.presence
        log(f"presence: {found['n_absent']} of {found['n_images']} images found absent "
            f"(threshold {found['threshold']:.4f}, {found['source']})")
    return out, summary.n_written


def _contrast_rule(section: dict, data: Path):
    """The experiment's ``localize.contrast`` ('a|b', a list, or {prompt: [...]}) over the
    dataset's default (docs/presence.md)."""
    from ..localize.presence import ContrastRule, contrast_mapping, dataset_info, parse_contrast

    contrast = section.get("contrast")
    where = "the experiment's localize.contrast"
    if isinstance(contrast, dict):
        return ContrastRule(None, contrast_mapping(contrast, where), dataset_info(data))
    given = None if contrast is None else parse_contrast(
        contrast if isinstance(contrast, str) else "|".join(contrast), where)
    return ContrastRule(given, {}, dataset_info(data))


def _postprocess(config: ExperimentConfig, data: Path, saliency: Path, out: Path,
                 n_new_maps: int, quiet: bool) -> None:
    """Regions from the maps; redone when a map or a setting changed, else left in place
    (other shards may be reading them)."""
    from ..localize.postprocess import PostprocessConfig, postprocess_folder

    settings = {**DEFAULT_POSTPROCESS, **(config.localize.get("postprocess") or {})}
    post = PostprocessConfig(**settings)
    presence = saliency / PRESENCE_CSV if config.localize.get("abstain") else None
    stamp_settings = dict(settings)
    if presence is not None:  # other decisions: other regions
        stamp_settings["presence"] = hashlib.sha256(presence.read_bytes()).hexdigest()
    stamp = out.with_name(out.name + "_done.json")
    if n_new_maps == 0 and read_json_or_none(stamp) == stamp_settings and out.is_dir():
        return
    if stamp.exists():
        stamp.unlink()
    if out.exists():
        shutil.rmtree(out)  # never keep masks made from other maps or with other settings
    summary = postprocess_folder(saliency, out, post, progress=not quiet, presence=presence,
                                 images_dir=_image_folder(data) if post.crf else None)
    if summary["failures"]:
        first = summary["failures"][0]
        raise DataError(f"{len(summary['failures'])} saliency map(s) could not be postprocessed; "
                        f"first: {first['file']}: {first['reason']}")
    write_json(stamp, stamp_settings)


def _image_folder(data: Path) -> Path:
    """The one folder holding the dataset's images (the CRF pairs maps with images by name)."""
    from ..data.layouts import open_dataset

    folders = {s.image.path.parent for s in open_dataset(data).samples}
    if len(folders) != 1:
        raise DataError(f"{data}: postprocess.crf needs the images in one folder, found "
                        f"{len(folders)}; drop crf from the experiment's postprocess section "
                        "or gather the images.")
    return folders.pop()


def _score(data: Path, regions: Path, out: Path, quiet: bool) -> dict | None:
    """Score the regions of the test split (or every image when there is no split)."""
    from ..data.layouts import open_dataset
    from ..localize.evaluate import evaluate_folders

    samples = [s for s in open_dataset(data).samples if s.mask is not None]
    test = [s for s in samples if s.split == "test"] or samples
    if not test:
        return None
    gt = out / "gt"
    if gt.exists():
        shutil.rmtree(gt)
    gt.mkdir(parents=True)
    for sample in test:
        shutil.copyfile(sample.mask.path, gt / sample.mask.path.name)
    presence = regions / PRESENCE_CSV  # copied there by postprocess_folder under abstain
    scores = evaluate_folders(regions, gt, out, progress=not quiet,
                              presence=presence if presence.is_file() else None)
    # multi-finding data: does the region pick the prompt's finding over the image's others?
    scores["selectivity"] = finding_selectivity(
        regions, data, {s.mask.path.stem: s.mask.path for s in test})
    write_json(out / SELECTIVITY_JSON, scores["selectivity"])
    return scores
