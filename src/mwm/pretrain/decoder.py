"""SparK's light UNet decoder.

``n = log2(patch_size)`` upsampling blocks (5 for a stride-32 encoder). Block ``i`` maps
``widths[i]`` to ``widths[i+1]`` channels, doubling the resolution:
``ConvTranspose2d(cin, cin, 4, 2, 1)`` → ``Conv3x3(cin, cin)``-BN-ReLU6 →
``Conv3x3(cin, cout)``-BN, with ``widths[i] = width / 2**i``. The densified encoder
feature of scale ``i`` (smallest first) is added to the input of block ``i``; a final
``Conv1x1`` maps to the 3 image channels.

The decoder does not depend on the mask cell (``SparKModel(mask_patch=...)``): it
upsamples by the encoder stride, and a finer mask reaches it through the densified
features (mask tokens where a scale's position is masked) and the loss.

Initialization as SparK's decoder: convolutions truncated-normal (std 0.02, zero bias),
transposed convolutions Kaiming-normal, BN weight 1 / bias 0. The densify projections
(in :class:`~mwm.pretrain.spark.SparKModel`) keep PyTorch's default convolution
initialization, as SparK's do.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["LightDecoder", "UNetBlock", "decoder_widths"]

MIN_WIDTH = 8


def decoder_widths(width: int, n_blocks: int) -> list[int]:
    """``[width, width/2, ..., width/2**n_blocks]`` (never below ``MIN_WIDTH``)."""
    return [max(width // 2 ** i, MIN_WIDTH) for i in range(n_blocks + 1)]


def _bn(channels: int, sbn: bool) -> nn.Module:
    if not sbn:
        return nn.BatchNorm2d(channels)
    # A synchronized BN that also works with the gloo backend on CPU (nn.SyncBatchNorm
    # needs a GPU); same state-dict keys as BatchNorm2d.
    from .sparse import sparse_batchnorm

    return sparse_batchnorm(channels, None, sync=True)


class UNetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, sbn: bool = False):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin, kernel_size=4, stride=2, padding=1, bias=True)
        self.conv = nn.Sequential(
            nn.Conv2d(cin, cin, kernel_size=3, stride=1, padding=1, bias=False), _bn(cin, sbn),
            nn.ReLU6(inplace=True),
            nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1, bias=False), _bn(cout, sbn),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.up(x))


class LightDecoder(nn.Module):
    """Decode densified features (smallest first) to a (B, 3, H, W) image."""

    def __init__(self, upsample_ratio: int, width: int = 768, *, sbn: bool = False,
                 out_channels: int = 3):
        super().__init__()
        n = int(round(math.log2(upsample_ratio)))
        if 2 ** n != upsample_ratio:
            raise ValueError(f"the decoder needs a power-of-two upsampling ratio, got {upsample_ratio}")
        self.upsample_ratio = upsample_ratio
        self.widths = decoder_widths(width, n)
        self.blocks = nn.ModuleList(UNetBlock(self.widths[i], self.widths[i + 1], sbn) for i in range(n))
        self.proj = nn.Conv2d(self.widths[-1], out_channels, kernel_size=1, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.ConvTranspose2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, features: list[torch.Tensor | None]) -> torch.Tensor:
        if not features or features[0] is None:
            raise ValueError("the decoder needs the smallest-scale feature map")
        x = features[0]
        for i, block in enumerate(self.blocks):
            if 0 < i < len(features) and features[i] is not None:
                x = x + features[i]
            x = block(x)
        return self.proj(x)
