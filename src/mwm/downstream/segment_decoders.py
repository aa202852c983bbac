"""The model of ``mwm segment``: the timm encoder (:func:`build_encoder`), a UNet-style
decoder over a CNN's feature pyramid, and for a ViT a UNETR-style (2-D) neck that first
makes a pyramid from four block outputs.

CNN: timm's ``forward_intermediates`` gives every stage's map (strides 2-32 for a ResNet);
:class:`UNetDecoder` upsamples from the deepest, concatenating each shallower one.
ViT: the token maps (stride P) of four evenly spaced blocks (the last one included) are
brought to strides P/8, P/4, P/2 and P by transposed 2x2 convolutions (ViTDet's
resampler, :func:`mwm.downstream.vit.resampler`), then decoded by the same
:class:`UNetDecoder`, so a ViT decodes progressively from the stride-P map as in UNETR.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import DataError
from ..pretrain.config import DEFAULT_ENCODER
from .vit import check_grid, is_vit, is_vit_model, patch_size_of, resampler

if TYPE_CHECKING:
    from .segment import SegmentConfig

__all__ = ["SegNet", "UNetDecoder", "build_encoder"]


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class UNetDecoder(nn.Module):
    """From the deepest pyramid level up: upsample to the next level's size, concatenate
    it, two 3x3 conv-BN-ReLU; finally upsample to the input size and a 1x1 conv to the
    class logits."""

    def __init__(self, channels: list[int], width: int, num_classes: int):
        super().__init__()
        deepest, *skips = channels[::-1]
        self.blocks = nn.ModuleList()
        cin = deepest
        for skip in skips:
            self.blocks.append(nn.Sequential(_conv(cin + skip, width), _conv(width, width)))
            cin = width
        self.head = nn.Conv2d(cin, num_classes, 1)

    def forward(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        x, *skips = features[::-1]
        for block, skip in zip(self.blocks, skips):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(F.interpolate(x, size=size, mode="bilinear", align_corners=False))


def vit_neck(encoder: nn.Module, width: int) -> tuple[list[int], nn.ModuleList, list[int]]:
    """(block indices, one resampler + 1x1 projection per level, level widths) of a ViT."""
    patch, depth = patch_size_of(encoder), len(encoder.blocks)
    if patch & (patch - 1) or patch < 8:
        raise DataError(f"mwm segment with a ViT needs a power-of-two patch size of at least 8 "
                        f"(the decoder's strides are P/8 to P); this one has {patch}.")
    indices = sorted({max(0, depth * k // 4 - 1) for k in (1, 2, 3, 4)})
    while len(indices) < 4:  # a ViT of fewer than 4 blocks: repeat the last one
        indices.append(depth - 1)
    levels = nn.ModuleList()
    for stride in (patch // 8, patch // 4, patch // 2, patch):
        resample, w = resampler(encoder.embed_dim, patch, stride)
        levels.append(nn.Sequential(resample, nn.Conv2d(w, width, 1)))
    return indices, levels, [width] * 4


class SegNet(nn.Module):
    """A timm encoder (``encoder``: its keys as in the classifier), a ViT's ``neck`` (none
    for a CNN) and a :class:`UNetDecoder`. ``frozen``: the encoder neither trains nor
    updates its BatchNorm statistics (the probe)."""

    def __init__(self, encoder: nn.Module, width: int, num_classes: int, frozen: bool):
        super().__init__()
        self.encoder = encoder
        self.frozen = frozen
        self.indices, self.neck = None, None
        if is_vit_model(encoder):
            self.indices, self.neck, channels = vit_neck(encoder, width)
        else:
            channels = [info["num_chs"] for info in encoder.feature_info]
        self.decoder = UNetDecoder(channels, width, num_classes)
        if frozen:
            encoder.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:  # a probe keeps the encoder's BatchNorm statistics as loaded
            self.encoder.eval()
        return self

    def freeze_unused(self, input_size: int) -> list[str]:
        """Stop training the encoder parameters the decoder never reads (a ViT's final norm,
        a ConvNeXt's or EfficientNet's head): they get no gradient, which DDP refuses, and
        the optimizer skips them anyway. Found by one backward pass of a zero image in eval
        mode (no BatchNorm statistic or random number is touched); returns their names."""
        was_training = self.training
        self.eval()
        with torch.enable_grad():
            self(torch.zeros(1, 3, input_size, input_size)).sum().backward()
        unused = []
        for name, param in self.named_parameters():
            if param.requires_grad and param.grad is None:
                param.requires_grad_(False)
                unused.append(name)
            param.grad = None
        self.train(was_training)
        return unused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = list(self.encoder.forward_intermediates(x, indices=self.indices,
                                                           intermediates_only=True))
        if self.neck is not None:
            features = [level(f) for level, f in zip(self.neck, features)]
        return self.decoder(features, x.shape[-2:])


def build_encoder(cfg: SegmentConfig, meta: dict) -> tuple[nn.Module, str]:
    """The timm encoder without its head; a ViT at ``input_size`` with the weights' patch
    size (``patch_size`` must agree)."""
    import timm

    arch = cfg.model or meta.get("arch") or DEFAULT_ENCODER
    kwargs = {}
    if is_vit(arch):
        saved = meta.get("patch_size")
        if cfg.patch_size and saved and int(saved) != cfg.patch_size:
            raise DataError(f"--patch-size {cfg.patch_size}: the weights ({cfg.weights}) were "
                            f"made with patch size {saved}; pass --patch-size {saved}.")
        patch = cfg.patch_size or saved
        kwargs = {"img_size": cfg.input_size, **({"patch_size": int(patch)} if patch else {})}
    try:
        encoder = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    except RuntimeError as err:
        raise DataError(f"--model {arch}: cannot create the timm model ({err}).") from err
    if kwargs:
        check_grid(encoder, cfg.input_size)
    if not hasattr(encoder, "forward_intermediates"):
        raise DataError(f"--model {arch}: timm gives no feature maps for it.")
    return encoder, arch
