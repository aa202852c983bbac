"""The ``mwm`` command line: parsing and printing only; the work is in the library.

Every command accepts ``--config FILE.yaml`` (defaults for its flags; flags win), uses
the same flag names for the same things (``--out``, ``--seed``, ``--quiet``,
``--device``, ``--workers`` ...) and writes ``run_manifest.json`` into its output
folder.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from . import __version__
from .errors import DataError

EXIT_OK, EXIT_FAILURES, EXIT_USAGE = 0, 1, 2


# --------------------------------------------------------------------------- flag vocabulary
# One function per shared flag, so the same name always means the same thing.

def add_out(p: argparse.ArgumentParser, default: str | None = None, positional: bool = False) -> None:
    if positional:
        p.add_argument("out", nargs="?", default=default, metavar="OUT",
                       help="output folder (created if missing)")
    else:
        p.add_argument("--out", default=default, metavar="DIR",
                       help=f"output folder (default: {default})" if default else "output folder")


def add_resume(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", metavar="PATH|auto",
                   help="continue from a checkpoint (run folder or file; auto = --out's own if "
                   "any). A missing path is an error")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps (resumable)")


def add_common(p: argparse.ArgumentParser, *, seed: bool = True, workers: bool = False,
               device: bool = False) -> None:
    p.add_argument("--config", metavar="FILE.yaml",
                   help="YAML file with defaults for this command's flags (flags override it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    if seed:
        p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    if workers:
        p.add_argument("--workers", type=int, default=None,
                       help="worker processes (default: number of CPU cores)")
    if device:
        p.add_argument("--device", default="auto",
                       help="cpu, cuda, cuda:N or auto (default: auto = GPU if available)")


# --------------------------------------------------------------------------- commands

def cmd_phantoms(args: argparse.Namespace) -> int:
    from .data.phantoms import generate_phantoms
    from .report.contact_sheet import write_phantom_sheet
    from .runlog import RunManifest

    out = _require(args.out, "OUT (the output folder)")
    with RunManifest(out, "phantoms", _config_of(args), args.seed) as run:
        summary = generate_phantoms(out, modality=args.modality, n=args.n, size=args.size,
                                    seed=args.seed, bit_depth=args.bit_depth,
                                    workers=args.workers, class_folders=args.class_folders,
                                    progress=not args.quiet)
        run.add(class_counts=summary.class_counts, split_counts=summary.split_counts,
                seconds=summary.seconds)
        write_phantom_sheet(out, args.modality)
    rate = summary.n / max(summary.seconds, 1e-9)
    print(f"wrote {summary.n} {summary.modality} phantoms ({summary.size}x{summary.size}) to "
          f"{out} in {summary.seconds:.1f} s ({rate:.0f} images/s)")
    print("classes: " + ", ".join(f"{k} {v}" for k, v in summary.class_counts.items()))
    print("splits:  " + ", ".join(f"{k} {v}" for k, v in summary.split_counts.items()))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def cmd_experiment(args: argparse.Namespace) -> int:
    from .experiment import load_experiment, run_experiment, shard_from
    from .experiment.results import results_markdown
    from .runlog import RunManifest

    config = load_experiment(args.experiment)
    out = Path(args.out or Path("runs") / config.name)
    shard = shard_from(args.shard, args.device)
    manifest_dir = out if shard.main else out / "shards" / str(shard.index)
    with RunManifest(manifest_dir, "experiment", {**_config_of(args), "experiment_file": config.to_dict()}) as run:
        results = run_experiment(config, out, shard=shard, workers=args.workers, quiet=args.quiet)
        run.add(missing=results["missing"], failures=results["failures"])
    report = _write_report(out) if not args.no_report else None
    print("\n" + results_markdown(results))
    print(f"results: {out / 'results.md'}" + (f"; report: {report}" if report else ""))
    return _finish([{"name": f.split(":")[0], "reason": f} for f in results["failures"]], "cell")


def _write_report(run_dir: Path, path: Path | None = None) -> Path:
    from .report.html import write_report

    return write_report(run_dir, path)


def cmd_report(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: not a folder; give the --out folder of `mwm demo` or "
                        "`mwm experiment`.")
    print(f"report: {_write_report(run_dir, Path(args.out) if args.out else None)}")
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from .data.inspect import inspect_dataset
    from .runlog import RunManifest

    report = inspect_dataset(args.data, masks=args.masks, prompts=args.prompts, axis=args.axis,
                             progress=not args.quiet)
    if args.out:
        with RunManifest(args.out, "inspect", _config_of(args)) as run:
            run.add(**report.summary())
            report.write(args.out)
    print(report.text())
    return EXIT_FAILURES if report.failures else EXIT_OK


def layers_arg(text: str) -> int | tuple[int, ...]:
    """``--layer``: ``7`` or ``1,2`` (several blocks, their maps averaged)."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a block index or indices such as 1,2, "
                                         f"got {text!r}") from None
    return values[0] if len(values) == 1 else values


def cmd_clip(args: argparse.Namespace) -> int:
    from .clip import ClipTrainConfig, train_clip
    from .runlog import RunManifest

    out = _require(args.out, "--out (the model folder)")
    with RunManifest(out, "clip train", _config_of(args), args.seed) as run:
        summary = train_clip(ClipTrainConfig(
            pairs=args.pairs, out=out, model=args.model, loss=args.loss, epochs=args.epochs,
            batch_size=args.batch_size, lr=args.lr, input_size=args.input_size,
            pretrained=args.pretrained, seed=args.seed, device=args.device, workers=args.workers,
            amp=args.amp, quiet=args.quiet, prompt_mix=args.prompt_mix, negatives=args.negatives,
            token_max_weight=args.token_max_weight, resume=not args.no_resume,
            time_limit=args.time_limit))
        run.add(final_loss=summary.final_loss, steps=summary.steps, seconds=summary.seconds,
                images_per_second=summary.images_per_second, parameters=summary.parameters)
    loss = "n/a" if summary.final_loss is None else f"{summary.final_loss:.4f}"
    print(f"trained {summary.model} ({summary.parameters / 1e6:.1f} M parameters) on "
          f"{summary.n_pairs} pairs for {summary.epochs} epochs in {summary.seconds:.0f} s "
          f"({summary.images_per_second:.1f} images/s), last loss {loss}")
    print(f"model folder: {out}  (use it with: mwm localize ... --model local-dir:{out})")
    return EXIT_OK


def cmd_localize(args: argparse.Namespace) -> int:
    from .data.layouts import attach_prompts, load_prompts, open_dataset, replace_masks
    from .files import write_json
    from .localize.m2ib import M2IBConfig, saliency_maps
    from .localize.postprocess import PostprocessConfig
    from .localize.run import localize_samples, model_identity
    from .localize.tune import pick_validation, tune
    from .localize.vlm import load_vlm
    from .runlog import RunManifest
    from .utils import resolve_device

    out = _require(args.out, "--out (the saliency map folder)")
    if not args.prompt and not args.prompts:
        raise DataError("give the prompt: --prompt TEXT (one for all images; 'a|b' is an "
                        "ensemble) or --prompts FILE (per image, JSON or CSV).")
    prompts = load_prompts(args.prompts) if args.prompts else None
    samples = attach_prompts(open_dataset(args.images).samples, prompts, args.prompt,
                             source=args.prompts or "--prompt")
    config = M2IBConfig(layer=args.layer, beta=args.beta, noise_scale=args.noise_scale,
                        steps=args.steps, samples=args.samples, lr=args.m2ib_lr, seed=args.seed,
                        batch_size=args.batch_size, amp=args.amp, shifts=args.shifts,
                        smooth=args.smooth)
    with RunManifest(out, "localize", _config_of(args), args.seed) as run:
        adapter = load_vlm(args.model, device=str(resolve_device(args.device)),
                           trust_remote_code=args.trust_remote_code)
        config.validate(adapter.depth)
        if args.tune:
            val_images, val_masks = args.tune
            val = attach_prompts(replace_masks(open_dataset(val_images).samples, val_masks),
                                 prompts, args.prompt, source=args.prompts or "--prompt")
            post = PostprocessConfig(method=args.method, threshold=args.threshold,
                                     top_k=args.top_k or None)
            config, rows = tune(pick_validation(val, args.tune_images, args.seed),
                                lambda im, pr, names, cfg: saliency_maps(adapter, im, pr, cfg, keys=names),
                                config, post, out, depth=adapter.depth, progress=not args.quiet)
            print(f"tuned on {rows[0]['n_images']} validation images: best beta {config.beta}, "
                  f"layer {config.layer}, noise-scale {config.noise_scale} "
                  f"(DSC {max(r['dice_mean'] for r in rows):.3f}); table in {out}/tune_table.csv")
        write_json(Path(out) / "m2ib_config.json", {"model": args.model, **config.to_dict()})
        summary = localize_samples(
            samples, out, lambda im, pr, names: saliency_maps(adapter, im, pr, config, keys=names),
            model_id=model_identity(args.model), params=config.to_dict(),
            batch_size=config.batch_size, progress=not args.quiet)
        run.add(**summary.to_dict(), m2ib=config.to_dict())
    print(f"{summary.n_written} saliency maps written, {summary.n_skipped} up to date (skipped), "
          f"into {out}")
    return _finish(summary.failures, "image")


def cmd_postprocess(args: argparse.Namespace) -> int:
    from .files import write_json
    from .localize.postprocess import PostprocessConfig, postprocess_folder
    from .runlog import RunManifest

    out = _require(args.out, "--out (the mask folder)")
    crf = None
    if args.crf:
        crf = {"iterations": args.crf_iterations, "anchor": args.crf_anchor}
    config = PostprocessConfig(method=args.method, threshold=args.threshold,
                               top_k=args.top_k or None, rank=args.rank, fill=not args.no_fill,
                               box_ratio=args.box_ratio, crf=crf)
    with RunManifest(out, "postprocess", _config_of(args)) as run:
        summary = postprocess_folder(args.saliency, out, config, images_dir=args.images,
                                     boxes_dir=args.boxes_out, progress=not args.quiet)
        write_json(Path(out) / "postprocess_config.json", config.to_dict())
        run.add(**{k: v for k, v in summary.items() if k != "config"})
    print(f"wrote {summary['n_written']} region masks to {out}"
          + (f" and boxes to {args.boxes_out}" if args.boxes_out else ""))
    return _finish(summary["failures"], "map")


def cmd_refine(args: argparse.Namespace) -> int:
    from .localize.refine import SamRefiner, refine_folder
    from .runlog import RunManifest
    from .utils import resolve_device

    out = _require(args.out, "--out (the refined mask folder)")
    with RunManifest(out, "refine", _config_of(args)) as run:
        refiner = SamRefiner.from_pretrained(args.model, device=str(resolve_device(args.device)))
        summary = refine_folder(args.images, args.masks, out, refiner, top_k=args.top_k or None,
                                progress=not args.quiet)
        run.add(**summary)
    print(f"refined {summary['n_written']} of {summary['n_masks']} masks into {out}")
    return _finish(summary["failures"], "mask")


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .pretrain.train import PretrainConfig, pretrain
    from .runlog import RunManifest

    out = _require(args.out, "--out (the run folder)")
    masking = args.masking
    cfg = PretrainConfig(
        images=args.images, out=out, regions=args.regions, model=args.model,
        input_size=args.input_size, decoder_width=args.decoder_width, masking=masking,
        ratio=args.ratio, ratio_salient=args.ratio_salient, ratio_background=args.ratio_background,
        emphasis=args.emphasis, occupancy=args.occupancy, empty_ratio=args.empty_ratio,
        epochs=args.epochs, batch_size=args.batch_size, accumulate=args.accumulate, lr=args.lr,
        base_lr=args.base_lr, warmup_epochs=args.warmup_epochs, optimizer=args.optimizer,
        wd=args.wd, wd_end=args.wd_end, clip=args.clip or None, amp=args.amp,
        channels_last=not args.no_channels_last, norm_pix_loss=not args.no_norm_pix_loss,
        sync_bn=args.sync_bn, seed=args.seed, workers=args.workers if args.workers is not None else 2,
        device=args.device, checkpoint_every=args.checkpoint_every, resume=args.resume,
        max_steps=args.max_steps, quiet=args.quiet)
    main_rank = int(os.environ.get("RANK", 0)) == 0
    manifest = RunManifest(out, "pretrain", cfg.to_dict(), args.seed) if main_rank else None
    with manifest or contextlib.nullcontext():
        summary = pretrain(cfg)
        if manifest:
            manifest.add(steps=summary.steps, epochs=summary.epochs_done, final_loss=summary.final_loss,
                         images_per_second=round(summary.images_per_second, 2),
                         encoder=summary.encoder_path, ranks_agree=summary.ranks_agree,
                         realized_mask_ratios=summary.realized)
    if main_rank:
        loss = "n/a" if summary.final_loss is None else f"{summary.final_loss:.4f}"
        print(f"pretrained {summary.steps} steps ({summary.epochs_done} epochs) in "
              f"{summary.seconds:.0f} s, {summary.images_per_second:.1f} images/s, last loss {loss}")
        if summary.realized:
            print("realized mask ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.realized.items()))
        print(f"checkpoint: {out}/checkpoint.pt  encoder: {summary.encoder_path}")
    if summary.ranks_agree is False:
        print("error: distributed ranks ended with different weights", file=sys.stderr)
        return EXIT_FAILURES
    return EXIT_OK


def cmd_finetune(args: argparse.Namespace) -> int:
    from .downstream.classify import FinetuneConfig, finetune
    from .runlog import RunManifest

    out = _require(args.out, "--out (the run folder)")
    cfg = FinetuneConfig(
        data=args.data, out=out, weights=args.weights, model=args.model, mode=args.mode,
        input_size=args.input_size, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        base_lr=args.base_lr, layer_decay=args.layer_decay, warmup_epochs=args.warmup_epochs,
        optimizer=args.optimizer, wd=args.wd, label_smoothing=args.label_smoothing,
        mixup=args.mixup, cutmix=args.cutmix, ema=args.ema, amp=args.amp, seed=args.seed,
        workers=args.workers if args.workers is not None else 2, device=args.device,
        eval_only=args.eval_only, resume=args.resume, quiet=args.quiet, max_steps=args.max_steps)
    main_rank = int(os.environ.get("RANK", 0)) == 0
    manifest = RunManifest(out, "finetune", _config_of(args), args.seed) if main_rank else None
    with manifest or contextlib.nullcontext():
        summary = finetune(cfg)
        if manifest:
            manifest.add(best=summary.get("best"), last=summary.get("last"),
                         eval_split=summary.get("eval_split"), ranks_agree=summary.get("ranks_agree"))
    if main_rank:
        result = summary.get("best") or summary.get("last") or summary.get("metrics") or {}
        metrics = result.get("metrics", result)
        shown = {k: metrics[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "auroc")
                 if isinstance(metrics.get(k), (int, float))}
        print(f"{cfg.mode} on {summary.get('eval_split', 'val')}: "
              + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
        print(f"outputs: {out}")
    if summary.get("ranks_agree") is False:
        print("error: distributed ranks ended with different weights or metrics", file=sys.stderr)
        return EXIT_FAILURES
    return EXIT_OK


def cmd_detect(args: argparse.Namespace) -> int:
    from .downstream.detect import DetectConfig, detect
    from .runlog import RunManifest

    out = _require(args.out, "--out (the run folder)")
    cfg = DetectConfig(data=args.data, out=out, weights=args.weights, model=args.model,
                       input_size=args.input_size, epochs=args.epochs, batch_size=args.batch_size,
                       lr=args.lr, base_lr=args.base_lr, stage_lr_decay=args.stage_lr_decay,
                       multiscale=tuple(args.multiscale) if args.multiscale else None,
                       norm=args.norm, amp=args.amp, seed=args.seed,
                       workers=args.workers or 0, device=args.device, resume=args.resume,
                       max_steps=args.max_steps, quiet=args.quiet,
                       roi_batch_size=args.roi_batch_size, eval_every=args.eval_every)
    with RunManifest(out, "detect", _config_of(args), args.seed) as run:
        summary = detect(cfg)
        run.add(metrics=summary.get("metrics"), step=summary.get("step"), best=summary.get("best"))
    metrics = summary.get("metrics") or {}
    print("  ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.endswith(("/AP", "/AP50"))))
    print(f"metrics, predictions and figures: {out}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from .downstream.convert import export_weights

    out = _require(args.out, "--out (the output file)")
    info = export_weights(args.encoder, out, fmt=args.format, arch=args.model)
    print(f"wrote {info['tensors']} {info['arch']} tensors in {args.format} key names to {out}")
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .localize.evaluate import evaluate_folders
    from .runlog import RunManifest

    out = args.out or str(Path(args.pred).parent / f"{Path(args.pred).name}_eval")
    with RunManifest(out, "evaluate", _config_of(args)) as run:
        summary = evaluate_folders(args.pred, args.gt, out, tolerance_px=args.tolerance,
                                   progress=not args.quiet)
        run.add(n_gt=summary["n_gt"], n_missing=summary["n_missing"],
                metrics=summary["metrics"])
    print(f"{summary['n_gt']} ground-truth masks, {summary['n_missing']} without prediction "
          f"(scored as empty), {summary['n_failed']} failed")
    for name, stats in summary["metrics"].items():
        if stats["mean"] is not None:
            print(f"  {name:14s} {stats['mean']:.4f} ± {stats['std']:.4f}")
    print(f"per-image table and summary: {out}")
    return _finish(summary["failures"], "image")


# --------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mwm", description="Mask What Matters: text-guided masked image modeling for "
        "medical imaging. Run `mwm demo` for the whole pipeline on synthetic data.")
    parser.add_argument("--version", action="version", version=f"mwm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    from .data.phantoms import MODALITIES

    p = _add(sub, "phantoms", cmd_phantoms, "write a synthetic labelled dataset (images, lesion "
             "masks, labels, captions, prompts, COCO instances, splits)")
    add_out(p, positional=True)
    p.add_argument("--modality", choices=MODALITIES, default="brain-mri")
    p.add_argument("--n", type=int, default=200, help="number of images (default: 200)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default: 128)")
    p.add_argument("--bit-depth", type=int, choices=(8, 16), default=8, help="PNG bit depth")
    p.add_argument("--class-folders", action="store_true",
                   help="also write classes/<split>/<class>/ links for class-folder tools")
    add_common(p, workers=True)

    p = _add(sub, "demo", cmd_demo, "run the pipeline on synthetic phantoms, offline: "
             "phantoms, CLIP, localization, random vs region-aware pretraining, probes, report")
    add_out(p, default="mwm-demo")
    p.add_argument("--quick", action="store_true",
                   help="a smaller run (under a minute on 2 idle CPU cores; default: about 4)")
    p.add_argument("--modality", choices=MODALITIES, default="brain-mri")
    p.add_argument("--n", type=int, help="number of phantom images (default: 400; quick: 64)")
    p.add_argument("--size", type=int, help="image side in pixels (default: 128; quick: 96)")
    p.add_argument("--clip-seconds", type=float,
                   help="time budget of the CLIP training (default: 180 s; quick: 30 s)")
    p.add_argument("--clip-epochs", type=int, help="CLIP epochs at most (default: 12; quick: 3)")
    p.add_argument("--pretrain-epochs", type=int,
                   help="pretraining epochs per strategy (default: 8; quick: 2)")
    p.add_argument("--probe-epochs", type=int, help="linear-probe epochs (default: 20; quick: 10)")
    add_common(p, workers=True)

    p = _add(sub, "inspect", cmd_inspect, "check a dataset: read every image (and mask and "
             "prompt), report sizes, value ranges and every problem with its file")
    p.add_argument("data", help="image folder, class-folder root (train/<class>/...), CSV "
                   "manifest, or a single image file")
    p.add_argument("--masks", help="mask folder paired with DATA by file stem")
    p.add_argument("--prompts", help="per-image prompts (JSON or CSV) to check for coverage")
    p.add_argument("--axis", type=int, choices=(0, 1, 2), default=2,
                   help="NIfTI slicing axis (default: 2, axial for RAS volumes)")
    add_out(p)
    add_common(p, seed=False)

    from .localize.hub import DEFAULT_SAM, DEFAULT_VLM

    p = _add(sub, "localize", cmd_localize, "saliency maps of what a text prompt names, from "
             "a vision-language model with the M2IB information bottleneck")
    p.add_argument("images", help="image folder, phantom folder or CSV manifest")
    p.add_argument("--prompt", help="one prompt for every image; 'a|b' averages an ensemble")
    p.add_argument("--prompts", metavar="FILE", help="per-image prompts (JSON or CSV); "
                   "--prompt then covers images the file lacks")
    add_out(p)
    p.add_argument("--model", default=DEFAULT_VLM,
                   help="open_clip hf-hub:ORG/REPO, NAME:TAG, local-dir:PATH or a folder "
                   "(e.g. from `mwm clip train`), or a transformers CLIP id (default: BiomedCLIP)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a transformers model's own code to run (off by default)")
    p.add_argument("--layer", type=layers_arg, default=7, help="vision block (0-based) whose "
                   "output passes the bottleneck (default 7), or blocks such as 1,2: one map "
                   "per block, averaged")
    p.add_argument("--beta", type=float, default=1.0, help="weight of the information term")
    p.add_argument("--noise-scale", type=float, default=1.0, help="std of the noise and prior")
    p.add_argument("--steps", type=int, default=10, help="Adam steps per image")
    p.add_argument("--samples", type=int, default=10, help="noise draws per step")
    p.add_argument("--m2ib-lr", type=float, default=1.0, help="Adam learning rate on alpha")
    p.add_argument("--shifts", type=int, default=1, help="average the maps of N x N sub-patch "
                   "shifts of the input: finer, less noisy maps for N^2 the time (default 1 = off)")
    p.add_argument("--smooth", type=float, default=0.0, help="Gaussian blur of the map, std in "
                   "patches, before it is mapped back to the image (default 0 = off)")
    p.add_argument("--batch-size", type=int, default=8, help="images optimized together")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (faster on CPU and GPU)")
    p.add_argument("--tune", nargs=2, metavar=("VAL_IMAGES", "VAL_MASKS"),
                   help="grid-search beta x layer x noise-scale on validation masks first, "
                   "scored by DSC after the postprocessing below; the run uses the best")
    p.add_argument("--tune-images", type=int, default=20, help="validation images for --tune")
    p.add_argument("--method", choices=("threshold", "otsu", "kmeans"), default="kmeans",
                   help="postprocessing used to score --tune (use the same in `mwm postprocess`)")
    p.add_argument("--threshold", type=float, default=0.3)
    p.add_argument("--top-k", type=int, default=0)
    add_common(p, device=True)

    p = _add(sub, "clip", cmd_clip, "contrastive image-text training (`mwm clip train PAIRS`): "
             "a small CLIP from scratch or a fine-tuned one, for localization")
    p.add_argument("action", choices=("train",), help="train")
    p.add_argument("pairs", help="CSV with image,caption columns, or a phantom folder "
                   "(its captions.csv, train split)")
    add_out(p)
    p.add_argument("--model", default="scratch-tiny", help="scratch-tiny, scratch-small, an "
                   "open_clip name with --pretrained TAG, hf-hub:ORG/REPO, or a model folder")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag to fine-tune")
    p.add_argument("--loss", choices=("infonce", "dhn-nce"), default="infonce")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default per model)")
    p.add_argument("--input-size", type=int, default=None, help="pixels (default per model)")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), default="auto")
    p.add_argument("--prompt-mix", type=float, default=0.2, help="fraction of lesion images "
                   "whose caption is replaced by the short prompt (phantoms; default 0.2, so the "
                   "model learns the words a prompt uses)")
    p.add_argument("--negatives", choices=("normal", "label", "caption"), default="normal",
                   help="pairs that are not negatives besides identical captions: 'normal' "
                   "(lesion-free images among themselves; default), 'label' (same class), "
                   "'caption' (only identical captions)")
    p.add_argument("--token-max-weight", type=float, default=None, metavar="W",
                   help="add W x the contrastive loss of the per-channel maximum over patch "
                   "tokens, which keeps a small lesion's evidence on its own tokens for M2IB "
                   "(default: 1 for scratch models, 0 when fine-tuning)")
    p.add_argument("--time-limit", type=float, default=None, help="stop after this many "
                   "seconds (at an epoch end; a re-run continues)")
    p.add_argument("--no-resume", action="store_true", help="refuse to continue an existing run")
    add_common(p, workers=True, device=True)

    p = _add(sub, "postprocess", cmd_postprocess, "turn saliency maps into region masks "
             "(threshold / Otsu / k-means or dense CRF, top-k components, holes, boxes)")
    p.add_argument("saliency", help="folder of saliency maps (PNG, as `mwm localize` writes)")
    add_out(p)
    p.add_argument("--method", choices=("threshold", "otsu", "kmeans"), default="kmeans",
                   help="binarization (default: kmeans, 2 clusters on the map values)")
    p.add_argument("--threshold", type=float, default=0.3,
                   help="for --method threshold: foreground where saliency > T (default 0.3)")
    p.add_argument("--top-k", type=int, default=0,
                   help="keep the K largest connected components (default 0 = all)")
    p.add_argument("--rank", choices=("area", "mass"), default="area",
                   help="how --top-k ranks components: pixel count (default) or saliency mass")
    p.add_argument("--no-fill", action="store_true", help="do not fill holes")
    p.add_argument("--box-ratio", type=float, default=None,
                   help="replace each component by its box scaled by R about its centre")
    p.add_argument("--boxes-out", metavar="DIR", help="also write the (scaled) boxes here")
    p.add_argument("--crf", action="store_true",
                   help="dense CRF guided by the image instead of binarization (needs --images)")
    p.add_argument("--crf-iterations", type=int, default=5, help="mean-field iterations")
    p.add_argument("--crf-anchor", choices=("map", "binarization"), default="map",
                   help="the CRF's decision point: the map's 0.5 (default, as published) or the "
                   "--method cut, so the CRF moves the binarized region onto image edges")
    p.add_argument("--images", metavar="DIR", help="the images the maps were made from (CRF)")
    add_common(p, seed=False)

    p = _add(sub, "refine", cmd_refine, "refine coarse region masks with SAM box prompts "
             "(one box per component)")
    p.add_argument("images", help="image folder")
    p.add_argument("masks", help="coarse mask folder (paired with the images by file stem)")
    add_out(p)
    p.add_argument("--model", default=DEFAULT_SAM,
                   help="transformers SamModel checkpoint: hub id (SAM, MedSAM e.g. "
                   "wanglab/medsam-vit-base) or local folder (default: facebook/sam-vit-base)")
    p.add_argument("--top-k", type=int, default=0,
                   help="components to keep (default 0 = as many as the coarse mask has)")
    add_common(p, seed=False, device=True)

    p = _add(sub, "pretrain", cmd_pretrain, "SparK-style sparse masked pretraining of a timm "
             "CNN, masking the text-localized region heavily and the background lightly")
    p.add_argument("images", help="image folder, phantom folder or CSV manifest (train split used)")
    p.add_argument("--regions", metavar="DIR", help="region masks paired with the images by stem "
                   "(from `mwm postprocess`); without it masking is random")
    add_out(p)
    p.add_argument("--model", default="resnet50", help="timm encoder (ResNet or ConvNeXt family, "
                   "e.g. resnet18, resnet50, convnext_tiny; default resnet50)")
    p.add_argument("--input-size", type=int, default=224, help="pixels, a multiple of 32")
    p.add_argument("--decoder-width", type=int, default=None, help="decoder channels at the "
                   "smallest scale (default: per encoder family)")
    p.add_argument("--masking", default=None,
                   help="random; region (ratio-salient inside, ratio-background outside); budget "
                   "(exact --ratio overall, salient cells --emphasis times as likely); soft "
                   "(budget weighted by continuous saliency maps given as --regions). "
                   "Default: region with --regions, else random")
    p.add_argument("--ratio", type=float, default=0.6, help="overall ratio (random, budget, soft)")
    p.add_argument("--ratio-salient", type=float, default=0.8, help="mask ratio inside the region")
    p.add_argument("--ratio-background", type=float, default=0.4, help="mask ratio outside it")
    p.add_argument("--emphasis", type=float, default=3.0, help="budget/soft: salient weight")
    p.add_argument("--occupancy", type=float, default=0.5,
                   help="fraction of a cell the region must cover to make it salient")
    p.add_argument("--empty-ratio", type=float, default=None,
                   help="ratio for images with an empty region (default: --ratio-background)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--accumulate", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate, used as given (default: base-lr x global batch / 256)")
    p.add_argument("--base-lr", type=float, default=2e-4)
    p.add_argument("--warmup-epochs", type=float, default=5.0)
    p.add_argument("--optimizer", choices=("lamb", "adamw"), default="lamb")
    p.add_argument("--wd", type=float, default=0.04, help="weight decay at the start")
    p.add_argument("--wd-end", type=float, default=0.2, help="weight decay at the end (cosine)")
    p.add_argument("--clip", type=float, default=5.0, help="gradient norm clip (0 = off)")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), default="auto",
                   help="mixed precision (auto = bf16 where the device has native bf16, else "
                   "fp32; fp16 with a grad scaler needs a GPU)")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--no-norm-pix-loss", action="store_true", help="unnormalized pixel targets")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under torchrun")
    p.add_argument("--checkpoint-every", type=int, default=200, help="optimizer steps")
    add_resume(p)
    add_common(p, workers=True, device=True)

    p = _add(sub, "finetune", cmd_finetune, "fine-tune or linear-probe a classifier from a "
             "pretrained encoder (or from scratch) on labelled images")
    p.add_argument("data", help="class folders (train/val/test/<class>/), CSV manifest with "
                   "label and split columns, or a phantom folder")
    add_out(p)
    p.add_argument("--weights", help="MWM encoder.safetensors, pretrain checkpoint.pt or run "
                   "folder, a timm checkpoint; none = from scratch")
    p.add_argument("--model", default=None, help="timm architecture (default: from the weights, "
                   "else resnet50)")
    p.add_argument("--mode", choices=("finetune", "linear"), default="finetune")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=None, help="peak lr, used as given "
                   "(default: base-lr x batch / 256)")
    p.add_argument("--base-lr", type=float, default=1e-3)
    p.add_argument("--layer-decay", type=float, default=0.7, help="layer-wise lr decay")
    p.add_argument("--warmup-epochs", type=float, default=5.0)
    p.add_argument("--optimizer", choices=("adamw", "lamb"), default="adamw")
    p.add_argument("--wd", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--mixup", type=float, default=0.0)
    p.add_argument("--cutmix", type=float, default=0.0)
    p.add_argument("--ema", type=float, default=None, help="EMA decay, e.g. 0.999")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), default="auto",
                   help="mixed precision (auto = bf16 where the device has native bf16, else "
                   "fp32; fp16 with a grad scaler needs a GPU)")
    p.add_argument("--eval-only", action="store_true", help="evaluate a fine-tuned checkpoint")
    add_resume(p)
    add_common(p, workers=True, device=True)

    p = _add(sub, "detect", cmd_detect, "fine-tune Mask R-CNN (torchvision, ResNet-FPN) from a "
             "pretrained encoder; COCO box and mask AP")
    p.add_argument("data", help="folder with images/ and instances_train.json, "
                   "instances_val.json (a phantom folder)")
    add_out(p)
    p.add_argument("--weights", help="MWM encoder.safetensors, pretrain checkpoint or timm .pth")
    p.add_argument("--model", default=None, help="ResNet architecture (default: from the weights)")
    p.add_argument("--input-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=None, help="used as given (default: "
                   "base-lr x batch / 2)")
    p.add_argument("--base-lr", type=float, default=2.5e-4)
    p.add_argument("--stage-lr-decay", type=float, default=0.6)
    p.add_argument("--multiscale", type=int, nargs="+", help="train sizes to pick from")
    p.add_argument("--norm", choices=("frozen", "bn"), default="frozen")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), default="none",
                   help="mixed precision of training (auto = bf16 where the device has native "
                   "bf16, else fp32; fp16 needs a GPU); evaluation always runs in fp32")
    p.add_argument("--roi-batch-size", type=int, default=512, help="RoIs sampled per image")
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs and keep "
                   "best.pt by segm AP (0: only at the end)")
    add_resume(p)
    add_common(p, workers=True, device=True)

    p = _add(sub, "export", cmd_export, "convert a pretrained encoder to timm, torchvision or "
             "Detectron2 key names")
    p.add_argument("encoder", help="MWM encoder.safetensors, pretrain checkpoint/run folder, "
                   "or timm .pth")
    add_out(p)
    p.add_argument("--format", choices=("timm", "torchvision", "detectron2"), default="timm")
    p.add_argument("--model", default=None, help="architecture (default: from the file)")
    add_common(p, seed=False)

    p = _add(sub, "evaluate", cmd_evaluate, "score predicted region masks against ground "
             "truth (DSC, NSD, coverage, recall, box coverage/recall)")
    p.add_argument("pred", help="folder of predicted masks")
    p.add_argument("gt", help="folder of ground-truth masks (every one is scored)")
    add_out(p)
    p.add_argument("--tolerance", type=float, default=2.0,
                   help="NSD tolerance in pixels (default 2)")
    add_common(p, seed=False)

    p = _add(sub, "experiment", cmd_experiment, "compare masking strategies: a grid of "
             "strategies x seeds, each pretrained and evaluated the same way (resumable)")
    p.add_argument("experiment", metavar="EXPERIMENT.yaml",
                   help="experiment file (see configs/ and docs/experiment.md)")
    add_out(p, default=None)
    p.add_argument("--shard", metavar="K/N", help="run every N-th cell starting at K (one "
                   "process per GPU; automatic under torchrun)")
    p.add_argument("--no-report", action="store_true", help="do not write report.html")
    add_common(p, seed=False, workers=True, device=True)

    p = _add(sub, "report", cmd_report, "write a self-contained HTML report of a demo or "
             "experiment folder (figures embedded, opens offline)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="folder written by `mwm demo` or "
                   "`mwm experiment`")
    p.add_argument("--out", metavar="FILE.html", help="report path (default: RUN_DIR/report.html)")
    add_common(p, seed=False)
    return parser


def _add(sub, name: str, func: Callable[[argparse.Namespace], int], help_text: str):
    p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
    p.set_defaults(func=func)
    return p


# --------------------------------------------------------------------------- running

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; a ``--config`` file supplies defaults that flags override."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        subparser = _subparser(parser, args.command)
        subparser.set_defaults(**config_defaults(subparser, args.config))
        args = parser.parse_args(argv)
    return args


def config_defaults(parser: argparse.ArgumentParser, path: str | Path) -> dict:
    """Values from ``path`` checked against the options ``parser`` knows."""
    from .config import load_yaml

    values = load_yaml(path)
    known = {action.dest: action for action in parser._actions
             if action.dest not in ("help", "config", "version", argparse.SUPPRESS)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        valid = ", ".join(sorted(k.replace("_", "-") for k in known))
        raise DataError(f"{path}: unknown option(s) {', '.join(unknown)} for this command. "
                        f"Valid keys: {valid}.")
    for key, value in values.items():
        action = known[key]
        if action.choices is not None and value not in action.choices:
            raise DataError(f"{path}: {key} = {value!r} is not one of {list(action.choices)}.")
        if action.type is not None and value is not None and not isinstance(value, list):
            try:
                values[key] = action.type(value)
            except (TypeError, ValueError) as err:
                raise DataError(f"{path}: {key} = {value!r}: {err}") from err
    return values


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise KeyError(name)


def _config_of(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k != "func"}


def _finish(failures: list[dict], unit: str) -> int:
    """Summarize per-item failures of a batch job; non-zero exit if there were any."""
    if not failures:
        return EXIT_OK
    print(f"{len(failures)} {unit}(s) failed:", file=sys.stderr)
    for failure in failures[:20]:
        print(f"  {failure.get('file') or failure.get('name')}: {failure.get('reason') or failure.get('error')}",
              file=sys.stderr)
    if len(failures) > 20:
        print(f"  ... and {len(failures) - 20} more (see the output folder)", file=sys.stderr)
    return EXIT_FAILURES


def _require(value, what: str):
    if value in (None, ""):
        raise DataError(f"missing {what}: give it on the command line or in --config.")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except DataError as err:
        print(f"mwm: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.command is None:
        build_parser().print_help()
        return EXIT_USAGE
    try:
        if args.command not in ("report", "export", "inspect"):
            from .runtime import configure_process

            configure_process()
        return args.func(args)
    except DataError as err:
        print(f"mwm {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"mwm {args.command}: interrupted; outputs written so far are complete and a "
              "re-run resumes.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
