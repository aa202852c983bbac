"""Optimizers and schedules for pretraining.

* Parameter groups: no weight decay for 1-D parameters (norms, biases) and mask
  tokens; weight decay for the rest.
* ``lamb`` (timm's LAMB, as SparK) or ``adamw``.
* Learning rate: an explicit ``lr`` is always used as given; otherwise
  ``lr = base_lr * global_batch / 256`` (SparK's rule; the reference overwrote an
  explicit ``--lr`` with it).
* Per-step schedules as functions of the step (so a resumed run continues exactly):
  linear warm-up from 0.5% of the peak, then cosine to 0.1% of the peak; weight decay
  follows a cosine from ``wd`` to ``wd_end`` over the whole run.
"""

from __future__ import annotations

import math

import torch
from torch import nn

NO_DECAY_KEYWORDS = ("mask_token", "cls_token", "pos_embed", "gamma")


def param_groups(model: nn.Module) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or any(k in name for k in NO_DECAY_KEYWORDS):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": 1.0, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def build_optimizer(model: nn.Module, name: str, lr: float, *, betas=(0.9, 0.95),
                    eps: float = 1e-8) -> torch.optim.Optimizer:
    """``weight_decay`` in the groups is a multiplier; :func:`apply_schedule` sets the value."""
    groups = param_groups(model)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    if name == "lamb":
        from timm.optim import Lamb

        return Lamb(groups, lr=lr, betas=betas, eps=1e-6, max_grad_norm=None)
    raise ValueError(f"optimizer must be 'lamb' or 'adamw', got {name!r}")


def peak_lr(base_lr: float, global_batch: int, lr: float | None = None) -> float:
    """The explicit ``lr`` if given, else ``base_lr * global_batch / 256``."""
    return float(lr) if lr is not None else base_lr * global_batch / 256.0


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if warmup > 0 and step < warmup:
        return peak * (0.005 + 0.995 * step / warmup)
    span = max(1, total - 1 - warmup)
    progress = min(1.0, (step - warmup) / span)
    return peak * (0.001 + 0.999 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def wd_at(step: int, total: int, wd: float, wd_end: float) -> float:
    progress = min(1.0, step / max(1, total - 1))
    return wd_end + (wd - wd_end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = wd if group.get("name") == "decay" else 0.0
