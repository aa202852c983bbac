"""``mwm pretrain``: region-aware sparse masked pretraining, resumable and distributed.

The step, in order: load a batch of (image, region) → sample masks on the encoder's
grid (random, region-aware or budget) → SparK forward (mask → encode → densify →
decode → loss on masked cells) → backward (accumulated) → clip → optimizer step with
the step's learning rate and weight decay.

Everything random is a function of ``(seed, epoch, index)`` (augmentation) or
``(seed, step)`` (masks), and the data order of an epoch is a function of
``(seed, epoch)``; a run resumed from a checkpoint therefore repeats the loss curve of
an uninterrupted run. Checkpoints (model, optimizer, scaler, step, epoch, config,
normalization statistics, RNG states) are written atomically every
``checkpoint_every`` optimizer steps and at the end of every epoch.

Under ``torchrun`` each process takes its share of every batch
(DistributedDataParallel; gloo on CPU, NCCL on GPU; optional SyncBatchNorm).
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist

from ..errors import DataError
from ..data.layouts import open_dataset
from .. import checkpoint
from ..files import write_text
from ..progress import progress as progress_bar
from ..utils import end_distributed, resolve_amp
from .config import PretrainConfig
from .data import Augment, RegionImageDataset, dataset_stats
from .optim import apply_schedule, build_optimizer, lr_at, peak_lr, wd_at

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "train_log.csv"
LOG_FIELDS = ("step", "epoch", "loss", "lr", "wd", "ratio_overall", "ratio_salient",
              "ratio_background", "empty_fraction", "images_per_s")


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
    realized: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- distributed

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return Dist()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend=backend)
    return Dist(torch_dist.get_rank(), torch_dist.get_world_size(),
                int(os.environ.get("LOCAL_RANK", 0)))


# --------------------------------------------------------------------------- masks

def sample_masks(cfg: PretrainConfig, regions_bhw: torch.Tensor, patch: int, step: int, rank: int):
    """Masks for one micro-batch, seeded by (seed, step, rank): resumable and per-rank distinct."""
    generator = torch.Generator(device=regions_bhw.device)
    generator.manual_seed((cfg.seed * 1_000_003 + step) * 1_009 + rank)
    return cfg.strategy.sample(regions_bhw, patch, cfg, generator)


# --------------------------------------------------------------------------- data order

def epoch_batches(n_items: int, batch: int, epoch: int, seed: int, dist: Dist,
                  n_batches: int) -> list[list[int]]:
    """This rank's ``n_batches`` micro-batches of an epoch, from a seeded permutation."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_items, generator=generator).tolist()
    global_batch = batch * dist.world
    return [order[b * global_batch + dist.rank * batch: b * global_batch + (dist.rank + 1) * batch]
            for b in range(n_batches)]


# --------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: Path, model, optimizer, scaler, state: dict) -> None:
    checkpoint.save(path, {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": checkpoint.rng_state(),
        **state,
    })


def load_checkpoint(path: str | Path) -> dict:
    return checkpoint.load(path, CHECKPOINT_NAME)


def resume_path(cfg: PretrainConfig) -> Path | None:
    """``--resume auto`` = this run's own checkpoint if present; a path must exist."""
    return checkpoint.resume_path(cfg.resume, cfg.out, CHECKPOINT_NAME)


# --------------------------------------------------------------------------- loop

class Trainer:
    """Holds the run's state; :meth:`run` is the loop."""

    def __init__(self, cfg: PretrainConfig):
        from ..utils import resolve_device

        self.cfg = cfg
        self.out = Path(cfg.out)
        self.device = resolve_device(cfg.device)
        self.dist = init_distributed(self.device)
        if self.device.type == "cuda" and self.dist.world > 1:
            self.device = torch.device("cuda", self.dist.local_rank)
        if self.device.type == "cpu":
            torch.set_flush_denormal(True)  # denormals made some CPU runs crawl
        torch.manual_seed(cfg.seed)
        self.checkpoint = None
        if (path := resume_path(cfg)) is not None:
            self.checkpoint = load_checkpoint(path)
        self.dataset = self._dataset()
        self.model, self.ddp_model = self._model()
        self.optimizer = build_optimizer(self.model, cfg.optimizer, 1.0)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.step, self.epoch = 0, 0
        if self.checkpoint is not None:
            self._restore()
        self.steps_per_epoch = len(self.dataset) // (cfg.batch_size * cfg.accumulate * self.dist.world)
        if self.steps_per_epoch == 0:
            raise DataError(f"{len(self.dataset)} images are fewer than one global batch "
                            f"({cfg.batch_size} x {cfg.accumulate} x {self.dist.world} processes); "
                            "lower --batch-size.")
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup_steps = int(round(cfg.warmup_epochs * self.steps_per_epoch))
        global_batch = cfg.batch_size * cfg.accumulate * self.dist.world
        self.peak_lr = peak_lr(cfg.base_lr, global_batch, cfg.lr)

    # ---- construction

    def _dataset(self) -> RegionImageDataset:
        cfg = self.cfg
        data = open_dataset(cfg.images, cfg.regions, require_masks=cfg.regions is not None)
        samples = [s for s in data.samples if s.split in (None, "train")]
        dataset = RegionImageDataset(samples, cfg.input_size, augment=Augment(), seed=cfg.seed,
                                     continuous=cfg.strategy.continuous)
        if self.checkpoint is not None:
            mean, std = self.checkpoint["mean"], self.checkpoint["std"]
        else:
            mean, std = dataset_stats(dataset, cfg.stat_images, cfg.seed)
        dataset.mean = np.asarray(mean, np.float32).reshape(3, 1, 1)
        dataset.std = np.asarray(std, np.float32).reshape(3, 1, 1)
        self.mean, self.std = tuple(mean), tuple(std)
        return dataset

    def _model(self):
        from .spark import SparKModel

        cfg = self.cfg
        model = SparKModel(cfg.model, input_size=cfg.input_size, decoder_width=cfg.decoder_width,
                           norm_pix_loss=cfg.norm_pix_loss, sbn=cfg.sync_bn and self.dist.world > 1)
        model.to(self.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            return model, torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return model, model

    def _restore(self) -> None:
        ckpt = self.checkpoint
        saved = {k: v for k, v in ckpt["config"].items() if k not in ("resume", "max_steps", "quiet",
                                                                         "workers", "device")}
        mine = {k: v for k, v in self.cfg.to_dict().items() if k in saved}
        changed = {k: (saved[k], mine[k]) for k in saved if saved[k] != mine[k] and k != "out"}
        if changed:
            detail = ", ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in changed.items())
            raise DataError(f"--resume: the checkpoint was made with other settings ({detail}). "
                            "Resume with the same settings or start a new run folder.")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.epoch = int(ckpt["step"]), int(ckpt["epoch"])

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return resolve_amp(self.cfg.amp, self.device)

    # ---- the loop

    def run(self) -> PretrainSummary:
        from .figures import write_epoch_figure

        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        writer = self._tensorboard()
        self._truncate_log()
        t0, images_seen, last_loss, realized = time.perf_counter(), 0, None, {}
        stop = cfg.max_steps if cfg.max_steps is not None else self.total_steps
        while self.epoch < cfg.epochs and self.step < stop:
            batches = self._epoch_batches()
            skip = (self.step - self.epoch * self.steps_per_epoch) * cfg.accumulate
            loader = self._loader(batches[skip:])
            figure_batch = None
            bar = progress_bar(loader, total=len(batches) - skip, unit="batch",
                               desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                               enabled=not cfg.quiet and self.dist.main)
            micro, step_t0 = 0, time.perf_counter()
            for images, regions in bar:
                images = images.to(self.device, non_blocking=True)
                regions = regions.to(self.device, non_blocking=True)
                if cfg.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                masks = sample_masks(cfg, regions, self.model.patch_size, self.step * cfg.accumulate + micro,
                                     self.dist.rank)
                output = self._forward_backward(images, masks, micro)
                micro += 1
                if figure_batch is None:
                    figure_batch = (images.detach(), regions, masks, output)
                if micro < cfg.accumulate:
                    continue
                lr, wd = self._optimizer_step()
                micro, self.step = 0, self.step + 1
                images_seen += images.shape[0] * cfg.accumulate * self.dist.world
                if self.step % cfg.log_every == 0 or self.step == stop:
                    rate = images.shape[0] * cfg.accumulate * self.dist.world / max(time.perf_counter() - step_t0, 1e-9)
                    last_loss, realized = self._log(writer, output.loss, masks, lr, wd, rate)
                step_t0 = time.perf_counter()
                if self.step % cfg.checkpoint_every == 0:
                    self._save()
                if self.step >= stop:
                    break
            if self.step % self.steps_per_epoch == 0:
                self.epoch += 1
                self._save()
                if self.dist.main and figure_batch is not None:
                    write_epoch_figure(self.out / "figures" / f"epoch_{self.epoch:04d}.png",
                                       figure_batch, self.mean, self.std, self.model.patch_size)
        seconds = time.perf_counter() - t0
        self._save()
        encoder_path = self._export()
        agree = self._ranks_agree()
        if writer is not None:
            writer.close()
        return PretrainSummary(str(self.out), self.step, self.epoch, last_loss, seconds,
                               images_seen / max(seconds, 1e-9), encoder_path, agree, realized)

    def _epoch_batches(self) -> list[list[int]]:
        self.dataset.set_epoch(self.epoch)
        return epoch_batches(len(self.dataset), self.cfg.batch_size, self.epoch, self.cfg.seed,
                             self.dist, self.steps_per_epoch * self.cfg.accumulate)

    def _loader(self, batches):
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=batches,
                                           num_workers=self.cfg.workers,
                                           persistent_workers=False,
                                           pin_memory=self.device.type == "cuda")

    def _forward_backward(self, images, masks, micro: int):
        cfg = self.cfg
        sync = micro + 1 == cfg.accumulate or self.dist.world == 1
        context = self.ddp_model.no_sync() if not sync else contextlib.nullcontext()
        with context:
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                output = self.ddp_model(images, masks.active_b1hw)
            loss = output.loss.float() / cfg.accumulate
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {self.step}: lower --lr or "
                                         "use --amp none; the last checkpoint is intact.")
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return output

    def _optimizer_step(self) -> tuple[float, float]:
        cfg = self.cfg
        lr = lr_at(self.step, self.total_steps, self.warmup_steps, self.peak_lr)
        wd = wd_at(self.step, self.total_steps, cfg.wd, cfg.wd_end)
        apply_schedule(self.optimizer, lr, wd)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if cfg.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr, wd

    # ---- outputs

    def _state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "config": self.cfg.to_dict(),
                "mean": list(self.mean), "std": list(self.std), "arch": self.cfg.model,
                "input_size": self.cfg.input_size}

    def _save(self) -> None:
        if self.dist.main:
            save_checkpoint(self.out / CHECKPOINT_NAME, self.model, self.optimizer, self.scaler,
                            self._state())

    def _export(self) -> str | None:
        from .export import export_encoder

        if not self.dist.main:
            return None
        path = self.out / "encoder.safetensors"
        export_encoder(self.model.encoder_state_dict(), str(path), arch=self.cfg.model,
                       extra_metadata={"mean": list(self.mean), "std": list(self.std),
                                       "input_size": self.cfg.input_size, "step": self.step,
                                       "masking": self.cfg.masking})
        return str(path)

    def _tensorboard(self):
        if not self.dist.main:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.out / "tensorboard"), purge_step=self.step or None)

    def _truncate_log(self) -> None:
        """Keep log rows up to the checkpoint's step (a killed run may have logged more)."""
        path = self.out / LOG_NAME
        if not self.dist.main:
            return
        rows = []
        if path.is_file():
            with path.open(newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= self.step]
        lines = [",".join(LOG_FIELDS)] + [",".join(r[k] for k in LOG_FIELDS) for r in rows]
        write_text(path, "\n".join(lines) + "\n")

    def _log(self, writer, loss, masks, lr: float, wd: float, rate: float):
        ratios = {k: float(v) for k, v in masks.ratios().items()}
        loss_value = float(loss.detach())
        if self.dist.world > 1:
            reduced = torch.tensor([loss_value], device=self.device)
            torch_dist.all_reduce(reduced)
            loss_value = float(reduced) / self.dist.world
        if not self.dist.main:
            return loss_value, ratios
        row = {"step": self.step, "epoch": self.epoch, "loss": f"{loss_value:.6f}", "lr": f"{lr:.6g}",
               "wd": f"{wd:.4g}", "ratio_overall": f"{ratios['overall']:.4f}",
               "ratio_salient": f"{ratios['salient']:.4f}",
               "ratio_background": f"{ratios['background']:.4f}",
               "empty_fraction": f"{ratios['empty_fraction']:.4f}", "images_per_s": f"{rate:.2f}"}
        with (self.out / LOG_NAME).open("a") as handle:
            handle.write(",".join(str(row[k]) for k in LOG_FIELDS) + "\n")
        for key, value in (("loss", loss_value), ("lr", lr), ("wd", wd), ("throughput", rate),
                           *((f"mask_ratio/{k}", v) for k, v in ratios.items())):
            writer.add_scalar(f"pretrain/{key}", value, self.step)
        return loss_value, ratios

    def _ranks_agree(self) -> bool | None:
        """After training, every rank must hold the same weights (DDP sanity check)."""
        if self.dist.world == 1:
            return None
        checksum = torch.tensor([sum(float(p.detach().double().sum()) for p in self.model.parameters())],
                                dtype=torch.float64, device=self.device)
        gathered = [torch.zeros_like(checksum) for _ in range(self.dist.world)]
        torch_dist.all_gather(gathered, checksum)
        values = [float(g) for g in gathered]
        return all(math.isclose(v, values[0], rel_tol=1e-9, abs_tol=1e-9) for v in values)


def pretrain(cfg: PretrainConfig) -> PretrainSummary:
    """Run (or resume) a pretraining job; see :class:`PretrainConfig`."""
    trainer, finished = Trainer(cfg), False
    try:
        summary = trainer.run()
        finished = True
        return summary
    finally:
        end_distributed(finished)
