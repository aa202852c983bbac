"""Vision Transformers downstream: which models are ViTs, their layer ids for layer-wise lr
decay, position embeddings resampled to another input size, and the simple feature
pyramid that puts a ViT under Mask R-CNN.

* :func:`is_vit` — a timm ``vision_transformer`` / ``deit`` architecture (``vit_*``,
  ``deit_*``, MAE tags included); :func:`is_vit_model`, :func:`looks_like_vit` for a model or a state dict.
* :func:`layer_id` — MAE fine-tuning's layer ids: ``cls_token``, ``pos_embed``,
  ``patch_embed`` (and ``reg_token`` / ``norm_pre``) = 0, ``blocks.i`` = ``i + 1``,
  everything after the blocks (final ``norm``, ``fc_norm``, ``head``) = ``depth + 1``.
* :func:`fit_pos_embed` — timm's ``resample_abs_pos_embed`` (bicubic, prefix tokens
  kept) when the weights' patch grid differs from the model's.
* :class:`ViTBackbone` — ViTDet's simple feature pyramid over the last block's stride-P
  token map: ``(B, C, H/P, W/P)`` resampled to strides 4, 8, 16, 32 (transposed 2x2
  convolutions for finer levels, max-pooling for coarser), each through a 1x1 and a 3x3
  convolution (LayerNorm after each) to the FPN width, plus ``pool`` (stride 64, a
  stride-2 max-pool of the coarsest): the interface of torchvision's ``BackboneWithFPN``
  (``body``, ``fpn``, ``out_channels``, an ordered dict ``0``-``3``, ``pool``).
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict

import torch
from torch import nn

from ..errors import DataError
from ..pretrain.export import fit_pos_embed

__all__ = ["is_vit", "is_vit_model", "looks_like_vit", "layer_id", "layer_ids",
           "fit_pos_embed", "patch_size_of", "ViTBackbone", "SimpleFeaturePyramid",
           "PYRAMID_STRIDES"]

#: Strides of the pyramid levels ``0``-``3`` (those of a ResNet-FPN, so the same anchors
#: and RoI heads fit); ``pool`` is twice the last.
PYRAMID_STRIDES = (4, 8, 16, 32)
FPN_WIDTH = 256
VIT_MODULES = ("vision_transformer", "deit")
_EMBED = re.compile(r"^(cls_token|reg_token|dist_token|pos_embed|patch_embed|norm_pre)\b")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def is_vit(arch: str | None) -> bool:
    """Whether ``arch`` names a model of timm's ``vision_transformer`` or ``deit`` modules
    (tags such as ``.mae`` allowed): a ``VisionTransformer``, asked of timm's registry
    without building the model."""
    if not arch:
        return False
    from timm.models import is_model_in_modules

    return bool(is_model_in_modules(str(arch), VIT_MODULES))


def is_vit_model(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def looks_like_vit(state) -> bool:
    """Whether a state dict holds ViT weights (a patch embedding and position embeddings)."""
    return "patch_embed.proj.weight" in state and "pos_embed" in state


def patch_size_of(model: nn.Module) -> int:
    return int(model.patch_embed.patch_size[0])


# --------------------------------------------------------------------------- layer decay

def layer_id(name: str, depth: int) -> int:
    """MAE's layer id of parameter ``name`` of a ViT with ``depth`` blocks (see above)."""
    if _EMBED.match(name):
        return 0
    block = _BLOCK.match(name)
    return int(block.group(1)) + 1 if block else depth + 1


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """``(parameter name → layer id, number of ids = depth + 2)`` of a timm ViT."""
    depth = len(model.blocks)
    return {n: layer_id(n, depth) for n, _ in model.named_parameters()}, depth + 2


# --------------------------------------------------------------------------- weights

def check_grid(model: nn.Module, input_size: int, flag: str = "--input-size") -> None:
    """Refuse an input size the ViT's patches do not tile."""
    patch = patch_size_of(model)
    if input_size % patch:
        raise DataError(f"{flag} {input_size} is not a multiple of the ViT's patch size {patch}; "
                        f"use e.g. {flag} {max(patch, input_size - input_size % patch)}.")


# --------------------------------------------------------------------------- detection

def resampler(width: int, patch: int, stride: int) -> tuple[nn.Module, int]:
    """The module taking the stride-``patch`` map to stride ``stride``, and its output width:
    ``log2(patch / stride)`` transposed 2x2 convolutions (LayerNorm + GELU between, each
    halving the width, as ViTDet), nothing, or a ``stride / patch`` max-pool."""
    from timm.layers import LayerNorm2d

    if stride == patch:
        return nn.Identity(), width
    if stride > patch:
        return nn.MaxPool2d(stride // patch, stride // patch), width
    layers: list[nn.Module] = []
    for k in range(int(math.log2(patch // stride))):
        if k:
            layers += [LayerNorm2d(width), nn.GELU()]
        layers.append(nn.ConvTranspose2d(width, width // 2, 2, stride=2))
        width //= 2
    return nn.Sequential(*layers), width


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid over one stride-``patch`` map of ``width`` channels."""

    def __init__(self, width: int, patch: int, out_channels: int = FPN_WIDTH,
                 strides=PYRAMID_STRIDES):
        from timm.layers import LayerNorm2d

        super().__init__()
        if patch & (patch - 1) or patch > max(strides):
            raise DataError(f"detection with a ViT needs a power-of-two patch size up to "
                            f"{max(strides)} (the pyramid's strides are {strides}); this one "
                            f"has patch size {patch}.")
        self.levels = nn.ModuleList()
        for stride in strides:
            resample, w = resampler(width, patch, stride)
            self.levels.append(nn.Sequential(
                resample, nn.Conv2d(w, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                LayerNorm2d(out_channels)))
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        out = OrderedDict((str(i), level(x)) for i, level in enumerate(self.levels))
        out["pool"] = nn.functional.max_pool2d(out[str(len(self.levels) - 1)], 1, 2, 0)
        return out


class ViTBackbone(nn.Module):
    """A timm ViT (``body``, ``dynamic_img_size``) + :class:`SimpleFeaturePyramid`
    (``fpn``): the final-norm tokens of the last block as a ``(B, C, H/P, W/P)`` map."""

    def __init__(self, body: nn.Module, out_channels: int = FPN_WIDTH):
        super().__init__()
        self.body = body
        self.fpn = SimpleFeaturePyramid(body.embed_dim, patch_size_of(body), out_channels)
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        tokens = self.body.forward_intermediates(images, indices=1, norm=True,
                                                 intermediates_only=True)[-1]
        return self.fpn(tokens)
