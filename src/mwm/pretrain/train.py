"""``mwm pretrain``: region-aware masked pretraining, resumable and distributed.

The model follows ``--model`` (:func:`pretrain_model`): SparK (:mod:`.spark`) for a timm
CNN, MAE (:mod:`.mae`) for a timm VisionTransformer. The step, in order: load a batch of
(image, region) → sample masks on the model's mask grid (``model.mask_patch``: SparK's
mask cell, the ViT's patch) with the configured strategy (:data:`mwm.masking.MASKINGS`)
→ the model's forward (SparK: mask → encode → densify → decode; MAE: gather the visible
tokens → encode → decode; both: loss on masked cells) → the engine's backward
(accumulated), clipping and optimizer step with the step's learning rate and weight decay
(:mod:`mwm.engine`).

Everything random is a function of ``(seed, epoch, index)`` (augmentation) or
``(seed, step)`` (masks), and the data order of an epoch is a function of
``(seed, epoch)``; a run resumed from a checkpoint therefore repeats the loss curve of
an uninterrupted run. Checkpoints (model, optimizer, scaler, step, epoch, config,
normalization statistics, RNG states) are written atomically every
``checkpoint_every`` optimizer steps and at the end of every epoch.

Under ``torchrun`` each process takes its share of every batch
(DistributedDataParallel; gloo on CPU, NCCL on GPU; optional SyncBatchNorm).

A strategy that ``reads_losses`` (``--masking loss-guided``) also gets each image's
per-cell losses from its last visit (:class:`~mwm.pretrain.hardness.LossTable`, read
before the masks are drawn, updated after the forward pass from the model's
``cell_loss_bn``, gathered from every rank, saved in the checkpoint); the other
strategies' step is unchanged.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import checkpoint
from ..data.layouts import open_dataset
from ..engine import (SPARK_FLOOR, SPARK_WARMUP_START, CsvLog, Engine, EngineCounters, Schedule,
                      build_optimizer, check_settings, cosine_between, end_distributed,
                      epoch_batches, init_distributed, param_groups, peak_lr, ranks_agree,
                      step_seed)
from ..errors import DataError
from ..files import write_csv
from ..progress import progress as progress_bar
from .config import PretrainConfig
from .data import Augment, RegionImageDataset, dataset_stats

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "train_log.csv"
EMPTY_REGIONS_NAME = "empty_regions.csv"
LOG_FIELDS = ("step", "epoch", "loss", "lr", "wd", "ratio_overall", "ratio_salient",
              "ratio_background", "empty_fraction", "images_per_s")
#: Settings that may change when a run is resumed.
RESUME_FREE = ("resume", "max_steps", "quiet", "workers", "device", "out")
#: Parameters without weight decay besides 1-D ones and biases (SparK's and timm ViT's rule).
NO_DECAY_KEYWORDS = ("mask_token", "cls_token", "reg_token", "dist_token", "pos_embed", "gamma")


@dataclass
class PretrainSummary:
    out_dir: str
    steps: int
    epochs_done: int
    final_loss: float | None
    seconds: float
    images_per_second: float
    encoder_path: str | None
    ranks_agree: bool | None = None
    realized: dict = field(default_factory=dict)      # run averages over every micro-batch
    empty_regions: dict | None = None                 # counted when the data was opened


def decays(name: str, param: torch.nn.Parameter) -> bool:
    """Weight decay on weights; not on norms, biases, mask tokens or position embeddings."""
    return not (param.ndim <= 1 or name.endswith(".bias")
                or any(k in name for k in NO_DECAY_KEYWORDS))


def sample_masks(cfg: PretrainConfig, regions_bhw: torch.Tensor, patch: int, step: int, rank: int,
                 losses_bhw: torch.Tensor | None = None):
    """Masks for one micro-batch, seeded by (seed, step, rank): resumable and per-rank distinct.
    ``losses_bhw``: the batch's per-cell losses, for a strategy that ``reads_losses``."""
    generator = torch.Generator(device=regions_bhw.device)
    generator.manual_seed(step_seed(cfg.seed, step, rank))
    if cfg.strategy.reads_losses:
        return cfg.strategy.sample(regions_bhw, patch, cfg, generator, losses_bhw=losses_bhw)
    return cfg.strategy.sample(regions_bhw, patch, cfg, generator)


def load_checkpoint(path: str | Path) -> dict:
    return checkpoint.load(path, CHECKPOINT_NAME, kind="pretrain")


def saved_settings(saved: dict) -> dict:
    """A checkpoint's settings, with those added since it was written at their defaults
    (which is what such a run used: e.g. ``hard_fraction``, read by a strategy that did
    not exist then)."""
    from ..config import default_of

    added = {f.name: default_of(PretrainConfig, f.name)
             for f in dataclasses.fields(PretrainConfig) if f.name not in saved
             and (f.default is not dataclasses.MISSING
                  or f.default_factory is not dataclasses.MISSING)}
    return {**added, **saved}


def is_mae(model) -> bool:
    from .mae import MAEModel

    return isinstance(model, MAEModel)


def pretrain_model(config: dict, *, sbn: bool = False):
    """The model of a pretraining run from its settings (``PretrainConfig.to_dict()``, as
    checkpoints store them): :class:`~mwm.pretrain.mae.MAEModel` for a timm
    VisionTransformer, else :class:`~mwm.pretrain.spark.SparKModel`. Flags that do not
    fit the family, and sizes the model refuses, are a :class:`DataError`."""
    from .mae import MAEModel, is_vit

    arch, get = config["model"], config.get
    vit = is_vit(arch)
    _check_family_flags(arch, vit, get("patch_size"), get("mask_patch"), get("decoder_depth"))
    common = dict(input_size=config["input_size"], decoder_width=get("decoder_width"),
                  norm_pix_loss=get("norm_pix_loss", True))
    try:
        if vit:
            return MAEModel(arch, patch_size=get("patch_size"),
                            decoder_depth=get("decoder_depth"), **common)
        from .spark import SparKModel

        if get("mask_patch") is not None:  # only then: SparKModel without mask_patch stays valid
            common["mask_patch"] = get("mask_patch")
        return SparKModel(arch, sbn=sbn, **common)
    except ValueError as err:
        raise DataError(f"--model {arch}: {err}") from err


def _check_family_flags(arch: str, vit: bool, patch_size, mask_patch, decoder_depth) -> None:
    if vit and mask_patch is not None and mask_patch != (patch_size or _vit_patch(arch)):
        raise DataError(f"--mask-patch {mask_patch}: a ViT ({arch}) masks whole patches; leave "
                        f"--mask-patch out or set --patch-size {mask_patch}.")
    if not vit and patch_size is not None:
        raise DataError(f"--patch-size is the patch of a ViT; {arch} is a CNN: use "
                        "--mask-patch for the mask cell size.")
    if not vit and decoder_depth is not None:
        raise DataError(f"--decoder-depth sets the depth of a ViT's MAE decoder; {arch} is a "
                        "CNN (SparK's decoder has one block per stride doubling).")


def _vit_patch(arch: str) -> int:
    from .mae import _meta_model

    return int(_meta_model(arch).patch_embed.patch_size[0])


# --------------------------------------------------------------------------- the run

class Trainer(EngineCounters):
    """Holds the run's state; :meth:`run` is the loop."""

    def __init__(self, cfg: PretrainConfig):
        from ..utils import resolve_device

        self.cfg = cfg
        self.out = Path(cfg.out)
        self.dist, self.device = init_distributed(resolve_device(cfg.device))
        torch.manual_seed(cfg.seed)
        self.checkpoint = None
        if (path := checkpoint.resume_path(cfg.resume, cfg.out, CHECKPOINT_NAME)) is not None:
            self.checkpoint = load_checkpoint(path)
            check_settings(saved_settings(self.checkpoint["config"]), cfg.to_dict(),
                           ignore=RESUME_FREE)
        self.dataset = self._dataset()
        self.model = self._model()
        self.losses = self._loss_table()
        global_batch = cfg.batch_size * cfg.accumulate * self.dist.world
        self.steps_per_epoch = len(self.dataset) // global_batch
        if self.steps_per_epoch == 0:
            raise DataError(f"{len(self.dataset)} images are fewer than one global batch "
                            f"({cfg.batch_size} x {cfg.accumulate} x {self.dist.world} processes); "
                            "lower --batch-size.")
        self.total_steps = cfg.epochs * self.steps_per_epoch
        schedule = Schedule(peak_lr(cfg.base_lr, global_batch, cfg.lr), self.total_steps,
                            int(round(cfg.warmup_epochs * self.steps_per_epoch)),
                            start=SPARK_WARMUP_START, floor=SPARK_FLOOR)
        groups = param_groups(self.model, decays=decays, weight_decay=1.0,
                              order=lambda key: not key[1])  # decay group first
        optimizer = build_optimizer(groups, cfg.optimizer, betas=(0.9, 0.95))
        self.engine = Engine(
            self.model, optimizer, device=self.device, amp=cfg.amp, schedule=schedule,
            weight_decay=lambda step: cosine_between(step, self.total_steps, cfg.wd, cfg.wd_end),
            clip=cfg.clip, accumulate=cfg.accumulate, dist=self.dist)
        if self.checkpoint is not None:
            self.model.load_state_dict(self.checkpoint["model"])
            self.engine.restore(self.checkpoint)
        self.log = CsvLog(self.out / LOG_NAME, LOG_FIELDS, enabled=self.dist.main)
        self._restore_ratios()

    def _dataset(self) -> RegionImageDataset:
        cfg = self.cfg
        data = open_dataset(cfg.images, cfg.regions, require_masks=cfg.regions is not None)
        samples = [s for s in data.samples if s.split in (None, "train")]
        dataset = RegionImageDataset(samples, cfg.input_size, augment=Augment(), seed=cfg.seed,
                                     continuous=cfg.strategy.continuous,
                                     views=cfg.strategy.reads_losses)
        if self.checkpoint is not None:
            mean, std = self.checkpoint["mean"], self.checkpoint["std"]
        else:
            mean, std = dataset_stats(dataset, cfg.stat_images, cfg.seed)
        dataset.mean = np.asarray(mean, np.float32).reshape(3, 1, 1)
        dataset.std = np.asarray(std, np.float32).reshape(3, 1, 1)
        self.mean, self.std = tuple(mean), tuple(std)
        self.empty_rows = dataset.empty_regions() if cfg.regions is not None else None
        return dataset

    def _write_empty_regions(self) -> dict | None:
        """``empty_regions.csv`` (the files) and the count, for the log, manifest and summary."""
        if self.empty_rows is None:
            return None
        n_images, n_empty = len(self.dataset), len(self.empty_rows)
        if self.dist.main:
            write_csv(self.out / EMPTY_REGIONS_NAME, self.empty_rows, ("name", "file", "reason"))
            if n_empty:
                print(f"pretrain: {n_empty} of {n_images} training images have an empty region "
                      f"({n_empty / n_images:.1%}; listed in {self.out / EMPTY_REGIONS_NAME}); "
                      "they are masked uniformly at the empty-region ratio", file=sys.stderr)
        return {"n_images": n_images, "n_empty": n_empty, "fraction": n_empty / n_images,
                "file": str(self.out / EMPTY_REGIONS_NAME)}

    def _model(self):
        cfg = self.cfg
        model = pretrain_model(cfg.to_dict(), sbn=cfg.sync_bn and self.dist.world > 1)
        self.mask_patch = getattr(model, "mask_patch", model.patch_size)
        model.to(self.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def _loss_table(self):
        """Each image's per-cell losses, for a strategy that reads them (restored on resume)."""
        if not self.cfg.strategy.reads_losses:
            return None
        from .hardness import LossTable

        side = self.cfg.input_size // self.mask_patch
        table = LossTable(len(self.dataset), (side, side), self.device)
        saved = (self.checkpoint or {}).get("loss_table")
        if saved is not None:
            table.restore(saved)
        return table

    # ---- the loop

    def run(self) -> PretrainSummary:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self.writer = self._tensorboard()
        self.log.restart(lambda row: int(row["step"]) <= self.step)
        empty = self._write_empty_regions()
        t0, self.images_seen, self.last = time.perf_counter(), 0, (None, {})
        stop = cfg.max_steps if cfg.max_steps is not None else self.total_steps
        while self.epoch < cfg.epochs and self.step < stop:
            self._run_epoch(stop)
        seconds = time.perf_counter() - t0
        self._save()
        encoder_path = self._export()
        agree = ranks_agree(self.dist, self.model.parameters(), device=self.device)
        if self.writer is not None:
            self.writer.close()
        return PretrainSummary(str(self.out), self.step, self.epoch, self.last[0], seconds,
                               self.images_seen / max(seconds, 1e-9), encoder_path, agree,
                               self.ratio_means(), empty)

    def _run_epoch(self, stop: int) -> None:
        from .figures import write_epoch_figure

        cfg, engine = self.cfg, self.engine
        self.dataset.set_epoch(self.epoch)
        batches = epoch_batches(len(self.dataset), cfg.batch_size, self.epoch, cfg.seed,
                                self.dist, self.steps_per_epoch * cfg.accumulate)
        skip = (self.step - self.epoch * self.steps_per_epoch) * cfg.accumulate
        bar = progress_bar(self._loader(batches[skip:]), total=len(batches) - skip, unit="batch",
                           desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                           enabled=not cfg.quiet and self.dist.main)
        figure_batch, micro, step_t0 = None, 0, time.perf_counter()
        for indices, (images, regions, *view) in zip(batches[skip:], bar):
            images, regions, masks, output = self._forward_backward(images, regions, micro,
                                                                    indices, view)
            micro += 1
            if figure_batch is None:
                figure_batch = (images.detach(), regions, masks, output)
            if micro < cfg.accumulate:
                continue
            lr, wd = engine.step()
            micro, n_images = 0, images.shape[0] * cfg.accumulate * self.dist.world
            self.images_seen += n_images
            if self.step % cfg.log_every == 0 or self.step == stop:
                rate = n_images / max(time.perf_counter() - step_t0, 1e-9)
                self.last = self._log(output.loss, masks, lr, wd, rate)
            step_t0 = time.perf_counter()
            if self.step % cfg.checkpoint_every == 0:
                self._save()
            if self.step >= stop:
                break
        if self.step % self.steps_per_epoch == 0:
            engine.epoch += 1
            self._save()
            if self.dist.main and figure_batch is not None:
                write_epoch_figure(self.out / "figures" / f"epoch_{self.epoch:04d}.png",
                                   figure_batch, self.mean, self.std, self.mask_patch)

    def _forward_backward(self, images, regions, micro: int, indices, view):
        """One micro-batch; ``indices``: its dataset indices, ``view``: ``[view_b5]`` when
        the loss table is kept (the items' crops), else empty."""
        cfg, engine = self.cfg, self.engine
        images = images.to(self.device, non_blocking=True)
        regions = regions.to(self.device, non_blocking=True)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        losses_bhw = None
        if self.losses is not None:
            index_b = torch.as_tensor(indices, dtype=torch.long, device=self.device)
            view_b5 = view[0].to(self.device)
            losses_bhw = self.losses.read(index_b, view_b5)
        masks = sample_masks(cfg, regions, self.mask_patch,
                             self.step * cfg.accumulate + micro, self.dist.rank, losses_bhw)
        self._add_ratios(masks)
        with engine.accumulating(micro):
            with engine.autocast():
                output = engine.module(images, masks.active_b1hw)
            engine.backward(output.loss.float())
        if self.losses is not None:
            self.losses.update(index_b, view_b5, output.cell_loss_bn, masks.masked_bhw,
                               self.dist.world)
        return images, regions, masks, output

    def _loader(self, batches):
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=batches,
                                           num_workers=self.cfg.workers,
                                           persistent_workers=False,
                                           pin_memory=self.device.type == "cuda")

    # ---- realized ratios, averaged over the whole run (resumes included)

    def _add_ratios(self, masks) -> None:
        """Add a micro-batch's realized ratios to the run totals (tensors: no host sync)."""
        ratios = masks.ratios()
        if self.ratio_totals is None:
            self.ratio_totals = {key: torch.zeros((), dtype=torch.float64, device=value.device)
                                 for key, value in ratios.items()}
        for key, value in ratios.items():
            self.ratio_totals[key] += value.double()
        self.ratio_batches += 1

    def ratio_means(self) -> dict[str, float]:
        """Mean realized ratios over every micro-batch this run has sampled (this rank's)."""
        if not self.ratio_batches:
            return {}
        return {key: float(total) / self.ratio_batches for key, total in self.ratio_totals.items()}

    def _restore_ratios(self) -> None:
        saved = (self.checkpoint or {}).get("ratio_totals") or {}
        self.ratio_batches = int(saved.get("batches", 0))
        self.ratio_totals = ({key: torch.tensor(float(value), dtype=torch.float64,
                                                device=self.device)
                              for key, value in saved.items() if key != "batches"}
                             if self.ratio_batches else None)

    # ---- outputs

    def _save(self) -> None:
        if self.dist.main:
            checkpoint.save(self.out / CHECKPOINT_NAME, {
                "model": self.model.state_dict(), **self.engine.state(),
                "rng": checkpoint.rng_state(), "config": self.cfg.to_dict(),
                "mean": list(self.mean), "std": list(self.std), "arch": self.cfg.model,
                "input_size": self.cfg.input_size,
                "ratio_totals": {"batches": self.ratio_batches,
                                 **{key: float(total) for key, total
                                    in (self.ratio_totals or {}).items()}},
                **({"loss_table": self.losses.state()} if self.losses is not None else {})})

    def _export(self) -> str | None:
        from .export import export_encoder

        if not self.dist.main:
            return None
        path = self.out / "encoder.safetensors"
        extra = {"mean": list(self.mean), "std": list(self.std), "input_size": self.cfg.input_size,
                 "step": self.step, "masking": self.cfg.masking}
        if is_mae(self.model):  # a ViT is rebuilt downstream with its (maybe non-default) patch
            extra["patch_size"] = self.model.patch_size
        export_encoder(self.model.encoder_state_dict(), str(path), arch=self.cfg.model,
                       extra_metadata=extra)
        return str(path)

    def _tensorboard(self):
        if not self.dist.main:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.out / "tensorboard"), purge_step=self.step or None)

    def _log(self, loss, masks, lr: float, wd: float, rate: float):
        ratios = {k: float(v) for k, v in masks.ratios().items()}
        loss_value = float(loss.detach())
        if self.dist.world > 1:
            import torch.distributed as torch_dist

            reduced = torch.tensor([loss_value], device=self.device)
            torch_dist.all_reduce(reduced)
            loss_value = float(reduced) / self.dist.world
        if not self.dist.main:
            return loss_value, ratios
        self.log.append({
            "step": self.step, "epoch": self.epoch, "loss": f"{loss_value:.6f}", "lr": f"{lr:.6g}",
            "wd": f"{wd:.4g}", "ratio_overall": f"{ratios['overall']:.4f}",
            "ratio_salient": f"{ratios['salient']:.4f}",
            "ratio_background": f"{ratios['background']:.4f}",
            "empty_fraction": f"{ratios['empty_fraction']:.4f}", "images_per_s": f"{rate:.2f}"})
        for key, value in (("loss", loss_value), ("lr", lr), ("wd", wd), ("throughput", rate),
                           *((f"mask_ratio/{k}", v) for k, v in ratios.items())):
            self.writer.add_scalar(f"pretrain/{key}", value, self.step)
        return loss_value, ratios


def pretrain(cfg: PretrainConfig) -> PretrainSummary:
    """Run (or resume) a pretraining job; see :class:`PretrainConfig`."""
    trainer, finished = Trainer(cfg), False
    try:
        summary = trainer.run()
        finished = True
        return summary
    finally:
        end_distributed(finished)
