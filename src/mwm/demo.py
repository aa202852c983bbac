"""``mwm demo``: the pipeline on synthetic phantoms, offline, in one command.

Stages (each writes a standard file boundary under ``--out``):

1. ``phantoms/``  a brain-MRI phantom dataset (images, lesion masks, captions, prompts);
2. ``clip/``      a small CLIP trained from scratch on the train split's captions
   (time-boxed; reused when it is already complete);
3. ``saliency/``  M2IB saliency maps of the prompt for every image;
4. ``regions/``   region masks (Otsu + largest component);
5. ``eval/``      DSC / NSD / coverage / recall against the lesion masks (test split);
6. ``pretrain/``  region-aware sparse masked pretraining of a resnet18 (0.8 / 0.4);
7. ``probe_*/``   linear probes of the lesion class from scratch and from the encoder;
8. ``contact_sheet.png``: images with lesion outlines (red) and predicted regions (cyan).

The localizer is a tiny model trained for minutes on a CPU: the demo shows the pipeline
running end to end, not accurate masks (see benchmarks/results/localization.md).
"""

from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

from .files import write_png
from .runlog import RunManifest

# The small ViT that trained best within minutes (benchmarks/bench_localization.py).
DEMO_CLIP = dict(model="scratch-tiny", input_size=96, lr=2e-3, batch_size=32, prompt_mix=0.2,
                 arch={"width": 128, "layers": 3, "head_width": 32, "text_width": 128,
                       "text_layers": 2, "text_heads": 2, "embed_dim": 128})


def run_demo(args: argparse.Namespace) -> int:
    from .data.layouts import read_manifest
    from .data.phantoms import generate_phantoms

    out = Path(args.out)
    config = {k: v for k, v in vars(args).items() if k != "func"}
    with RunManifest(out, "demo", config, args.seed) as run:
        data_dir = out / "phantoms"
        summary = generate_phantoms(data_dir, modality=args.modality, n=args.n, size=args.size,
                                    seed=args.seed, workers=args.workers, progress=not args.quiet)
        print(f"[1/8] phantoms: {data_dir} ({summary.n} images; "
              + ", ".join(f"{k} {v}" for k, v in summary.class_counts.items()) + ")")
        samples = read_manifest(data_dir / "labels.csv")
        test = [s for s in samples if s.split == "test"]
        clip_dir = _train_clip(args, data_dir, out / "clip")
        maps = _localize(args, clip_dir, samples, out / "saliency")
        regions, evaluation = _postprocess_and_evaluate(args, maps, data_dir, out, test)
        encoder = _pretrain(args, data_dir, regions, out / "pretrain")
        probes = {name: _probe(args, data_dir, weights, out / f"probe_{name}")
                  for name, weights in (("scratch", None), ("mwm", encoder))}
        sheet_path = out / "contact_sheet.png"
        _contact_sheet(test, data_dir, regions, sheet_path, args)
        run.add(phantoms=str(data_dir), clip=str(clip_dir), contact_sheet=str(sheet_path),
                class_counts=summary.class_counts, localization=evaluation["metrics"],
                linear_probe=probes)
    dice = evaluation["metrics"]["dice"]["mean"]
    print(f"[8/8] contact sheet: {sheet_path}\n")
    print(f"localization, {evaluation['n_gt']} test images: mean DSC {dice:.3f} (a tiny CLIP "
          f"trained for {args.clip_seconds:.0f} s: the pipeline, not the accuracy, is the point)")
    print("linear probe of the lesion class (val split):")
    for name, metrics in probes.items():
        print(f"  {name:8s} accuracy {metrics['accuracy']:.3f}  balanced {metrics['balanced_accuracy']:.3f}")
    return 0


def _train_clip(args, data_dir: Path, clip_dir: Path) -> Path:
    from .clip import train_clip

    summary = train_clip(data_dir, clip_dir, epochs=args.clip_epochs, seed=args.seed,
                         time_limit=args.clip_seconds, progress=not args.quiet,
                         workers=args.workers, **DEMO_CLIP)
    print(f"[2/8] CLIP: {clip_dir} ({summary.epochs} epochs, last loss "
          f"{summary.final_loss if summary.final_loss is None else round(summary.final_loss, 3)})")
    return clip_dir


def _localize(args, clip_dir: Path, samples: list, maps_dir: Path) -> Path:
    from dataclasses import replace

    from .localize.m2ib import M2IBConfig, saliency_maps
    from .localize.run import localize_samples, model_identity
    from .localize.vlm import load_vlm

    name = f"local-dir:{clip_dir}"
    adapter = load_vlm(name)
    config = M2IBConfig(layer=1, seed=args.seed)
    prompted = [replace(s, prompt=s.prompt or "brain tumor") for s in samples]
    summary = localize_samples(
        prompted, maps_dir, lambda im, pr, names: saliency_maps(adapter, im, pr, config, keys=names),
        model_id=model_identity(name), params=config.to_dict(), progress=not args.quiet,
        shard_items=False)
    print(f"[3/8] saliency: {maps_dir} ({summary.n_written} new, {summary.n_skipped} up to date)")
    return maps_dir


def _postprocess_and_evaluate(args, maps: Path, data_dir: Path, out: Path, test: list):
    from .localize.evaluate import evaluate_folders
    from .localize.postprocess import PostprocessConfig, postprocess_folder

    regions = out / "regions"
    postprocess_folder(maps, regions, PostprocessConfig(method="otsu", top_k=1),
                       progress=not args.quiet)
    # score the test images only: their ground truth is gathered from the masks folder
    gt = out / "eval" / "gt"
    gt.mkdir(parents=True, exist_ok=True)
    for sample in test:
        shutil.copyfile(sample.mask.path, gt / sample.mask.path.name)
    evaluation = evaluate_folders(regions, gt, out / "eval", progress=not args.quiet)
    print(f"[4/8] regions: {regions}; [5/8] evaluation: {out / 'eval'}")
    return regions, evaluation


def _pretrain(args, data_dir: Path, regions: Path, run_dir: Path) -> str:
    from .pretrain.train import PretrainConfig, pretrain

    summary = pretrain(PretrainConfig(
        images=str(data_dir), regions=str(regions), out=str(run_dir), model="resnet18",
        input_size=args.size - args.size % 32, masking="region", ratio_salient=0.8,
        ratio_background=0.4, epochs=args.pretrain_epochs, batch_size=16, lr=2e-3,
        warmup_epochs=1, workers=0, device="cpu", seed=args.seed, quiet=args.quiet,
        resume="auto"))
    print(f"[6/8] pretrain: {run_dir} ({summary.steps} steps, last loss "
          f"{summary.final_loss if summary.final_loss is None else round(summary.final_loss, 3)})")
    return summary.encoder_path or str(run_dir / "encoder.safetensors")


def _probe(args, data_dir: Path, weights: str | None, out: Path) -> dict:
    from .downstream.classify import FinetuneConfig, finetune

    summary = finetune(FinetuneConfig(data=str(data_dir), out=str(out), weights=weights,
                                      model="resnet18", mode="linear",
                                      input_size=args.size - args.size % 32, epochs=20,
                                      batch_size=32, workers=0, device="cpu", seed=args.seed,
                                      quiet=True))
    print(f"[7/8] linear probe ({'MWM encoder' if weights else 'scratch'}): {out}")
    return {k: summary["best"]["metrics"][k] for k in ("accuracy", "balanced_accuracy", "macro_f1")}


def _contact_sheet(samples: list, data_dir: Path, regions: Path, path: Path, args) -> None:
    from .data.io import read_mask, read_slice, to_model_input
    from .report.contact_sheet import Tile, contact_sheet

    captions = read_captions(data_dir / "captions.csv")
    tiles = []
    for sample in samples[:18]:
        image = read_slice(sample.image)
        gray = (to_model_input(image)[0] * 255).round().astype("uint8")
        truth = [read_mask(sample.mask, shape=image.shape)] if sample.mask else []
        predicted = regions / f"{sample.name}.png"
        pred = [read_mask(predicted, shape=image.shape)] if predicted.is_file() else []
        tiles.append(Tile(gray, f"[{sample.label}] {captions.get(sample.name, '')}", truth, pred))
    write_png(path, contact_sheet(tiles, title=f"MWM demo: {args.modality} test images - red: "
                                               "lesion mask, cyan: region localized from the prompt"))


def read_captions(path: Path) -> dict[str, str]:
    """``captions.csv`` (image,caption) → {image stem: caption}."""
    from .data.io import stem_of

    with path.open(newline="", encoding="utf-8") as handle:
        return {stem_of(row["image"]): row["caption"] for row in csv.DictReader(handle)}
