"""``mwm segment``: semantic segmentation on top of a (pretrained) encoder.

**Data** (:mod:`mwm.downstream.segment_data`). Samples with splits and, for their truth,
masks (``binary``: lesion vs background; ``classes``: the sample's label inside its mask)
or integer label maps (``label_maps``: 0 = background, k = class k), resized to
``input_size`` (the truth nearest-neighbour).

**Model** (:mod:`mwm.downstream.segment_decoders`). The encoder is built by timm with
``num_classes=0`` and loaded strictly by :func:`~mwm.downstream.weights.load_weights`,
like ``mwm finetune`` (a ViT at ``input_size`` with the weights' patch size, its position
embeddings resampled). A CNN's feature pyramid (timm ``forward_intermediates``) goes into a
UNet-style decoder; a ViT's four block outputs are first brought to strides P/8-P
(UNETR-style in 2-D). ``probe`` freezes the encoder (weights and BatchNorm statistics),
``finetune`` trains everything.

**Loss.** Cross-entropy + soft Dice (mean over the foreground classes). **Metrics** (per image and foreground class): DSC, NSD (2 px) and HD95 from
:mod:`mwm.metrics`, with ``mwm evaluate``'s empty conventions (both empty: DSC = NSD = 1,
HD95 = 0; one empty: DSC = NSD = 0, HD95 = inf). Per class: means over images (HD95 over
finite values, ``hd95_infinite`` counts the rest) and ``dice_present``, the mean DSC over
the images whose truth holds the class; the top level is the macro mean over classes.

**Distributed.** Under ``torchrun`` each process takes its share of every global batch
(DDP), BatchNorm statistics are averaged before every evaluation, every rank evaluates
the same model and only rank 0 writes; ``summary["ranks_agree"]`` compares the ranks.

**Outputs.** ``metrics.csv`` (one row per epoch; val scored every ``eval_every`` epochs,
empty on the others), ``best.pt`` (best scored val DSC; none with ``eval_every`` 0),
``last.pt`` (full state, for ``--resume``), ``per_image.csv`` and ``overlays/`` (val and
test, last model), ``summary.json``. ``eval_only`` evaluates a finished run's ``best.pt``
or ``last.pt`` on val and test (no training; its architecture, classes, input size and
normalization come from the checkpoint).
"""

from __future__ import annotations

import csv
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import checkpoint
from ..config import check_ranges, opt
from ..engine import (
    CsvLog,
    Engine,
    Schedule,
    autocast,
    average_bn_stats,
    build_optimizer,
    check_settings,
    end_distributed,
    epoch_batches,
    init_distributed,
    param_groups,
    peak_lr,
    ranks_agree,
)
from ..errors import DataError
from ..files import write_json
from ..pretrain.config import DEFAULT_ENCODER, DEFAULT_INPUT_SIZE
from ..pretrain.data import pixel_stats
from ..utils import AMP_CHOICES, resolve_amp
from .segment_data import CLASSES_FILE, SegmentDataset, split_samples
from .segment_decoders import SegNet, build_encoder
from .segment_metrics import aggregate, dice_ce_loss, image_metrics
from .tasks import EvalTask, register_task
from .vit import patch_size_of
from .weights import BEST, LAST, load_weights, read_weights

__all__ = ["SegmentConfig", "aggregate", "image_metrics", "segment"]

SEGMENT_FORMAT = checkpoint.SEGMENT_FORMAT
MODES = ("finetune", "probe")
LABELS = ("binary", "classes")
REPORTED = ("dice", "dice_present", "nsd", "hd95")
METRICS_FIELDS = ("epoch", "step", "train_loss", "lr", *REPORTED, "seconds")
PER_IMAGE_FIELDS = ("split", "image", "class", "present", "dice", "nsd", "hd95")
# Settings that do not change what is trained (evaluating is read-only: no RNG, no BN update).
RESUME_FREE = ("resume", "max_steps", "quiet", "workers", "device", "out", "weights",
               "eval_only", "eval_every")


@dataclass(kw_only=True)
class SegmentConfig:
    """Everything a segmentation run depends on."""

    data: str = opt(help="images with splits and masks (a phantom folder, a CSV manifest "
                    "with mask and split columns), or with --label-maps", positional=True)
    out: str = opt(help="the run folder")
    weights: str | None = opt(None, "MWM encoder.safetensors, pretrain checkpoint.pt or run "
                              "folder, a timm checkpoint; none = from scratch. With "
                              "--eval-only: a segment run folder, its best.pt or last.pt")
    model: str | None = opt(None, f"timm CNN architecture (default: from the weights, else "
                            f"{DEFAULT_ENCODER})")
    mode: str = opt("finetune", "finetune (all weights) or probe (frozen encoder, the decoder "
                    "trains)", choices=MODES)
    labels: str = opt("binary", "binary (lesion vs background) or classes (one label per "
                      "lesion class: the samples' labels, or the label maps' values)",
                      choices=LABELS)
    label_maps: str | None = opt(None, "folder of integer label PNGs <image name>.png (uint8 "
                                 "or uint16, the image's size; 0 = background, k = class k), "
                                 f"class names from its {CLASSES_FILE}; the masks are then "
                                 "not read", metavar="DIR")
    input_size: int = opt(DEFAULT_INPUT_SIZE, "pixels (images and masks are resized to it)",
                          low=16)
    patch_size: int | None = opt(None, "ViT patch size (default: the weights', else the "
                                 "architecture's); CNNs ignore it", low=1)
    decoder_width: int = opt(64, "channels of every decoder level", low=4)
    epochs: int = opt(20, "epochs", low=1)
    batch_size: int = opt(8, "images per step and process", low=1)
    lr: float | None = opt(None, "peak lr (default: base-lr x global batch / 256)", above=0.0)
    base_lr: float = opt(1e-3, "learning rate per 256 images", above=0.0)
    warmup_epochs: float = opt(1.0, "linear warm-up epochs", low=0.0)
    optimizer: str = opt("adamw", "optimizer", choices=("adamw", "lamb"))
    wd: float = opt(1e-4, "weight decay (not on norms and biases)", low=0.0)
    eval_every: int = opt(1, "score the val split every N epochs (metrics.csv, best.pt); 0 = "
                          "only the last model, at the end (an experiment reads only that one)",
                          low=0)
    overlays: int = opt(8, "overlay PNGs (image | truth | prediction) per split", low=0)
    amp: str = opt("auto", "mixed precision", choices=AMP_CHOICES)
    seed: int = opt(0, "random seed")
    workers: int = opt(0, "data-loader worker processes", low=0)
    device: str = opt("auto", "cpu, cuda, cuda:N or auto")
    eval_only: bool = opt(False, "evaluate a finished segmentation checkpoint (--weights) on "
                          "val and test, no training; architecture, classes, input size and "
                          "normalization come from it")
    resume: str | None = checkpoint.resume_option('last.pt')
    quiet: bool = opt(False, "no progress output")
    max_steps: int | None = checkpoint.max_steps_option()

    def __post_init__(self) -> None:
        check_ranges(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- model

def read_segment_checkpoint(weights: str | None) -> tuple[Path, dict]:
    """``(path, payload)`` of the checkpoint ``--eval-only`` evaluates: a segment run folder
    (its best.pt, else last.pt) or one of those files."""
    if weights is None:
        raise DataError("--eval-only needs --weights: the run folder, best.pt or last.pt of "
                        "an `mwm segment` run.")
    path = Path(weights)
    if path.is_dir():
        found = [path / name for name in (BEST, LAST) if (path / name).is_file()]
        if not found:
            raise DataError(f"--weights {path}: the folder holds no {BEST} or {LAST}; pass the "
                            "folder of a finished `mwm segment` run.")
        path = found[0]
    obj = checkpoint.read(path, "--weights")
    if checkpoint.kind_of(obj) != "segment":  # best.pt has no optimizer: no Kind check
        raise DataError(f"--weights {path}: --eval-only needs an `mwm segment` checkpoint "
                        f"(best.pt / last.pt); this file holds {checkpoint.describe(obj)}.")
    return path, obj


def evaluated_config(cfg: SegmentConfig, payload: dict, path: Path) -> SegmentConfig:
    """``cfg`` with the architecture settings of the checkpoint it evaluates."""
    if cfg.model and cfg.model != payload["arch"]:
        raise DataError(f"--weights {path}: made for {payload['arch']!r}, not --model "
                        f"{cfg.model!r}; leave --model out.")
    saved = payload["config"]
    patch = payload.get("patch_size") or _state_patch_size(payload["model"])
    return dataclasses.replace(cfg, model=payload["arch"], input_size=int(payload["input_size"]),
                               patch_size=patch, decoder_width=int(saved["decoder_width"]),
                               mode=saved["mode"])


def refuse_training_out(out: str | Path) -> None:
    """``--eval-only`` never writes into a training run's folder: its summary.json,
    per_image.csv and manifest would be replaced."""
    out = Path(out)
    if (out / LAST).is_file():
        raise DataError(f"--out {out} holds a training run ({out / LAST}); --eval-only writes "
                        "summary.json and per_image.csv, which would replace the run's. Give "
                        f"another --out, e.g. {out / 'eval'}.")


def _state_patch_size(state: dict) -> int | None:
    """A ViT's patch size from its patch embedding (checkpoints that did not store it)."""
    weight = state.get("encoder.patch_embed.proj.weight")
    return int(weight.shape[-1]) if weight is not None else None


# --------------------------------------------------------------------------- the run

class Segmenter:
    """One segmentation run: data, model, weights, the engine, evaluation and records.
    With ``eval_only`` the model is a finished run's checkpoint and :meth:`run_eval` scores it."""

    def __init__(self, cfg: SegmentConfig):
        from ..utils import resolve_device

        self.cfg, self.out, self.t0 = cfg, Path(cfg.out), time.perf_counter()
        self.dist, self.device = init_distributed(resolve_device(cfg.device))
        self.amp_dtype = resolve_amp(cfg.amp, self.device)
        torch.manual_seed(cfg.seed)
        self.checkpoint, self.evaluated = None, None
        if cfg.eval_only:
            state, meta, kind = self._evaluated_weights()
        else:
            state, meta, kind = self._starting_weights()
        self.splits, self.labels = split_samples(self.cfg)
        self.classes = self.labels.classes
        if cfg.eval_only and list(meta["classes"]) != self.classes:
            raise DataError(f"--weights {self.weights_report['source']}: the checkpoint was "
                            f"trained on classes {list(meta['classes'])}, the data has "
                            f"{self.classes} (the run used --labels {meta['labels']}"
                            f"{' --label-maps' if meta['label_maps'] else ''}).")
        self.eval_split = "val" if self.splits["val"] else "test"
        encoder, self.arch = build_encoder(self.cfg, meta)
        if state is not None and not cfg.eval_only:
            self.weights_report.update(load_weights(encoder, state, source=str(cfg.weights),
                                                    meta=meta))
        self.model = SegNet(encoder, self.cfg.decoder_width, len(self.classes),
                            self.cfg.mode == "probe")
        self.patch_size = patch_size_of(encoder) if self.model.neck is not None else None
        if cfg.eval_only:
            self._load_evaluated(state)
        else:
            self.weights_report["unused_by_decoder"] = self.model.freeze_unused(self.cfg.input_size)
        self.mean, self.std, self.normalization = self._normalization(meta, kind)
        self.sets = {name: SegmentDataset(samples, self.labels, self.cfg.input_size,
                                          mean=self.mean, std=self.std,
                                          augment=name == "train", seed=cfg.seed)
                     for name, samples in self.splits.items() if samples}
        self.model.to(self.device)
        self.engine: Engine | None = None
        self.best: dict | None = None
        self.log = CsvLog(self.out / "metrics.csv", METRICS_FIELDS, enabled=self.dist.main)

    def _starting_weights(self) -> tuple[dict | None, dict, str]:
        cfg = self.cfg
        path = checkpoint.resume_path(cfg.resume, self.out, LAST)
        self.checkpoint = checkpoint.load(path, LAST, kind="segment") if path is not None else None
        if self.checkpoint is not None:
            check_settings(self.checkpoint["config"], cfg.to_dict(), ignore=RESUME_FREE)
            saved_world = int(self.checkpoint.get("world_size", 1))
            if saved_world != self.dist.world:
                raise DataError(f"--resume {path}: the run used {saved_world} process(es), this "
                                f"one {self.dist.world}; resume with the same number.")
        state, meta, kind = read_weights(cfg.weights) if cfg.weights else (None, {}, "scratch")
        self.weights_report = {"kind": kind, "source": cfg.weights}
        return state, meta, kind

    def _evaluated_weights(self) -> tuple[dict, dict, str]:
        refuse_training_out(self.out)
        path, payload = read_segment_checkpoint(self.cfg.weights)
        self.cfg = evaluated_config(self.cfg, payload, path)
        self.evaluated = payload
        self.weights_report = {"kind": SEGMENT_FORMAT, "source": str(path),
                               "epoch": payload.get("epoch"), "step": payload.get("step")}
        meta = {"arch": payload["arch"], "patch_size": self.cfg.patch_size,
                "mean": payload["mean"], "std": payload["std"], "classes": payload["classes"],
                "labels": payload["config"].get("labels"),
                "label_maps": payload["config"].get("label_maps")}
        return payload["model"], meta, SEGMENT_FORMAT

    def _load_evaluated(self, state: dict) -> None:
        try:
            self.model.load_state_dict(state)
        except RuntimeError as err:
            raise DataError(f"--weights {self.weights_report['source']}: the checkpoint does "
                            f"not fit the model its own settings describe ({err}); it was "
                            "written by another MWM version.") from err

    def _normalization(self, meta: dict, kind: str):
        if meta.get("mean") and meta.get("std"):
            return list(map(float, meta["mean"])), list(map(float, meta["std"])), f"{kind} metadata"
        plain = SegmentDataset(self.splits["train"], self.labels, self.cfg.input_size,
                               mean=(0, 0, 0), std=(1, 1, 1))
        mean, std = pixel_stats(plain.image(i) for i in range(len(plain)))
        return list(mean), list(std), "train split statistics"

    def _engine(self) -> Engine:
        cfg, n_train, world = self.cfg, len(self.sets["train"]), self.dist.world
        self.batch = min(cfg.batch_size, n_train // world)
        if self.batch < 1:
            raise DataError(f"{n_train} train images are too few for {world} processes.")
        self.per_epoch = n_train // (self.batch * world)
        total = cfg.epochs * self.per_epoch
        self.peak_lr = peak_lr(cfg.base_lr, self.batch * world, cfg.lr)
        schedule = Schedule(self.peak_lr, total, round(cfg.warmup_epochs * self.per_epoch))
        groups = param_groups(self.model, weight_decay=cfg.wd,
                              decays=lambda name, p: p.ndim > 1 and not name.endswith(".bias"))
        return Engine(self.model, build_optimizer(groups, cfg.optimizer), device=self.device,
                      amp=cfg.amp, schedule=schedule, dist=self.dist)

    def autocast(self):
        return autocast(self.device, self.amp_dtype)

    def run(self) -> dict:
        cfg = self.cfg
        self.engine = engine = self._engine()
        if self.checkpoint is not None:
            self.model.load_state_dict(self.checkpoint["model_train"])
            engine.restore(self.checkpoint)
            self.best = self.checkpoint.get("best")
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.log.restart(lambda row: int(row["epoch"]) <= engine.epoch)
        stop = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * self.per_epoch
        loss = None
        while engine.epoch < cfg.epochs and engine.step_count < stop:
            t0 = time.perf_counter()
            lr, loss = self._train_epoch(stop)
            if engine.step_count == (engine.epoch + 1) * self.per_epoch:
                engine.epoch += 1
                self._average_bn()
                self._record(lr, loss, time.perf_counter() - t0)
                self._save_last()
        self._average_bn()
        self._save_last()
        return self._finish({"epochs_done": engine.epoch, "steps": engine.step_count,
                             "final_train_loss": loss, "batch_size": self.batch,
                             "steps_per_epoch": self.per_epoch, "peak_lr": self.peak_lr})

    def run_eval(self) -> dict:
        """Score the checkpoint on val and test: ``per_image.csv``, overlays, summary."""
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.best = self.evaluated.get("best")
        return self._finish({})

    def _average_bn(self) -> None:
        """BatchNorm statistics averaged over the ranks (a probe's frozen encoder is equal
        on all of them and stays untouched)."""
        trained = ((self.model.neck, self.model.decoder) if self.model.frozen
                   else (self.model,))
        average_bn_stats(self.dist, *trained)

    def _train_epoch(self, stop: int) -> tuple[float | None, float | None]:
        engine, train = self.engine, self.sets["train"]
        train.set_epoch(engine.epoch)
        batches = epoch_batches(len(train), self.batch, engine.epoch, self.cfg.seed,
                                engine.dist, self.per_epoch)
        skip = engine.step_count - engine.epoch * self.per_epoch
        loader = torch.utils.data.DataLoader(train, batch_sampler=batches[skip:],
                                             num_workers=self.cfg.workers)
        self.model.train()
        losses, lr = [], None
        for images, targets in loader:
            with engine.autocast():
                logits = engine.module(images.to(self.device))
            loss = dice_ce_loss(logits.float(), targets.to(self.device))
            engine.backward(loss)
            lr, _ = engine.step()
            losses.append(float(loss.detach()))
            if engine.step_count >= stop:
                break
        return lr, (float(np.mean(losses)) if losses else None)

    @torch.no_grad()
    def predict(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(predicted label maps, truth label maps) of a split, (N, S, S) each."""
        self.model.eval()
        loader = torch.utils.data.DataLoader(self.sets[split], batch_size=self.cfg.batch_size,
                                             num_workers=self.cfg.workers)
        preds, truths = [], []
        for images, targets in loader:
            with self.autocast():
                logits = self.model(images.to(self.device))
            preds.append(logits.float().argmax(1).cpu().numpy())
            truths.append(targets.numpy())
        self.model.train()
        return np.concatenate(preds), np.concatenate(truths)

    def evaluate(self, split: str) -> tuple[dict, list[dict]]:
        preds, truths = self.predict(split)
        rows = []
        for sample, pred, truth in zip(self.sets[split].samples, preds, truths):
            for row in image_metrics(pred, truth, self.classes):
                rows.append({"split": split, "image": sample.name, **row})
        self._last_maps = (preds, truths)
        return aggregate(rows), rows

    def _record(self, lr, loss, seconds: float) -> None:
        """After an epoch (every rank: the same model, the same metrics): the log row and,
        on the epochs ``eval_every`` scores, best.pt when the val DSC improved (rank 0
        writes). Unscored epochs log empty metrics."""
        every = self.cfg.eval_every
        scored = every > 0 and self.engine.epoch % every == 0
        metrics = self.evaluate(self.eval_split)[0] if scored else dict.fromkeys(REPORTED)
        fmt = lambda v: "" if v is None else f"{v:.6f}"
        self.log.append({"epoch": self.engine.epoch, "step": self.engine.step_count,
                         "train_loss": fmt(loss), "lr": "" if lr is None else f"{lr:.6g}",
                         **{k: fmt(metrics[k]) for k in REPORTED}, "seconds": f"{seconds:.2f}"})
        if scored and (self.best is None or metrics["dice"] > self.best["metrics"]["dice"]):
            self.best = {"epoch": self.engine.epoch, "metrics": metrics}
            if self.dist.main:
                checkpoint.save(self.out / BEST, self._payload())

    def _payload(self, extra: dict | None = None) -> dict:
        return {"format": SEGMENT_FORMAT, "model": _cpu_state(self.model), "arch": self.arch,
                "patch_size": self.patch_size, "classes": self.classes, "mean": self.mean,
                "std": self.std, "input_size": self.cfg.input_size, "config": self.cfg.to_dict(),
                "best": self.best, "step": self.engine.step_count, "epoch": self.engine.epoch,
                "world_size": self.dist.world, **(extra or {})}

    def _save_last(self) -> None:
        if self.dist.main:
            checkpoint.save(self.out / LAST, self._payload(
                {"model_train": _cpu_state(self.model), **self.engine.state(),
                 "rng": checkpoint.rng_state()}))

    def _finish(self, training: dict) -> dict:
        """Val and test with the model as it is now: per_image.csv, overlays, summary."""
        results, per_image = {}, []
        for split in ("val", "test"):
            if split in self.sets:
                results[split], rows = self.evaluate(split)
                per_image += rows
                if self.dist.main:
                    write_overlays(self.out / "overlays", split, self.sets[split],
                                   *self._last_maps, self.cfg.overlays)
        scores = [v or 0.0 for split in results.values() for v in (split["dice"], split["nsd"])]
        agree = ranks_agree(self.dist, self.model.state_dict().values(), scores,
                            device=self.device)
        summary = {"out_dir": str(self.out), "eval_only": self.cfg.eval_only,
                   "mode": self.cfg.mode, "arch": self.arch, "classes": self.classes,
                   "labels": self.cfg.labels, "label_maps": self.cfg.label_maps,
                   "n": {k: len(v) for k, v in self.sets.items()}, "eval_split": self.eval_split,
                   "input_size": self.cfg.input_size,
                   "decoder": f"{'unetr' if self.model.neck is not None else 'unet'} "
                              f"(width {self.cfg.decoder_width})", "loss": "ce + dice",
                   "normalization": {"source": self.normalization, "mean": self.mean,
                                     "std": self.std},
                   "weights": self.weights_report, **training,
                   "best": self.best, "last": results, "world_size": self.dist.world,
                   "ranks_agree": agree, "seconds": time.perf_counter() - self.t0,
                   "config": self.cfg.to_dict()}
        if self.dist.main:
            write_per_image(self.out / "per_image.csv", per_image)
            write_json(self.out / "summary.json", summary)
        return summary


def _cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}


def write_per_image(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=PER_IMAGE_FIELDS)
        writer.writeheader()
        writer.writerows({**row, "present": int(row["present"])} for row in rows)


def write_overlays(folder: Path, split: str, dataset: SegmentDataset, preds: np.ndarray,
                   truths: np.ndarray, count: int) -> None:
    """``<split>_<image>.png``: the image | the truth | the prediction, classes coloured."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    palette = np.vstack([[0, 0, 0], rng.integers(64, 256, (len(dataset.labels.classes), 3))])
    for i in range(min(count, len(dataset))):
        image = (dataset.image(i) * 255).clip(0, 255).astype(np.uint8)
        panels = [image] + [np.where(m[..., None] > 0, palette[m], image).astype(np.uint8)
                            for m in (truths[i], preds[i])]
        cv2.imwrite(str(folder / f"{split}_{dataset.samples[i].name}.png"),
                    np.concatenate(panels, axis=1)[..., ::-1])


def segment(cfg: SegmentConfig) -> dict:
    """Train and evaluate a segmentation model, or (``eval_only``) evaluate a finished
    one; return the summary (see the module doc)."""
    finished = False
    try:
        runner = Segmenter(cfg)
        summary = runner.run_eval() if cfg.eval_only else runner.run()
        finished = True
        return summary
    finally:
        end_distributed(finished)


def _segment_task(cfg: SegmentConfig) -> dict:
    summary = segment(cfg)
    metrics = summary["last"][summary["eval_split"]]
    return {"split": summary["eval_split"], "epochs": summary["epochs_done"],
            "seconds": summary["seconds"], **{k: metrics[k] for k in REPORTED}}


register_task(EvalTask("segment", "semantic segmentation (UNet decoder), every weight trained",
                       SegmentConfig, _segment_task, REPORTED, "dice",
                       fixed={"mode": "finetune", "eval_only": False}))
register_task(EvalTask("segment-probe", "semantic segmentation, a UNet decoder on the frozen "
                       "encoder", SegmentConfig, _segment_task, REPORTED, "dice",
                       fixed={"mode": "probe", "eval_only": False}))
