"""Export the pretrained encoder in timm's key space, and load it back.

The file is a ``.safetensors`` state dict of ``timm.create_model(arch, num_classes=0)``
(no classifier head) with string metadata: ``format`` (``mwm-encoder``), ``arch``,
``mwm_version``, ``timm_version``, and whatever ``extra_metadata`` carries (the trainer
writes ``input_size``, ``mean``, ``std``, ``step``, ``masking``, and for a ViT
``patch_size``; non-string values are stored as JSON and decoded by :func:`read_metadata`).
A ViT export holds the state dict of ``timm.create_model(arch, num_classes=0,
img_size=input_size, patch_size=patch_size)``.

Loading, either way:

* ``mwm.pretrain.export.load_encoder(path, num_classes=K)`` — checks the keys strictly
  (only the classifier head may be missing) and raises :class:`mwm.data.io.DataError`
  naming missing / unexpected / mis-shaped keys;
* plain timm: ``timm.create_model(arch, pretrained=True, num_classes=K,
  pretrained_cfg_overlay=dict(file=path))``. timm loads strictly unless ``num_classes``
  differs from the pretrained config's (1000 for ImageNet models), in which case it
  drops the head and loads non-strictly: pass ``num_classes=0`` or your class count
  (a 1000-class head would be reported missing and fail the strict load). For a ViT add
  ``img_size=..., patch_size=...`` (the metadata's); timm resamples the position
  embeddings to another ``img_size`` itself.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .. import checkpoint
from ..errors import DataError

__all__ = ["export_encoder", "is_export", "load_encoder", "read_metadata",
           "fit_pos_embed", "FORMAT"]

FORMAT = "mwm-encoder"


def _state_of(model_or_state) -> dict[str, torch.Tensor]:
    if isinstance(model_or_state, Mapping):
        return dict(model_or_state)
    if hasattr(model_or_state, "encoder_state_dict"):
        return model_or_state.encoder_state_dict()
    if isinstance(model_or_state, nn.Module):
        return model_or_state.state_dict()
    raise TypeError("export_encoder needs a SparKModel, an nn.Module or a state dict, "
                    f"got {type(model_or_state).__name__}")


def export_encoder(model_or_state, path: str | os.PathLike, *, arch: str,
                   extra_metadata: dict | None = None) -> None:
    """Write the encoder weights (timm key space) and metadata to a safetensors file.

    ``model_or_state``: a :class:`~mwm.pretrain.spark.SparKModel` (its
    ``encoder_state_dict()``), a plain timm model, or a state dict. Tensors are saved
    contiguous, on the CPU, in their own dtype. The file is written atomically.
    """
    from safetensors.torch import save_file

    import timm

    from .. import __version__

    state = {k: v.detach().to("cpu").contiguous() for k, v in _state_of(model_or_state).items()}
    metadata = {"format": FORMAT, "arch": str(arch), "mwm_version": __version__,
                "timm_version": timm.__version__}
    for key, value in (extra_metadata or {}).items():
        if value is None:
            continue
        metadata[str(key)] = value if isinstance(value, str) else json.dumps(value)
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(state, tmp, metadata=metadata)
    os.replace(tmp, path)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of an exported encoder, JSON values decoded."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            raw = handle.metadata() or {}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise DataError(f"{path}: not a readable safetensors file ({err}).") from err
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("format", "arch", "mwm_version", "timm_version"):
            out[key] = value
            continue
        try:
            out[key] = json.loads(value)
        except (TypeError, ValueError):
            out[key] = value
    return out


def _classifier_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the model's classifier head (allowed to be missing)."""
    keys: set[str] = set()
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(classifier, nn.Module):
        ids = {id(p) for p in classifier.state_dict(keep_vars=True).values()}
        for name, tensor in model.state_dict(keep_vars=True).items():
            if id(tensor) in ids:
                keys.add(name)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier")
    if isinstance(names, str):
        names = (names,)
    for name in names or ():
        keys.update({f"{name}.weight", f"{name}.bias"})
    return keys


def _list(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")


def key_problems(own: dict, state: dict, *, may_miss=lambda key: False,
                 may_add=lambda key: False) -> list[str]:
    """Readable parts of a state-dict mismatch message; [] when ``state`` fits ``own``.

    Shared by every strict loader. ``may_miss(key)``: keys of ``own`` that ``state`` may
    lack (a classifier head, BatchNorm counters); ``may_add(key)``: keys of ``state`` that
    ``own`` may lack.
    """
    missing = [k for k in own if k not in state and not may_miss(k)]
    unexpected = [k for k in state if k not in own and not may_add(k)]
    mismatched = [f"{k} {tuple(state[k].shape)}≠{tuple(own[k].shape)}" for k in state
                  if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                        ("shape mismatches", mismatched)):
        if keys:
            parts.append(f"{label}: {_list(keys)}")
    return parts


def load_encoder(path: str | os.PathLike, arch: str | None = None, num_classes: int = 0,
                 **timm_kwargs) -> nn.Module:
    """A timm model (``pretrained=False``) with the exported weights loaded.

    ``arch`` defaults to the one in the file's metadata. Strict for the backbone: only the
    classifier head may be missing (it keeps timm's initialization); any other missing,
    unexpected or mis-shaped key raises :class:`~mwm.data.io.DataError` naming them.
    A ViT export (metadata ``patch_size``) is built with its ``patch_size`` and
    ``img_size=input_size`` unless ``timm_kwargs`` say otherwise; at another ``img_size``
    the position embeddings are resampled (:func:`fit_pos_embed`).
    """
    import timm

    meta = read_metadata(path)
    saved_arch = meta.get("arch")
    arch = arch or saved_arch
    if not arch:
        raise DataError(f"{path}: no arch in the file's metadata; pass arch=...")
    vit = meta.get("patch_size") is not None
    if vit:  # a ViT is built at the export's patch and (unless given) image size
        saved = {"patch_size": meta["patch_size"], "img_size": meta.get("input_size")}
        timm_kwargs = {**{k: v for k, v in saved.items() if v is not None}, **timm_kwargs}
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **timm_kwargs)
    except RuntimeError as err:
        raise DataError(f"{path}: cannot create timm model {arch!r} ({err}).") from err
    state = checkpoint.read_safetensors(path)
    if vit:
        state, _ = fit_pos_embed(model, state, str(path))
    own = model.state_dict()
    parts = key_problems(own, state, may_miss=_classifier_keys(model).__contains__)
    if parts:
        hint = (f" The file was exported for {saved_arch!r}." if saved_arch and saved_arch != arch
                else "")
        raise DataError(f"{path}: the weights do not match timm model {arch!r} — "
                        + "; ".join(parts) + "." + hint)
    model.load_state_dict(state, strict=False)
    return model


def _grid(tokens: int, what: str) -> tuple[int, int]:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise DataError(f"{what}: pos_embed holds {tokens} patch positions, not a square grid; "
                        "cannot resample it.")
    return side, side


def fit_pos_embed(model: nn.Module, state: dict, source: str = "the weights") -> tuple[dict, str | None]:
    """``(state, note)``: ``state`` with its ``pos_embed`` resampled (timm's
    ``resample_abs_pos_embed``) to ``model``'s patch grid when only the grid differs, and
    a note saying so (None when nothing was done). A differing patch size or width is
    left for the strict loader to report."""
    from timm.layers import resample_abs_pos_embed

    old = state.get("pos_embed")
    if old is None or not hasattr(model, "patch_embed"):
        return state, None
    own, proj = model.state_dict(), "patch_embed.proj.weight"
    target = own.get("pos_embed")
    if (target is None or old.shape == target.shape or old.shape[-1] != target.shape[-1]
            or proj not in state or state[proj].shape != own[proj].shape):
        return state, None
    prefix = 0 if getattr(model, "no_embed_class", False) else int(model.num_prefix_tokens)
    old_grid = _grid(old.shape[1] - prefix, source)
    new_grid = tuple(int(g) for g in model.patch_embed.grid_size)
    resampled = resample_abs_pos_embed(old, new_size=list(new_grid), old_size=list(old_grid),
                                       num_prefix_tokens=prefix)
    note = (f"pos_embed resampled from a {old_grid[0]}x{old_grid[1]} to a "
            f"{new_grid[0]}x{new_grid[1]} patch grid (bicubic)")
    return {**state, "pos_embed": resampled.to(old.dtype)}, note


def is_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a safetensors file MWM wrote (``mwm export`` replaces only those
    without ``--overwrite``; reads the header only, never unpickles)."""
    if not Path(path).is_file():
        return False
    try:
        return str(read_metadata(path).get("format", "")).startswith("mwm-encoder")
    except DataError:
        return False
