"""Reading encoder weights of every kind, and loading them strictly into a timm model.

:func:`read_weights` accepts an MWM ``encoder.safetensors``, an MWM pretrain
``checkpoint.pt`` or its run folder (the encoder is extracted through
``SparKModel.encoder_state_dict()``; a ViT's MAE checkpoint gives its ``encoder.`` keys), a timm/PyTorch state dict (``.pth``/``.pt``/
``.bin``/``.safetensors``, optionally nested under ``state_dict``/``model``/``module``,
``module.`` prefixes stripped) and an MWM fine-tune checkpoint (``best.pt``/``last.pt``).
Files are read with ``weights_only=True`` or safetensors. :func:`load_weights` is strict
on the backbone: any missing, unexpected or mis-shaped key outside the classifier head
raises :class:`~mwm.errors.DataError` naming the keys, or, when the file records another
architecture than the model's, saying which one to pass as ``--model``. An unreadable
file (truncated, not such a file, holding objects other than tensors) is a ``DataError``
from :mod:`mwm.checkpoint`'s readers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import checkpoint
from ..checkpoint import FINETUNE_FORMAT
from ..errors import DataError
from ..pretrain.export import key_problems
from .vit import fit_pos_embed, is_vit

LAST, BEST = "last.pt", "best.pt"
#: What a fine-tune checkpoint records about its model (a ViT's also ``patch_size`` and
#: ``global_pool``).
FINETUNE_META = ("arch", "mean", "std", "input_size", "classes", "patch_size", "global_pool")


def _unwrap(state: Any) -> dict:
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError("not a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _is_pretrain_checkpoint(obj: Any) -> bool:
    return (isinstance(obj, dict) and isinstance(obj.get("config"), dict)
            and "masking" in obj["config"] and isinstance(obj.get("model"), dict))


def read_weights(path: str | os.PathLike) -> tuple[dict, dict, str]:
    """``(state dict, metadata, kind)`` of a weights file or run folder.

    ``kind``: ``mwm-export``, ``mwm-pretrain``, ``mwm-finetune`` or ``timm``. The metadata
    may carry ``arch``, ``mean``, ``std``, ``input_size`` (and ``classes`` for fine-tune).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"--weights {path}: no such file or folder.")
    if path.is_dir():
        for name in ("encoder.safetensors", "checkpoint.pt", BEST, LAST):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise DataError(f"--weights {path}: the folder holds no encoder.safetensors, "
                            f"checkpoint.pt, {BEST} or {LAST}.")
    if path.suffix == ".safetensors":
        from ..pretrain.export import FORMAT as EXPORT_FORMAT, read_metadata

        state = checkpoint.read_safetensors(path, "--weights")
        meta = read_metadata(path)
        return state, meta, "mwm-export" if meta.get("format") == EXPORT_FORMAT else "timm"
    obj = checkpoint.read(path, "--weights")
    if isinstance(obj, dict) and obj.get("format") == FINETUNE_FORMAT:
        meta = {k: obj.get(k) for k in FINETUNE_META}
        return obj["model"], meta, "mwm-finetune"
    if _is_pretrain_checkpoint(obj) and is_vit(obj["config"].get("model")):
        return _mae_encoder(obj, path), _pretrain_meta(obj), "mwm-pretrain"
    if _is_pretrain_checkpoint(obj):
        from ..pretrain.spark import SparKModel

        config = obj["config"]
        spark = SparKModel(config["model"], input_size=config["input_size"],
                           decoder_width=config.get("decoder_width"),
                           norm_pix_loss=config.get("norm_pix_loss", True))
        try:
            spark.load_state_dict(obj["model"])
        except RuntimeError as err:
            raise DataError(f"--weights {path}: the pretrain checkpoint does not match its own "
                            f"configuration ({err}).") from err
        return spark.encoder_state_dict(), _pretrain_meta(obj), "mwm-pretrain"
    try:
        return _unwrap(obj), {}, "timm"
    except DataError as err:
        raise DataError(f"--weights {path}: {err} (expected an MWM export, an MWM checkpoint or "
                        "a timm state dict, optionally under 'state_dict'/'model'/'module').") from None


def _pretrain_meta(obj: dict) -> dict:
    config = obj["config"]
    meta = {"arch": obj.get("arch", config["model"]), "mean": obj.get("mean"),
            "std": obj.get("std"), "input_size": obj.get("input_size", config["input_size"]),
            "masking": config.get("masking")}
    return {**meta, "patch_size": config["patch_size"]} if config.get("patch_size") else meta


def _mae_encoder(obj: dict, path: Path) -> dict:
    """The timm ViT weights of an MAE pretrain checkpoint: its ``encoder.`` keys (the
    strict load then checks them against the model)."""
    prefix = "encoder."
    state = {k[len(prefix):]: v for k, v in obj["model"].items() if k.startswith(prefix)}
    if not state:
        raise DataError(f"--weights {path}: the pretrain checkpoint of a ViT holds no "
                        f"'{prefix}' weights; pass its encoder.safetensors instead.")
    return state


def load_weights(model: nn.Module, state: dict, *, source: str = "weights",
                 keep_head: bool = False, meta: dict | None = None) -> dict:
    """Load ``state`` into ``model`` strictly on the backbone; return a key report.

    Head keys in ``state`` are dropped (reported as ``ignored_head_keys``) unless
    ``keep_head`` and their shapes match. A ViT's ``pos_embed`` made for another patch
    grid is resampled (:func:`~mwm.downstream.vit.fit_pos_embed`; reported as
    ``pos_embed``). Any other missing / unexpected / mis-shaped
    key raises :class:`DataError` naming them, and the architecture the weights were made
    for when ``meta`` (the metadata :func:`read_weights` returned; by default read again
    from the file ``source``) records another one than the model's.
    """
    from ..pretrain.export import _classifier_keys

    own = model.state_dict()
    head = _classifier_keys(model)
    ignored = [k for k in state if k in head and not (keep_head and k in own
                                                      and own[k].shape == state[k].shape)]
    state = {k: v for k, v in state.items() if k not in ignored}
    state, resampled = fit_pos_embed(model, state, source)
    parts = key_problems(own, state, may_miss=head.__contains__)
    if parts:
        arch = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        recorded = meta if meta is not None else _recorded_metadata(source)
        keys = "; ".join(parts)
        other = _other_arch(source, recorded, arch)
        raise DataError(f"{other} (the keys differ — {keys})." if other else (
            f"{source}: the weights do not match the encoder {arch!r} — {keys}. Only the "
            "classifier head may differ; pass --model with the architecture the weights "
            "were made for."))
    model.load_state_dict(state, strict=False)
    head_missing = sorted(k for k in own if k in head and k not in state)
    report = {"loaded": len(state), "missing_head_keys": head_missing,
              "ignored_head_keys": sorted(ignored)}
    return {**report, "pos_embed": resampled} if resampled else report


def _recorded_metadata(source: str) -> dict:
    """The metadata the weights file ``source`` records; {} when ``source`` is no such file
    (a mismatch message must not fail on it)."""
    try:
        return read_weights(source)[1] if Path(source).exists() else {}
    except DataError:
        return {}


def _other_arch(source: str, meta: dict, arch: str) -> str | None:
    """Which ``--model`` to pass, when ``meta`` records an architecture other than ``arch``
    (timm pretrained tags such as ``.a1_in1k`` aside); else None."""
    saved = meta.get("arch")
    if not saved or str(saved).split(".")[0] == str(arch).split(".")[0]:
        return None
    recorded = [f"{label} {meta[key]}" for key, label in (("input_size", "input size"),
                                                           ("masking", "masking"))
                if meta.get(key) is not None]
    details = f" ({', '.join(recorded)})" if recorded else ""
    return f"{source} holds a {saved} encoder{details} but --model is {arch}; pass --model {saved}"
