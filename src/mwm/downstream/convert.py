"""Pretrained ResNet weights in three key spaces: timm, torchvision and Detectron2.

MWM pretraining exports the encoder in **timm** key space (``run/encoder.safetensors``,
see :mod:`mwm.pretrain.export`). This module renames those weights for the two
detection code bases:

* **torchvision** (``torchvision.models.resnet*`` and the ``backbone.body`` of
  ``torchvision.models.detection.maskrcnn_resnet50_fpn``): the names are the same as
  timm's for the plain ResNet family (``conv1``, ``bn1``, ``layerN.M.convK/bnK``,
  ``downsample.0/1``); the classifier ``fc`` is dropped. Supported: resnet18/34/50/101/152,
  resnext50_32x4d, resnext101_32x8d/64x4d, wide_resnet50_2/101_2 (any timm pretrained tag).
* **Detectron2** (the SparK ``convert-timm-to-d2.py`` rules): ``conv1/bn1`` →
  ``stem.conv1`` / ``stem.conv1.norm``, ``layerN`` → ``res(N+1)``, ``bnK`` →
  ``convK.norm``, ``downsample.0/1`` → ``shortcut`` / ``shortcut.norm``; the file is a
  pickle of ``{"model": {key: numpy array}, "__author__": "MWM",
  "matching_heuristics": True}`` for ``MODEL.WEIGHTS``. BN ``num_batches_tracked``
  counters are not written (Detectron2 has no such buffer).

Deep-stem / average-pool-shortcut variants (``resnet10t``, ``resnet*d``, ``*t``,
``*s``) have a three-convolution stem and ``downsample.1/2``: neither torchvision nor
Detectron2's standard ``ResNet`` has those layers, and the conversion refuses them with a
:class:`~mwm.data.io.DataError` instead of silently dropping weights. Vision
Transformers have no torchvision or Detectron2 ResNet counterpart at all: those two
formats refuse them (``DataError`` naming the arch and ``timm``); the ``timm`` format
writes them with their metadata (``input_size``, ``patch_size``, ...).

Sources accepted by :func:`load_timm_state` / :func:`export_weights`: an MWM encoder
export (``.safetensors``, with metadata), an MWM pretraining checkpoint
(``checkpoint.pt`` or its run folder; the ``encoder.model.`` weights are taken), or a
plain ``.pth`` holding a timm state dict (possibly under ``state_dict`` / ``state`` /
``module`` / ``model``, with a ``module.`` or ``module.encoder_q.`` prefix, as SparK's
converter accepts).
"""

from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from .. import checkpoint
from ..config import opt
from ..errors import DataError
from ..files import atomic_path
from ..pretrain.export import key_problems
from .vit import is_vit, looks_like_vit

__all__ = [
    "FORMATS", "TORCHVISION_ARCHS", "torchvision_arch", "check_plain_resnet", "unwrap_state",
    "timm_to_torchvision", "torchvision_to_timm", "timm_to_detectron2", "detectron2_to_timm",
    "load_timm_state", "load_into_backbone", "export_weights", "read_detectron2",
]

FORMATS = ("timm", "torchvision", "detectron2")

#: timm architecture names whose weights map one-to-one onto a torchvision ResNet.
TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                     "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
                     "wide_resnet50_2", "wide_resnet101_2")

_HEAD_PREFIXES = ("fc.", "head.", "classifier.")


def torchvision_arch(arch: str) -> str:
    """The torchvision ResNet name for a timm architecture (``resnet50.a1_in1k`` →
    ``resnet50``); a :class:`DataError` for variants torchvision does not have."""
    base = str(arch).split(".", 1)[0]
    if base not in TORCHVISION_ARCHS:
        raise DataError(
            f"timm model {arch!r} has no torchvision equivalent: torchvision's Mask R-CNN "
            f"backbones are {', '.join(TORCHVISION_ARCHS)}. Deep-stem and avg-pool-shortcut "
            "variants (resnet10t, resnet*d, *t, *s) have layers (conv1.0/1.3/1.6, "
            "downsample.1/2) that torchvision's ResNet lacks; pretrain a plain ResNet "
            "(e.g. --model resnet50) for detection.")
    return base


# --------------------------------------------------------------------------- sources

def unwrap_state(obj: Any) -> dict[str, torch.Tensor]:
    """A timm-key state dict out of whatever a ``.pth``/checkpoint holds.

    Handles an MWM pretraining checkpoint (``{"model": SparKModel state}``: the
    ``encoder.model.`` weights), and the SparK wrappers ``state_dict`` / ``state`` /
    ``module`` / ``model`` with ``module.`` / ``module.encoder_q.`` prefixes; an MAE
    checkpoint's ViT sits under ``encoder.``.
    """
    state = obj
    for _ in range(3):
        if not isinstance(state, Mapping):
            break
        if all(isinstance(v, torch.Tensor) for v in state.values()) and state:
            break
        for key in ("model", "state_dict", "state", "module"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
        else:
            break
    if not isinstance(state, Mapping) or not state:
        raise DataError("no state dict found (expected tensors, or a dict holding them under "
                        "'model', 'state_dict', 'state' or 'module').")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    for prefix in ("encoder.model.", "module.encoder_q.", "encoder_q.", "module.", "encoder."):
        picked = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if prefix == "encoder.model.":
            fits = "conv1.weight" in picked or "conv1.0.weight" in picked
        else:  # an MAE checkpoint's ViT sits under "encoder."
            fits = prefix != "encoder." or looks_like_vit(picked)
        if picked and fits:
            tensors = picked
            break
    return tensors


def load_timm_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(timm state dict, metadata)`` from an MWM export, pretraining checkpoint or .pth.

    Metadata carries ``arch``, ``mean``, ``std``, ``input_size`` where the source has them
    (an export's metadata; a checkpoint's saved fields). A missing file is a
    :class:`DataError`.
    """
    path = Path(path)
    if path.is_dir():
        for name in ("encoder.safetensors", "checkpoint.pt"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise DataError(f"{path}: no encoder.safetensors or checkpoint.pt in this folder.")
    if not path.is_file():
        raise DataError(f"{path}: weights file not found. Pass an MWM encoder export "
                        "(run/encoder.safetensors), a pretraining checkpoint or a timm .pth.")
    if path.suffix == ".safetensors":
        from ..pretrain.export import read_metadata

        state = checkpoint.read_safetensors(path)
        return dict(state), read_metadata(path)
    obj = checkpoint.read(path)
    meta: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        for key in ("arch", "mean", "std", "input_size"):
            if key in obj and obj[key] is not None:
                meta[key] = obj[key]
        config = obj.get("config")
        if "arch" not in meta and isinstance(config, Mapping):
            if config.get("model"):
                meta["arch"] = config["model"]
        if isinstance(config, Mapping) and config.get("patch_size"):
            meta["patch_size"] = config["patch_size"]  # a ViT's (MAE checkpoint)
    try:
        state = unwrap_state(obj)
    except DataError as err:
        raise DataError(f"{path}: {err}") from err
    return state, meta


# --------------------------------------------------------------------------- key mappings

_DEEP_STEM = re.compile(r"^conv1\.\d+\.|\.downsample\.2\.")


def check_plain_resnet(state: Mapping[str, Any], what: str = "the weights") -> None:
    """Refuse weights that are not a plain (torchvision-layout) ResNet."""
    deep = sorted(k for k in state if _DEEP_STEM.search(k))
    if deep:
        raise DataError(
            f"{what} are a deep-stem / avg-pool-shortcut ResNet variant (keys such as "
            f"{', '.join(deep[:3])}); torchvision and Detectron2's standard ResNet have no "
            "such layers. Pretrain a plain ResNet (resnet18/34/50/101/152, resnext, "
            "wide_resnet) for detection.")
    if "conv1.weight" not in state or not any(k.startswith("layer1.") for k in state):
        sample = ", ".join(sorted(state)[:4])
        raise DataError(f"{what} are not a timm ResNet state dict (no conv1.weight / "
                        f"layer1.*; first keys: {sample}).")


def timm_to_torchvision(state: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """timm ResNet keys → torchvision ResNet keys (identical names; ``fc`` dropped).

    ``prefix`` is prepended (``"backbone.body."`` for a whole torchvision Mask R-CNN)."""
    check_plain_resnet(state)
    return {prefix + k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}


def torchvision_to_timm(state: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Inverse of :func:`timm_to_torchvision` (keys under ``prefix``; ``fc`` dropped)."""
    return {k[len(prefix):]: v for k, v in state.items()
            if k.startswith(prefix) and not k[len(prefix):].startswith(_HEAD_PREFIXES)}


_BN_BUFFER = ".num_batches_tracked"


def _d2_key(key: str) -> str | None:
    if key.endswith(_BN_BUFFER) or key.startswith(_HEAD_PREFIXES):
        return None
    if not key.startswith("layer"):
        key = "stem." + key
    key = re.sub(r"^layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", key)
    key = re.sub(r"(^|\.)bn(\d)\.", r"\1conv\2.norm.", key)
    key = key.replace(".downsample.0.", ".shortcut.").replace(".downsample.1.", ".shortcut.norm.")
    return key


def timm_to_detectron2(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """timm ResNet keys → Detectron2 keys, values as float numpy arrays (see module doc)."""
    check_plain_resnet(state)
    out: dict[str, Any] = {}
    for key, value in state.items():
        new = _d2_key(key)
        if new is None:
            continue
        if new in out:
            raise DataError(f"two weights map to the Detectron2 key {new!r}")
        out[new] = value.detach().to("cpu").numpy()
    return out


def detectron2_to_timm(model: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`timm_to_detectron2` (no ``num_batches_tracked`` buffers)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model.items():
        k = key[len("stem."):] if key.startswith("stem.") else key
        k = re.sub(r"^res(\d)", lambda m: f"layer{int(m.group(1)) - 1}", k)
        k = k.replace(".shortcut.norm.", ".downsample.1.").replace(".shortcut.", ".downsample.0.")
        k = re.sub(r"(^|\.)conv(\d)\.norm\.", r"\1bn\2.", k)
        out[k] = torch.as_tensor(value)
    return out


# --------------------------------------------------------------------------- loading

def load_into_backbone(body: torch.nn.Module, state: Mapping[str, torch.Tensor], *,
                       source: str = "the weights") -> list[str]:
    """Load timm ResNet weights into a torchvision ResNet body, strictly.

    ``body``: a torchvision ResNet or the ``backbone.body`` of a detection model
    (IntermediateLayerGetter; FrozenBatchNorm2d or BatchNorm2d). Every parameter and
    buffer of ``body`` must be provided with the right shape — except the
    ``num_batches_tracked`` counters, which are zeroed when absent — and no weight other
    than the classifier may be left over; otherwise a :class:`DataError` names the keys.
    Returns the list of keys loaded.
    """
    mapped = timm_to_torchvision(state)
    own = body.state_dict()
    counter = lambda key: key.endswith(_BN_BUFFER)  # noqa: E731 - zeroed when absent
    parts = key_problems(own, mapped, may_miss=counter, may_add=counter)
    if parts:
        raise DataError(f"{source} do not fit the detection backbone — " + "; ".join(parts)
                        + ". Check that --model matches the architecture the weights were "
                        "pretrained with.")
    take = {k: v for k, v in mapped.items() if k in own}
    for key in own:
        if key.endswith(_BN_BUFFER) and key not in take:
            take[key] = torch.zeros_like(own[key])
    body.load_state_dict(take, strict=True)
    return sorted(take)


# --------------------------------------------------------------------------- export

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only what a Detectron2 weights file holds: dicts, strings, numbers and
    numpy arrays. Any other object is refused, because unpickling it could run code."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),  # protocol 2 bytes
               ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"),
               ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "_reconstruct")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"it holds objects other than numpy arrays and plain containers (here "
            f"{module}.{name}), which MWM refuses to unpickle because that could run code")


def read_detectron2(path: str | os.PathLike) -> dict[str, Any]:
    """Read a Detectron2 ``.pkl`` written by :func:`export_weights` (arrays only)."""
    with open(path, "rb") as handle:
        try:
            return _ArrayUnpickler(handle).load()
        except (pickle.UnpicklingError, EOFError, ValueError) as err:
            raise DataError(f"{path}: not a usable Detectron2 weights file: {err}.") from None


@dataclass(kw_only=True)
class ExportConfig:
    """Settings of ``mwm export``."""

    encoder: str = opt(help="MWM encoder.safetensors, pretrain checkpoint/run folder, or timm "
                       ".pth", positional=True)
    out: str = opt(help="the output file")
    format: str = opt(FORMATS[0], "key names to write", choices=FORMATS)
    model: str | None = opt(None, "architecture (default: from the file)")
    quiet: bool = opt(False, "no progress output")


def export_weights(src_path: str | os.PathLike, out_path: str | os.PathLike,
                   fmt: str = FORMATS[0], *, arch: str | None = None) -> dict[str, Any]:
    """Convert pretrained weights to ``fmt`` (``timm``, ``torchvision`` or ``detectron2``).

    Reads an MWM export / pretraining checkpoint / timm ``.pth`` (:func:`load_timm_state`)
    and writes, atomically: ``timm`` — safetensors in timm key space (the MWM export
    format, metadata kept); ``torchvision`` — safetensors in torchvision ResNet key space
    (load with ``resnet.load_state_dict(sd, strict=False)`` (only ``fc`` missing) or
    :func:`load_into_backbone`); ``detectron2`` — a ``.pkl`` for ``MODEL.WEIGHTS``.
    Returns a summary (format, arch, path, number of tensors). A ViT (by ``arch`` or by
    its keys) is refused by ``torchvision`` and ``detectron2``, naming ``timm``, which
    holds it.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    state, meta = load_timm_state(src_path)
    arch = arch or meta.get("arch")
    if arch:
        meta["arch"] = arch
    if fmt != "timm" and (is_vit(arch) or looks_like_vit(state)):
        raise DataError(
            f"{src_path}: {arch or 'the encoder'} is a Vision Transformer; the {fmt} format "
            f"holds {'torchvision' if fmt == 'torchvision' else 'Detectron2'} ResNet key names "
            "and cannot hold it. Use --format timm (safetensors in timm key space, metadata "
            "kept; loads with timm.create_model(arch, num_classes=0, img_size=..., "
            "patch_size=..., pretrained_cfg_overlay=dict(file=...)) and in mwm finetune / "
            "mwm detect).")
    out_path = Path(out_path)
    extra = {k: v for k, v in meta.items()
             if k not in ("format", "arch", "mwm_version", "timm_version")}
    if fmt == "timm":
        from ..pretrain.export import export_encoder

        state = {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}
        export_encoder(state, out_path, arch=arch or "unknown", extra_metadata=extra)
        count = len(state)
    elif fmt == "torchvision":
        from safetensors.torch import save_file

        if arch:
            torchvision_arch(arch)
        mapped = {k: v.detach().to("cpu").contiguous() for k, v in timm_to_torchvision(state).items()}
        metadata = {"format": "mwm-encoder-torchvision", "arch": str(arch or "unknown")}
        metadata.update({k: v if isinstance(v, str) else json.dumps(v)
                         for k, v in extra.items() if v is not None})
        with atomic_path(out_path) as tmp:
            save_file(mapped, os.fspath(tmp), metadata=metadata)
        count = len(mapped)
    else:
        model = timm_to_detectron2(state)
        payload = {"model": model, "__author__": "MWM", "matching_heuristics": True}
        with atomic_path(out_path) as tmp:
            with open(tmp, "wb") as handle:
                pickle.dump(payload, handle, protocol=pickle.HIGHEST_PROTOCOL)
        count = len(model)
    return {"format": fmt, "arch": arch, "path": str(out_path), "tensors": count}
