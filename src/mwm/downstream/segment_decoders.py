"""The decoders of ``mwm segment``: a UNet-style decoder over a CNN's feature pyramid, and
for a ViT a UNETR-style (2-D) neck that first makes a pyramid from four block outputs.

CNN: timm's ``forward_intermediates`` gives every stage's map (strides 2-32 for a ResNet);
:class:`UNetDecoder` upsamples from the deepest, concatenating each shallower one.
ViT: the token maps (stride P) of four evenly spaced blocks (the last one included) are
brought to strides P/8, P/4, P/2 and P by transposed 2x2 convolutions (ViTDet's
resampler, :func:`mwm.downstream.vit.resampler`), then decoded by the same
:class:`UNetDecoder`, so a ViT decodes progressively from the stride-P map as in UNETR.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import DataError
from .vit import resampler, is_vit_model, patch_size_of

__all__ = ["SegNet", "UNetDecoder"]


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = list(self.encoder.forward_intermediates(x, indices=self.indices,
                                                           intermediates_only=True))
        if self.neck is not None:
            features = [level(f) for level, f in zip(self.neck, features)]
        return self.decoder(features, x.shape[-2:])
