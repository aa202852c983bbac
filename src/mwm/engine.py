"""One training engine for every MWM training loop: pretraining, fine-tuning, CLIP
training and detection. Each task keeps only its model, loss and evaluation.

An optimizer step, in order:

1. the task's forward pass under :meth:`Engine.autocast` (the one ``--amp`` rule,
   :func:`mwm.utils.resolve_amp`), inside :meth:`Engine.accumulating` so that DDP
   synchronizes gradients only on the last micro-batch of an accumulated step;
2. :meth:`Engine.backward`: a non-finite loss stops the run (the last checkpoint is
   intact); the loss is divided by the accumulation steps, scaled (fp16 only; the scaler
   is a no-op otherwise) and back-propagated;
3. :meth:`Engine.step`: the learning rate of this step from the :class:`Schedule` (times
   each parameter group's ``lr_scale``) and the weight decay (times ``wd_scale``), unscale,
   gradient-norm clipping, the optimizer step through the scaler, zero gradients, step + 1.

Around the step: :func:`param_groups` and :func:`build_optimizer` (one grouping rule with
a task's own no-decay test and layer-wise lr scales), :func:`epoch_batches` and
:func:`step_seed` (data order and randomness as functions of seed, epoch and step, so a
resumed run repeats an uninterrupted one), :meth:`Engine.state` / :meth:`Engine.restore`
with :func:`check_settings` (resume), :class:`CsvLog` (logs cut back to the checkpoint on
resume), and the DDP helpers (:func:`init_distributed`, :func:`ranks_agree`,
:func:`average_bn_stats`, :func:`end_distributed`).
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from .errors import DataError
from .files import write_text
from .utils import resolve_amp


# --------------------------------------------------------------------------- distributed

@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def torchrun_env() -> Dist:
    """What torchrun's variables say (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); no group."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return Dist()
    return Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join torchrun's process group (gloo on CPU, NCCL on GPU); each rank its own GPU."""
    import torch.distributed as torch_dist

    dist = torchrun_env()
    if dist.world == 1:
        return dist, device
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    dist = Dist(torch_dist.get_rank(), torch_dist.get_world_size(), dist.local_rank)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    return dist, device


def end_distributed(finished: bool) -> None:
    """Leave the process group. After a finished run, a barrier first, so no rank tears its
    gloo/NCCL connections down while another still uses them (seen as a SIGABRT,
    "terminate called without an active exception", at the end of a 2-process CPU run).
    After an error, no barrier: the other ranks may never arrive, and torchrun must see
    this rank fail."""
    import torch.distributed as torch_dist

    if not torch_dist.is_initialized():
        return
    try:
        if finished:
            torch_dist.barrier()
    finally:
        torch_dist.destroy_process_group()


def wrap_ddp(model: nn.Module, dist: Dist, device: torch.device) -> nn.Module:
    """``model`` under DistributedDataParallel in a torchrun job, else ``model`` itself."""
    if dist.world == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def ranks_agree(dist: Dist, tensors: Iterable[torch.Tensor], extra: Sequence[float] = (),
                device: torch.device | str = "cpu") -> bool | None:
    """Do all ranks hold the same tensors (and ``extra`` values)? None in one process."""
    import torch.distributed as torch_dist

    if dist.world == 1:
        return None
    local = torch.tensor([float(t.detach().double().sum()) for t in tensors]
                         + [float(v) for v in extra], dtype=torch.float64, device=device)
    gathered = [torch.zeros_like(local) for _ in range(dist.world)]
    torch_dist.all_gather(gathered, local)
    return all(torch.allclose(g, gathered[0], rtol=1e-9, atol=1e-12) for g in gathered)


def average_bn_stats(dist: Dist, *modules: nn.Module | None) -> None:
    """Average BatchNorm running statistics over the ranks (no-op in one process).

    DDP keeps parameters equal, but each rank's BN running mean/var follow its own
    batches; without this, ranks would evaluate (and rank 0 save) different models.
    """
    if dist.world == 1:
        return
    from timm.utils import distribute_bn

    for module in modules:
        if module is not None:
            distribute_bn(module, dist.world, reduce=True)


# --------------------------------------------------------------------------- data order

def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The seed of one step's randomness (masks, mixup, dropout) on one rank."""
    return (seed * 1_000_003 + step) * 1_009 + rank


def epoch_batches(n_items: int, batch: int, epoch: int, seed: int, dist: Dist,
                  n_batches: int, stride: int = 1_000_003) -> list[list[int]]:
    """This rank's ``n_batches`` batches of an epoch from a permutation seeded by
    ``seed * stride + epoch``; each global batch is split between the ranks."""
    generator = torch.Generator().manual_seed(seed * stride + epoch)
    order = torch.randperm(n_items, generator=generator).tolist()
    global_batch = batch * dist.world
    return [order[b * global_batch + dist.rank * batch: b * global_batch + (dist.rank + 1) * batch]
            for b in range(n_batches)]


# --------------------------------------------------------------------------- schedules

#: SparK's warm-up start and cosine floor (fractions of the peak), used by pretraining and
#: fine-tuning.
SPARK_WARMUP_START, SPARK_FLOOR = 0.005, 0.001


@dataclass(frozen=True)
class Schedule:
    """The learning rate of every optimizer step: a linear warm-up, then a cosine decay
    (or, with ``milestones``, a step decay).

    Warm-up (``step < warmup``): ``peak × (start + (1 - start) × (step + shift) / warmup)``
    (``shift = 1`` counts the step being taken, so the last warm-up step reaches ``peak``).
    Cosine: from ``peak`` at the end of the warm-up to ``floor × peak`` at step ``end``
    (default ``total - 1``). Steps: ``peak × warm-up factor × gamma ** (milestones
    passed)``; a milestone inside a long warm-up already applies.
    """

    peak: float
    total: int
    warmup: int = 0
    start: float = 0.0
    shift: int = 0
    floor: float = 0.0
    end: int | None = None
    milestones: tuple[int, ...] = ()
    gamma: float = 1.0

    def lr_at(self, step: int) -> float:
        warming = self.warmup > 0 and step < self.warmup
        if self.milestones:
            factor = self._warm(step) if warming else 1.0
            for milestone in self.milestones:
                if milestone > 0 and step >= milestone:
                    factor *= self.gamma
            return self.peak * factor
        if warming:
            if self.start == 0.0:  # the float operations of a plain peak x steps / warmup
                return self.peak * (step + self.shift) / self.warmup
            return self.peak * self._warm(step)
        end = self.total - 1 if self.end is None else self.end
        progress = min(1.0, (step - self.warmup) / max(1, end - self.warmup))
        return self.peak * (self.floor + (1.0 - self.floor) * 0.5
                            * (1.0 + math.cos(math.pi * progress)))

    def _warm(self, step: int) -> float:
        return self.start + (1.0 - self.start) * (step + self.shift) / self.warmup


def cosine_between(step: int, total: int, start: float, end: float) -> float:
    """A cosine from ``start`` at step 0 to ``end`` at step ``total - 1`` (weight decay)."""
    progress = min(1.0, step / max(1, total - 1))
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def peak_lr(base_lr: float, global_batch: int, lr: float | None = None, per: int = 256) -> float:
    """The explicit ``lr`` if given, else ``base_lr × global_batch / per`` (SparK's rule)."""
    return float(lr) if lr is not None else base_lr * global_batch / per


# --------------------------------------------------------------------------- optimizer

def param_groups(model: nn.Module, *, decays: Callable[[str, nn.Parameter], bool],
                 weight_decay: float = 0.0, layer: Callable[[str], int] | None = None,
                 layer_scale: Callable[[int], float] | None = None,
                 order: Callable[[tuple[int, bool]], object] | None = None) -> list[dict]:
    """Optimizer groups of the trainable parameters: one per (layer, decays?).

    ``decays(name, param)``: whether weight decay applies; ``layer(name)``: the layer id
    for layer-wise learning rates, with ``layer_scale(id)`` its lr multiplier. Each group
    carries ``lr_scale`` and ``wd_scale`` (1 or 0) for :meth:`Engine.step` and starts with
    ``weight_decay`` (or 0). Groups come in the order their first parameter appears, or
    sorted by ``order((layer, decays))``: a task keeps the order its checkpoints store.
    """
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = bool(decays(name, param))
        layer_id = layer(name) if layer is not None else 0
        group = groups.get((layer_id, decay))
        if group is None:
            label = "decay" if decay else "no_decay"
            group = groups[(layer_id, decay)] = {
                "params": [], "name": f"layer{layer_id}_{label}" if layer is not None else label,
                "lr_scale": layer_scale(layer_id) if layer_scale is not None else 1.0,
                "wd_scale": 1.0 if decay else 0.0,
                "weight_decay": weight_decay if decay else 0.0}
        group["params"].append(param)
    keys = sorted(groups, key=order) if order is not None else list(groups)
    return [groups[k] for k in keys]


OPTIMIZERS = ("adamw", "lamb")


def build_optimizer(groups: list[dict], name: str = "adamw", *, betas=(0.9, 0.999),
                    eps: float = 1e-8) -> torch.optim.Optimizer:
    """AdamW or timm's LAMB (eps 1e-6, no global clipping: the engine clips) over ``groups``;
    the learning rate is set by the engine at every step."""
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, betas=betas, eps=eps)
    if name == "lamb":
        from timm.optim import Lamb

        return Lamb(groups, lr=0.0, betas=betas, eps=1e-6, max_grad_norm=None)
    raise DataError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


# --------------------------------------------------------------------------- the engine

def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``'s type; fp32 (disabled) when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


class Engine:
    """Device, precision, accumulation, clipping, schedules and the step of one model.

    ``model``: the module being trained (unwrapped; ``module`` is what the forward pass
    calls: the DDP wrapper in a torchrun job). ``schedule``: learning rates (None: the
    groups keep theirs); ``weight_decay``: a function of the step (None: the groups keep
    theirs); ``clip``: max gradient norm (None or 0: off).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 device: torch.device, amp: str = "none", schedule: Schedule | None = None,
                 weight_decay: Callable[[int], float] | None = None, clip: float | None = None,
                 accumulate: int = 1, dist: Dist = Dist()):
        self.model = model
        self.optimizer = optimizer
        self.device = device
        self.amp_dtype = resolve_amp(amp, device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.schedule = schedule
        self.weight_decay = weight_decay
        self.clip = clip
        self.accumulate = int(accumulate)
        self.dist = dist
        self.module = wrap_ddp(model, dist, device)
        self.step_count = 0
        self.epoch = 0

    def autocast(self):
        """The forward pass's precision (fp32 when ``--amp`` resolves to none)."""
        return autocast(self.device, self.amp_dtype)

    def accumulating(self, micro: int):
        """Context for micro-batch ``micro`` of a step: DDP syncs only on the last one."""
        last = micro + 1 >= self.accumulate
        if last or self.module is self.model:
            return contextlib.nullcontext()
        return self.module.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {self.step_count}: lower "
                                     "--lr or use --amp none; the last checkpoint is intact.")
        if self.accumulate > 1:
            loss = loss / self.accumulate
        self.scaler.scale(loss).backward()

    def step(self) -> tuple[float | None, float | None]:
        """One optimizer step (see the module docstring); returns its (lr, weight decay)."""
        lr = self.schedule.lr_at(self.step_count) if self.schedule is not None else None
        wd = self.weight_decay(self.step_count) if self.weight_decay is not None else None
        for group in self.optimizer.param_groups:
            if lr is not None:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            if wd is not None:
                group["weight_decay"] = wd * group.get("wd_scale", 1.0)
        self.scaler.unscale_(self.optimizer)
        if self.clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return lr, wd

    def closure_step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One step of an optimizer that evaluates the loss itself (L-BFGS, full batch)."""
        loss = self.optimizer.step(closure)
        self.step_count += 1
        return loss

    def state(self) -> dict:
        """The optimizer, scaler, step and epoch, for a checkpoint (the task adds the rest)."""
        return {"optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "step": self.step_count, "epoch": self.epoch}

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint's :meth:`state` (the model is the task's to load)."""
        # loading replaces the groups with the saved ones: keep this run's lr/wd scales,
        # which checkpoints of earlier versions did not store
        scales = [(g.get("lr_scale", 1.0), g.get("wd_scale", 1.0))
                  for g in self.optimizer.param_groups]
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as err:
            raise DataError(f"--resume: the checkpoint's optimizer does not fit this run's "
                            f"parameter groups ({err}); it was written with other settings or "
                            "another MWM version. Start a new run folder.") from err
        for group, (lr_scale, wd_scale) in zip(self.optimizer.param_groups, scales):
            group["lr_scale"], group["wd_scale"] = lr_scale, wd_scale
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step_count, self.epoch = int(state["step"]), int(state["epoch"])


class EngineCounters:
    """``step`` and ``epoch`` of a training run that keeps its :class:`Engine` as ``engine``."""

    engine: Engine

    @property
    def step(self) -> int:
        return self.engine.step_count

    @property
    def epoch(self) -> int:
        return self.engine.epoch


# --------------------------------------------------------------------------- resume and logs

def settings_changes(saved: dict, mine: dict, *, ignore: Iterable[str] = (),
                     only: Iterable[str] | None = None) -> str:
    """The settings that differ between a checkpoint and this run, as ``key: a → b, ...``
    ('' when none do)."""
    keys = set(only) if only is not None else (set(saved) | set(mine)) - set(ignore)
    return ", ".join(f"{k}: {saved.get(k)!r} → {mine.get(k)!r}" for k in sorted(keys)
                     if saved.get(k) != mine.get(k))


def check_settings(saved: dict, mine: dict, *, ignore: Iterable[str] = (),
                   only: Iterable[str] | None = None) -> None:
    """Refuse to resume a checkpoint made with other settings (the changes are listed)."""
    detail = settings_changes(saved, mine, ignore=ignore, only=only)
    if detail:
        raise DataError(f"--resume: the checkpoint was made with other settings ({detail}). "
                        "Resume with the same settings or start a new run folder.")


class CsvLog:
    """A CSV log a row at a time; on (re)start, rows after the checkpoint are dropped
    (a killed run may have logged past its last checkpoint). Only the main rank writes."""

    def __init__(self, path: str | Path, fields: Sequence[str], enabled: bool = True):
        self.path = Path(path)
        self.fields = tuple(fields)
        self.enabled = enabled

    def restart(self, keep: Callable[[dict], bool]) -> None:
        if not self.enabled:
            return
        rows = []
        if self.path.is_file():
            with self.path.open(newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if keep(r)]
        lines = [",".join(self.fields)] + [",".join(r.get(k) or "" for k in self.fields)
                                           for r in rows]
        write_text(self.path, "\n".join(lines) + "\n")

    def append(self, row: dict) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(",".join(str(row[k]) for k in self.fields) + "\n")
