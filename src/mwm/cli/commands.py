"""The commands: for each, its config class, the library call, and what it prints.

A command function receives its config (built from the flags by :mod:`mwm.cli.flags`)
and the options every command takes (:class:`mwm.runtime.RunOptions`), applies the
output-folder rule (:func:`mwm.runlog.claim_folder`), writes ``run_manifest.json`` around
the library call, prints a summary and returns the exit status. Config classes are named
by import path, so that ``mwm --help`` imports none of the heavy modules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import DataError
from ..runlog import (RunManifest, check_out_file, claim_folder, holds_only_shards,
                      refuse_finished_run)

EXIT_OK, EXIT_FAILURES, EXIT_USAGE = 0, 1, 2


@dataclass(frozen=True)
class Command:
    name: str                       # "clip train": a group and its action
    help: str
    config_path: str                # "module:Class"
    run: Callable[[Any, Any], int]  # (config, RunOptions) -> exit status

    def config_class(self) -> type:
        module, _, name = self.config_path.partition(":")
        return getattr(importlib.import_module(module), name)


def settings(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def finish(failures: list[dict], unit: str) -> int:
    """Summarize per-item failures of a batch job; non-zero exit if there were any."""
    if not failures:
        return EXIT_OK
    print(f"{len(failures)} {unit}(s) failed:", file=sys.stderr)
    for failure in failures[:20]:
        print(f"  {failure.get('file') or failure.get('name')}: "
              f"{failure.get('reason') or failure.get('error')}", file=sys.stderr)
    if len(failures) > 20:
        print(f"  ... and {len(failures) - 20} more (see the output folder)", file=sys.stderr)
    return EXIT_FAILURES


def changed_settings(previous: dict | None, mine: dict, keys: tuple[str, ...]) -> str:
    """``key: old → new, ...`` for the ``keys`` that differ from an earlier run's config."""
    saved = (previous or {}).get("config") or {}
    return ", ".join(f"{k}: {saved.get(k)!r} → {mine.get(k)!r}" for k in keys
                     if k in saved and saved.get(k) != mine.get(k))


def main_rank() -> bool:
    from ..engine import torchrun_env

    return torchrun_env().main


# --------------------------------------------------------------------------- data

#: What makes a phantom set: a folder of phantoms is rewritten only with the same values.
PHANTOM_SETTINGS = ("modality", "n", "size", "seed", "bit_depth", "class_folders", "findings")


def run_phantoms(cfg, opts) -> int:
    from ..data.phantoms import generate_phantoms
    from ..report.contact_sheet import write_phantom_sheet

    previous = claim_folder(cfg.out, "phantoms", overwrite=opts.overwrite)
    changes = changed_settings(previous, settings(cfg), PHANTOM_SETTINGS)
    if changes and not opts.overwrite:
        raise DataError(f"--out {cfg.out} holds phantoms made with other settings ({changes}); "
                        "their files would mix with the new ones. Choose another folder, or "
                        "pass --overwrite.")
    with RunManifest(cfg.out, "phantoms", settings(cfg), cfg.seed) as run:
        summary = generate_phantoms(cfg.out, modality=cfg.modality, n=cfg.n, size=cfg.size,
                                    seed=cfg.seed, bit_depth=cfg.bit_depth, workers=cfg.workers,
                                    class_folders=cfg.class_folders, findings=cfg.findings,
                                    progress=not cfg.quiet)
        run.add(class_counts=summary.class_counts, split_counts=summary.split_counts,
                seconds=summary.seconds)
        write_phantom_sheet(cfg.out, cfg.modality)
    rate = summary.n / max(summary.seconds, 1e-9)
    print(f"wrote {summary.n} {summary.modality} phantoms ({summary.size}x{summary.size}) to "
          f"{cfg.out} in {summary.seconds:.1f} s ({rate:.0f} images/s)")
    print("classes: " + ", ".join(f"{k} {v}" for k, v in summary.class_counts.items()))
    print("splits:  " + ", ".join(f"{k} {v}" for k, v in summary.split_counts.items()))
    return EXIT_OK


def run_inspect(cfg, opts) -> int:
    from ..data.inspect import inspect_dataset

    if cfg.out:
        claim_folder(cfg.out, "inspect", overwrite=opts.overwrite)
    report = inspect_dataset(cfg.data, masks=cfg.masks, prompts=cfg.prompts, axis=cfg.axis,
                             progress=not cfg.quiet)
    if cfg.out:
        with RunManifest(cfg.out, "inspect", settings(cfg)) as run:
            run.add(**report.summary())
            report.write(cfg.out)
    print(report.text())
    return EXIT_FAILURES if report.failures else EXIT_OK


# --------------------------------------------------------------------------- localization

def run_clip_train(cfg, opts) -> int:
    from ..clip import train_clip

    claim_folder(cfg.out, "clip train", overwrite=opts.overwrite)  # then: its --resume rule
    with RunManifest(cfg.out, "clip train", settings(cfg), cfg.seed) as run:
        summary = train_clip(cfg)
        run.add(final_loss=summary.final_loss, steps=summary.steps, seconds=summary.seconds,
                images_per_second=summary.images_per_second, parameters=summary.parameters)
    loss = "n/a" if summary.final_loss is None else f"{summary.final_loss:.4f}"
    print(f"trained {summary.model} ({summary.parameters / 1e6:.1f} M parameters) on "
          f"{summary.n_pairs} pairs for {summary.epochs} epochs in {summary.seconds:.0f} s "
          f"({summary.images_per_second:.1f} images/s), last loss {loss}")
    print(f"model folder: {cfg.out}  (use it with: mwm localize ... --model local-dir:{cfg.out})")
    return EXIT_OK


def run_localize(cfg, opts) -> int:
    from ..data.layouts import attach_prompts, load_prompts, open_dataset, replace_masks
    from ..engine import torchrun_env
    from ..localize.pipeline import TuneSpec, localize
    from ..localize.postprocess import PostprocessConfig

    claim_folder(cfg.out, "localize", overwrite=opts.overwrite)  # then: maps' fingerprints
    prompts = load_prompts(cfg.prompts) if cfg.prompts else None
    source = cfg.prompts or "--prompt"
    dataset = open_dataset(cfg.images, lenient=True)  # unreadable files: listed failures
    samples = attach_prompts(dataset.usable(), prompts, cfg.prompt, source=source)
    tune = None
    if cfg.tune:
        val_images, val_masks = cfg.tune
        val = attach_prompts(replace_masks(open_dataset(val_images).samples, val_masks),
                             prompts, cfg.prompt, source=source)
        post = PostprocessConfig(method=cfg.method, threshold=cfg.threshold, top_k=cfg.top_k)
        tune = TuneSpec(val, post, cfg.tune_images, cfg.m2ib.seed, published=cfg.published)
    contrast = cfg.contrast_rule()
    presence = cfg.presence_spec(samples, tune, contrast)
    dist = torchrun_env()
    manifest = _on_main_rank(cfg.out, "localize", cfg, cfg.m2ib.seed)
    if isinstance(manifest, RunManifest):  # listed from the start: postprocess reads these maps and no stray file
        manifest.add(outputs=cfg.outputs(samples))
    with manifest as run:
        summary = localize(samples, cfg.out, model=cfg.model, m2ib=cfg.m2ib, tune=tune,
                           contrast=contrast, presence=presence,
                           device=cfg.device, trust_remote_code=cfg.trust_remote_code,
                           shard_of=(dist.rank, dist.world), progress=not cfg.quiet)
        if run:
            run.add(**summary.to_dict(), m2ib=summary.m2ib, contrast=summary.contrast,
                    presence=summary.presence)
    if summary.tune_rows:
        m2ib, rows = summary.m2ib, summary.tune_rows
        print(f"tuned on {rows[0]['n_images']} validation images: best beta {m2ib['beta']}, "
              f"layer {m2ib['layer']}, noise-scale {m2ib['noise_scale']}, "
              f"standardize {'on' if m2ib['standardize'] else 'off'} "
              f"(DSC {max(r['dice_mean'] for r in rows):.3f}); table in {cfg.out}/tune_table.csv")
    print(f"{summary.n_written} saliency maps written, {summary.n_skipped} up to date (skipped), "
          f"into {cfg.out}")
    if summary.presence:
        found = summary.presence
        print(f"presence: {found['n_absent']} of {found['n_images']} images found absent "
              f"(score < {found['threshold']:.4f}, from {found['source']}); {cfg.out}/presence.csv")
    return finish(dataset.problems + summary.failures, "image")


def run_postprocess(cfg, opts) -> int:
    from ..files import write_json
    from ..localize.postprocess import postprocess_folder

    claim_folder(cfg.out, "postprocess", overwrite=opts.overwrite)
    config = cfg.postprocess_config()
    with RunManifest(cfg.out, "postprocess", settings(cfg)) as run:
        summary = postprocess_folder(cfg.saliency, cfg.out, config, images_dir=cfg.images,
                                     boxes_dir=cfg.boxes_out, progress=not cfg.quiet)
        write_json(Path(cfg.out) / "postprocess_config.json", config.to_dict())
        run.add(**{k: v for k, v in summary.items() if k != "config"})
    print(f"wrote {summary['n_written']} region masks to {cfg.out}"
          + (f" and boxes to {cfg.boxes_out}" if cfg.boxes_out else ""))
    if summary["presence"]:
        print(f"{summary['n_absent']} of them empty: the finding was found absent "
              f"({summary['presence']})")
    if summary["ignored"]:
        print(f"ignored {len(summary['ignored'])} file(s) in {cfg.saliency} that `mwm localize` "
              f"did not list as its maps: {', '.join(summary['ignored'][:5])}", file=sys.stderr)
    return finish(summary["failures"], "map")


def run_refine(cfg, opts) -> int:
    from ..localize.refine import SamRefiner, refine_folder
    from ..utils import resolve_device

    claim_folder(cfg.out, "refine", overwrite=opts.overwrite)
    with RunManifest(cfg.out, "refine", settings(cfg)) as run:
        refiner = SamRefiner.from_pretrained(cfg.model, device=str(resolve_device(cfg.device)))
        summary = refine_folder(cfg.images, cfg.masks, cfg.out, refiner, top_k=cfg.top_k or None,
                                progress=not cfg.quiet)
        run.add(**summary)
    print(f"refined {summary['n_written']} of {summary['n_masks']} masks into {cfg.out}")
    return finish(summary["failures"], "mask")


def run_evaluate(cfg, opts) -> int:
    from ..localize.evaluate import evaluate_folders

    out = cfg.out or str(Path(cfg.pred).parent / f"{Path(cfg.pred).name}_eval")
    claim_folder(out, "evaluate", overwrite=opts.overwrite)
    with RunManifest(out, "evaluate", settings(cfg)) as run:
        summary = evaluate_folders(cfg.pred, cfg.gt, out, tolerance_px=cfg.tolerance,
                                   presence=cfg.presence, progress=not cfg.quiet)
        run.add(n_gt=summary["n_gt"], n_missing=summary["n_missing"], metrics=summary["metrics"],
                empty_regions=summary["empty_regions"], presence=summary["presence"])
    print(f"{summary['n_gt']} ground-truth masks, {summary['n_missing']} without prediction "
          f"(scored as empty), {summary['n_failed']} failed")
    for name, stats in summary["metrics"].items():
        if stats["mean"] is not None:
            print(f"  {name:14s} {stats['mean']:.4f} ± {stats['std']:.4f}")
    empty, found = summary["empty_regions"], summary["presence"]
    if empty["n_empty_gt"]:
        print(f"  empty ground truth: {empty['n_empty_prediction']} of {empty['n_empty_gt']} "
              f"got an empty region ({empty['fraction']:.4f})")
    if found:
        shown = {k: "n/a" if found[k] is None else f"{found[k]:.4f}"
                 for k in ("precision", "recall", "auroc")}
        print(f"  presence ({found['n']} images): precision {shown['precision']}, recall "
              f"{shown['recall']}, AUROC {shown['auroc']}")
    print(f"per-image table and summary: {out}")
    return finish(summary["failures"], "image")


# --------------------------------------------------------------------------- training

def _on_main_rank(out: str, command: str, cfg, seed: int | None = None):
    """The run manifest, written by rank 0 only under torchrun (others get a null context)."""
    if main_rank():
        return RunManifest(out, command, settings(cfg),
                           getattr(cfg, "seed", None) if seed is None else seed)
    return contextlib.nullcontext()


def claim_training_folder(cfg, opts, command: str, checkpoint: str, resume) -> None:
    """The output rule for a training command: its own folder is continued only with
    --resume (or restarted with --overwrite)."""
    claim_folder(cfg.out, command, overwrite=opts.overwrite)
    refuse_finished_run(cfg.out, command, checkpoint, resume, opts.overwrite)


def run_pretrain(cfg, opts) -> int:
    from ..pretrain.train import CHECKPOINT_NAME, pretrain

    claim_training_folder(cfg, opts, "pretrain", CHECKPOINT_NAME, cfg.resume)
    with _on_main_rank(cfg.out, "pretrain", cfg) as manifest:
        summary = pretrain(cfg)
        if manifest:
            manifest.add(steps=summary.steps, epochs=summary.epochs_done,
                         final_loss=summary.final_loss,
                         images_per_second=round(summary.images_per_second, 2),
                         encoder=summary.encoder_path, ranks_agree=summary.ranks_agree,
                         realized_mask_ratios=summary.realized,
                         empty_regions=summary.empty_regions)
    if main_rank():
        loss = "n/a" if summary.final_loss is None else f"{summary.final_loss:.4f}"
        print(f"pretrained {summary.steps} steps ({summary.epochs_done} epochs) in "
              f"{summary.seconds:.0f} s, {summary.images_per_second:.1f} images/s, "
              f"last loss {loss}")
        if summary.realized:
            print("realized mask ratios, run averages: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in summary.realized.items()))
        if summary.empty_regions is not None:
            empty = summary.empty_regions
            print(f"empty regions: {empty['n_empty']} of {empty['n_images']} training images "
                  f"({empty['fraction']:.1%})" + (f", listed in {empty['file']}"
                                                   if empty["n_empty"] else ""))
        print(f"checkpoint: {cfg.out}/checkpoint.pt  encoder: {summary.encoder_path}")
    return _ranks_exit(summary.ranks_agree, "weights")


def run_finetune(cfg, opts) -> int:
    from ..downstream.classify import REPORTED, finetune
    from ..downstream.weights import LAST

    claim_training_folder(cfg, opts, "finetune", LAST, cfg.resume or cfg.eval_only)
    with _on_main_rank(cfg.out, "finetune", cfg) as manifest:
        summary = finetune(cfg)
        if manifest:
            manifest.add(best=summary.get("best"), last=summary.get("last"),
                         eval_split=summary.get("eval_split"),
                         ranks_agree=summary.get("ranks_agree"))
    if main_rank():
        result = summary.get("best") or summary.get("last") or summary.get("metrics") or {}
        metrics = result.get("metrics", result)
        print(f"{cfg.mode} on {summary.get('eval_split', 'val')}: "
              + _metrics_text(metrics, REPORTED))
        print(f"outputs: {cfg.out}")
    return _ranks_exit(summary.get("ranks_agree"))


def _metrics_text(metrics: dict, keys) -> str:
    """``k v, ...`` of the numeric ``keys`` of ``metrics`` (missing or None left out)."""
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in keys
                     if isinstance(metrics.get(k), (int, float)))


def _ranks_exit(ranks_agree: bool | None, what: str = "weights or metrics") -> int:
    """EXIT_FAILURES (with the message) when torchrun's ranks ended differently."""
    if ranks_agree is False:
        print(f"error: distributed ranks ended with different {what}", file=sys.stderr)
        return EXIT_FAILURES
    return EXIT_OK


def run_segment(cfg, opts) -> int:
    from ..downstream.segment import REPORTED, refuse_training_out, segment
    from ..downstream.weights import LAST

    claim_training_folder(cfg, opts, "segment", LAST, cfg.resume or cfg.eval_only)
    if cfg.eval_only:  # before the manifest: a training run's own would be replaced
        refuse_training_out(cfg.out)
    with _on_main_rank(cfg.out, "segment", cfg) as manifest:
        summary = segment(cfg)
        if manifest:
            manifest.add(best=summary.get("best"), last=summary.get("last"),
                         eval_split=summary.get("eval_split"), eval_only=cfg.eval_only,
                         ranks_agree=summary.get("ranks_agree"))
    if main_rank():
        how = f"{summary['mode']}{', eval only' if cfg.eval_only else ''}"
        for split, metrics in summary["last"].items():
            print(f"segment ({how}) on {split}: " + _metrics_text(metrics, REPORTED))
        print(f"outputs: {cfg.out}")
    return _ranks_exit(summary.get("ranks_agree"))


def run_detect(cfg, opts) -> int:
    from ..downstream.detect import CHECKPOINT_NAME, detect

    claim_training_folder(cfg, opts, "detect", CHECKPOINT_NAME, cfg.resume)
    with RunManifest(cfg.out, "detect", settings(cfg), cfg.seed) as run:
        summary = detect(cfg)
        run.add(metrics=summary.get("metrics"), step=summary.get("step"), best=summary.get("best"))
    metrics = summary.get("metrics") or {}
    print("  ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.endswith(("/AP", "/AP50"))))
    print(f"metrics, predictions and figures: {cfg.out}")
    return EXIT_OK


def run_export(cfg, opts) -> int:
    from ..downstream.convert import export_weights
    from ..pretrain.export import is_export

    check_out_file(cfg.out, "export", is_export(cfg.out), overwrite=opts.overwrite)
    info = export_weights(cfg.encoder, cfg.out, fmt=cfg.format, arch=cfg.model)
    print(f"wrote {info['tensors']} {info['arch']} tensors in {cfg.format} key names to {cfg.out}")
    return EXIT_OK


# --------------------------------------------------------------------------- experiments

def run_demo(cfg, opts) -> int:
    from ..demo import demo_experiment, run_demo as demo
    from ..report.tables import results_markdown
    from ..runtime import warn_if_busy

    claim_folder(cfg.out, "demo", overwrite=opts.overwrite)  # then: finished steps are kept
    warn_if_busy("mwm demo")
    experiment = demo_experiment(cfg)
    with RunManifest(cfg.out, "demo", {**settings(cfg), "experiment": experiment}, cfg.seed) as run:
        results, report = demo(cfg, experiment)
        run.add(results=results["strategies"], localization_dice=results["localization_dice"],
                localization_selectivity=results["localization_selectivity"])
    print("\n" + results_markdown(results))
    print(f"report: {report}")
    return EXIT_FAILURES if results["failures"] else EXIT_OK


def run_experiment_command(cfg, opts) -> int:
    from ..engine import torchrun_env
    from ..experiment import load_experiment, run_experiment, shard_from
    from ..runtime import detach_from_torchrun, warn_if_busy
    from ..report.html import write_report
    from ..report.tables import results_markdown

    config = load_experiment(cfg.experiment)
    out = Path(cfg.out or Path("runs") / config.name)
    shard = shard_from(cfg.shard, cfg.device, torchrun_env())
    detach_from_torchrun()  # each cell trains as a single process on its shard's device
    manifest_dir = out if shard.main else out / "shards" / str(shard.index)
    if not (shard.main and holds_only_shards(out, "experiment")):  # shards started at once
        claim_folder(manifest_dir, "experiment", overwrite=opts.overwrite)  # then: done cells kept
    warn_if_busy("mwm experiment")
    with RunManifest(manifest_dir, "experiment",
                     {**settings(cfg), "experiment_file": config.to_dict()}) as run:
        results = run_experiment(config, out, shard=shard, workers=cfg.workers, quiet=cfg.quiet)
        run.add(missing=results["missing"], failures=results["failures"])
    report = write_report(out) if cfg.report else None
    print("\n" + results_markdown(results))
    print(f"results: {out / 'results.md'}" + (f"; report: {report}" if report else ""))
    return finish([{"name": f.split(":")[0], "reason": f} for f in results["failures"]], "cell")


def run_report(cfg, opts) -> int:
    from ..report.html import is_report, write_report

    run_dir = Path(cfg.run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: not a folder; give the --out folder of `mwm demo` or "
                        "`mwm experiment`.")
    if cfg.out:  # the default, RUN_DIR/report.html, belongs to the run folder
        check_out_file(cfg.out, "report", is_report(cfg.out), overwrite=opts.overwrite)
    print(f"report: {write_report(run_dir, Path(cfg.out) if cfg.out else None)}")
    return EXIT_OK


COMMANDS = (
    Command("phantoms", "write a synthetic labelled dataset (images, lesion masks, labels, "
            "captions, prompts, COCO instances, splits)", "mwm.data.phantoms:PhantomConfig",
            run_phantoms),
    Command("demo", "run the pipeline on synthetic phantoms, offline: phantoms, CLIP, "
            "localization, random vs region-aware pretraining, probes, report (about 10 "
            "minutes on 2 idle CPU cores; --quick about a minute)",
            "mwm.demo:DemoConfig", run_demo),
    Command("inspect", "check a dataset: read every image (and mask and prompt), report sizes, "
            "value ranges and every problem with its file", "mwm.data.inspect:InspectConfig",
            run_inspect),
    Command("localize", "saliency maps of what a text prompt names, from a vision-language "
            "model with the M2IB information bottleneck", "mwm.localize.pipeline:LocalizeConfig",
            run_localize),
    Command("clip train", "contrastive image-text training: a small CLIP from scratch or a "
            "fine-tuned one, for localization", "mwm.clip.train:ClipTrainConfig", run_clip_train),
    Command("postprocess", "turn saliency maps into region masks (threshold / Otsu / k-means or "
            "dense CRF, top-k components, holes, boxes)",
            "mwm.localize.postprocess:PostprocessRun", run_postprocess),
    Command("refine", "refine coarse region masks with SAM box prompts (one box per component)",
            "mwm.localize.refine:RefineConfig", run_refine),
    Command("pretrain", "region-aware masked pretraining of a timm encoder (SparK for CNNs, "
            "MAE for ViTs), masking the text-localized region heavily and the background lightly",
            "mwm.pretrain.config:PretrainConfig",
            run_pretrain),
    Command("finetune", "fine-tune or linear-probe a classifier from a pretrained encoder (or "
            "from scratch) on labelled images", "mwm.downstream.classify:FinetuneConfig",
            run_finetune),
    Command("segment", "semantic segmentation (UNet decoder) from a pretrained encoder; DSC, "
            "NSD, HD95", "mwm.downstream.segment:SegmentConfig", run_segment),
    Command("detect", "fine-tune Mask R-CNN (torchvision, ResNet-FPN) from a pretrained "
            "encoder; COCO box and mask AP", "mwm.downstream.detect:DetectConfig", run_detect),
    Command("export", "convert a pretrained encoder to timm, torchvision or Detectron2 key names",
            "mwm.downstream.convert:ExportConfig", run_export),
    Command("evaluate", "score predicted region masks against ground truth (DSC, NSD, "
            "coverage, recall, box coverage/recall)", "mwm.localize.evaluate:EvaluateConfig",
            run_evaluate),
    Command("experiment", "compare masking strategies: a grid of strategies x seeds, each "
            "pretrained and evaluated the same way (resumable)",
            "mwm.experiment.run:ExperimentRunConfig", run_experiment_command),
    Command("report", "write a self-contained HTML report of a demo or experiment folder "
            "(figures embedded, opens offline)", "mwm.report.html:ReportConfig", run_report),
)
