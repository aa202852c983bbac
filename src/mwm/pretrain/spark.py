"""The SparK model: mask → sparse encode → densify → decode → masked reconstruction loss.

One forward pass of :class:`SparKModel`, in the order of this file:

1. **Mask.** ``active_b1hw`` (bool (B, 1, H/m, W/m), True = visible cell, from
   :mod:`mwm.masking`; ``m = mask_patch``, by default the encoder stride ``p``) is
   upsampled to pixels; the encoder input is the image with the masked cells set to 0
   (in normalized space).
2. **Encode.** The timm backbone, converted by :func:`~mwm.pretrain.sparse.sparsify`,
   runs inside ``with self.context.active(active_b1hw)``: every convolution, pooling and
   normalization only "sees" visible positions (see ``sparse.py``), and the hierarchical
   features (strides 4..32) are zero at masked positions. A stage of stride ``s <= m``
   sees the mask cells repeated; a stage of stride ``s > m`` counts a position visible
   when any of its ``(s/m)²`` sub-cells is (docs/masking.md says why).
3. **Densify.** Features reversed (smallest first). At scale ``i``: a sparse norm over
   the visible positions (``bn`` for ResNet, ``ln`` for ConvNeXt, chosen by
   ``densify_norm='auto'``), masked positions (at a coarse scale: every sub-cell
   masked) filled with a learnable mask token
   (1, C_i, 1, 1) (truncated normal, std 0.02), then a projection conv to the decoder
   width of that scale (1x1 at the smallest scale, 3x3 otherwise; identity when a 1x1
   would map C to C). Decoder widths halve per scale.
4. **Decode.** :class:`~mwm.pretrain.decoder.LightDecoder` (``log2(p)`` upsampling blocks).
5. **Loss.** Input and reconstruction patchified into mask cells (B, N_cells, 3·m·m); with
   ``norm_pix_loss`` the target is each patch normalized by its own mean and (unbiased)
   variance, eps 1e-6; the per-cell MSE is averaged over the **masked cells only**.
   The loss is computed in float32 (also under autocast). The per-cell errors are also
   returned (``cell_loss_bn``, detached) for ``--masking loss-guided``.

The output also carries a reconstruction for figures (per-patch normalization undone
with the input patch statistics, visible cells pasted from the input) and the masked
input; both are detached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..masking import upsample_cells
from .decoder import LightDecoder
from .encoders import Encoder, create_encoder
from .sparse import SparseContext, sparse_batchnorm, sparse_layernorm2d, sparsify

__all__ = ["SparKModel", "SparKOutput", "patchify", "unpatchify", "masked_patch_loss",
           "patch_losses", "masked_mean", "default_decoder_width", "DENSIFY_NORMS"]

DENSIFY_NORMS = ("auto", "bn", "ln", "identity")
NORM_PIX_EPS = 1e-6
SPARK_DECODER_WIDTH = 768


@dataclass
class SparKOutput:
    """``loss``: scalar (float32), mean reconstruction error over the masked cells.
    ``reconstruction_b3hw``: detached, in the input's (normalized) image space, visible
    cells copied from the input. ``masked_input_b3hw``: detached input, masked cells 0.
    ``cell_loss_bn``: detached float32 (B, N_cells), every cell's error (the loss averages
    the masked ones; ``--masking loss-guided`` keeps them)."""

    loss: torch.Tensor
    reconstruction_b3hw: torch.Tensor
    masked_input_b3hw: torch.Tensor
    cell_loss_bn: torch.Tensor | None = None


def default_decoder_width(last_channels: int) -> int:
    """SparK's 768 for large encoders (last stage ≥ 768 channels: ResNet-50+, ConvNeXt-T+);
    half the last-stage channels for small ones (resnet18/34/10t/14t → 256,
    convnext_atto → 160), which keeps the decoder's cost near the encoder's."""
    if last_channels >= SPARK_DECODER_WIDTH:
        return SPARK_DECODER_WIDTH
    return max(last_channels // 2, 32)


# --------------------------------------------------------------------------- patches

def patchify(x_bchw: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) → (B, (H/p)(W/p), p·p·C), cells in row-major order."""
    b, c, h, w = x_bchw.shape
    gh, gw = h // patch, w // patch
    x = x_bchw.reshape(b, c, gh, patch, gw, patch).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, gh * gw, patch * patch * c)


def unpatchify(x_bnd: torch.Tensor, patch: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b = x_bnd.shape[0]
    gh, gw = grid
    x = x_bnd.reshape(b, gh, gw, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, gh * patch, gw * patch)


def masked_patch_loss(reconstruction_b3hw: torch.Tensor, images_b3hw: torch.Tensor,
                      active_b1hw: torch.Tensor, patch: int, *, norm_pix_loss: bool = True):
    """Per-cell MSE against the (per-patch normalized) input, mean over masked cells.

    Returns ``(loss, mean_bn1, std_bn1)``, the patch statistics used for the target
    (zeros/ones without ``norm_pix_loss``).
    """
    l2_bn, mean, std = patch_losses(reconstruction_b3hw, images_b3hw, patch,
                                    norm_pix_loss=norm_pix_loss)
    return masked_mean(l2_bn, active_b1hw), mean, std


def patch_losses(reconstruction_b3hw: torch.Tensor, images_b3hw: torch.Tensor, patch: int, *,
                 norm_pix_loss: bool = True):
    """``(l2_bn, mean_bn1, std_bn1)``: every cell's MSE (float32 (B, N_cells), row-major
    cells) against its (per-patch normalized) target, and the target's patch statistics."""
    target = patchify(images_b3hw.float(), patch)
    pred = patchify(reconstruction_b3hw.float(), patch)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        std = (target.var(dim=-1, keepdim=True, unbiased=True) + NORM_PIX_EPS).sqrt()
        target = (target - mean) / std
    else:
        mean = torch.zeros_like(target[..., :1])
        std = torch.ones_like(target[..., :1])
    return (pred - target).pow(2).mean(dim=-1), mean, std


def masked_mean(l2_bn: torch.Tensor, active_b1hw: torch.Tensor) -> torch.Tensor:
    """The mean of the per-cell errors over the masked (not active) cells."""
    masked_bn = (~active_b1hw).flatten(1).to(l2_bn.dtype)
    return (l2_bn * masked_bn).sum() / (masked_bn.sum() + 1e-8)


# --------------------------------------------------------------------------- shared checks

def mask_grid(model, height: int | None = None, width: int | None = None) -> tuple[int, int]:
    """The mask grid of ``model`` (SparK or MAE: ``input_size``, ``mask_patch``) at a size."""
    h = model.input_size if height is None else height
    w = model.input_size if width is None else width
    return h // model.mask_patch, w // model.mask_patch


def checked_active(model, images_b3hw: torch.Tensor, active_b1hw: torch.Tensor,
                   divisor: str) -> torch.Tensor:
    """The visible mask as bool, after checking the images are (B, C, H, W) with H and W
    multiples of ``model.patch_size`` (named ``divisor`` in the message) and the mask is
    (B, 1) + the mask grid."""
    if images_b3hw.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(images_b3hw.shape)}")
    b, _, h, w = images_b3hw.shape
    p = model.patch_size
    if h % p or w % p:
        raise ValueError(f"input size {h}x{w} is not divisible by {divisor}; use a multiple "
                         f"of {p}.")
    expected = (b, 1, *mask_grid(model, h, w))
    if tuple(active_b1hw.shape) != expected:
        raise ValueError(f"active mask must have shape {expected} for {h}x{w} images "
                         f"(mask cells of {model.mask_patch} px), got {tuple(active_b1hw.shape)}")
    return active_b1hw if active_b1hw.dtype == torch.bool else active_b1hw > 0


# --------------------------------------------------------------------------- model

def _check_mask_patch(mask_patch, encoder: Encoder) -> int:
    """``mask_patch`` as an int, or a ValueError naming the values this encoder allows."""
    choices = encoder.mask_patch_choices()
    if isinstance(mask_patch, bool) or mask_patch not in choices:
        raise ValueError(f"mask_patch must be one of {', '.join(map(str, choices))} for "
                         f"{encoder.arch} (a power of two that divides its stride "
                         f"{encoder.downsample_ratio}, at least its first feature stride "
                         f"{choices[0]}), got {mask_patch!r}")
    return int(mask_patch)


class SparKModel(nn.Module):
    """Sparse masked image modeling of a timm CNN (see the module docstring).

    ``encoder``: timm architecture name (ResNet family, ConvNeXt, or any timm model with
    ``features_only`` support). ``input_size`` must be a multiple of the encoder's
    downsampling ratio (``patch_size``, 32 for ResNet/ConvNeXt). ``mask_patch``: the
    mask cell in pixels (``self.mask_patch``; masks are (B, 1, H/m, W/m), see
    :meth:`grid`): a power of two from the encoder's first feature stride up to
    ``patch_size`` (:meth:`~mwm.pretrain.encoders.Encoder.mask_patch_choices`); None =
    ``patch_size``, SparK's mask. ``decoder_width``:
    default :func:`default_decoder_width`. ``densify_norm``: 'auto' (bn for BN-based
    encoders, ln for LayerNorm-based ones), 'bn', 'ln' or 'identity'.
    ``drop_path_rate``: None = SparK's default for the architecture
    (:func:`~mwm.pretrain.encoders.default_drop_path`). ``sbn``: synchronize every BN
    (encoder, densify, decoder) across processes; works with NCCL and gloo.
    """

    def __init__(self, encoder: str = "resnet50", *, input_size: int = 224,
                 decoder_width: int | None = None, norm_pix_loss: bool = True,
                 densify_norm: str = "auto", drop_path_rate: float | None = None,
                 sbn: bool = False, mask_patch: int | None = None, **timm_kwargs):
        super().__init__()
        if densify_norm not in DENSIFY_NORMS:
            raise ValueError(f"densify_norm must be one of {DENSIFY_NORMS}, got {densify_norm!r}")
        self.arch = encoder
        self.context = SparseContext()
        dense = create_encoder(encoder, drop_path_rate=drop_path_rate, **timm_kwargs)
        self.patch_size = int(dense.downsample_ratio)
        if input_size % self.patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by the encoder's "
                             f"downsampling ratio {self.patch_size} ({encoder}); use a multiple "
                             f"of {self.patch_size}, e.g. {max(1, round(input_size / self.patch_size)) * self.patch_size}.")
        self.mask_patch = self.patch_size if mask_patch is None else _check_mask_patch(mask_patch, dense)
        self.input_size = int(input_size)
        self.norm_pix_loss = bool(norm_pix_loss)
        self.sbn = bool(sbn)
        self.encoder: Encoder = sparsify(dense, self.context, sync_bn=sbn, inplace=True)
        self.family = self.encoder.family
        if densify_norm == "auto":
            densify_norm = {"resnet": "bn", "convnext": "ln"}.get(self.family)
            if densify_norm is None:
                densify_norm = "bn" if self.encoder.uses_batchnorm() else "ln"
        self.densify_norm = densify_norm

        channels = self.encoder.feature_channels[::-1]  # smallest map first
        width = decoder_width or default_decoder_width(channels[0])
        self.decoder = LightDecoder(self.patch_size, width, sbn=sbn)
        self.decoder_width = width
        widths = self.decoder.widths
        if len(channels) > len(self.decoder.blocks):
            raise ValueError(f"{encoder}: {len(channels)} feature scales but only "
                             f"{len(self.decoder.blocks)} decoder blocks")
        self.densify_norms = nn.ModuleList()
        self.densify_projs = nn.ModuleList()
        self.mask_tokens = nn.ParameterList()
        for i, c in enumerate(channels):
            if densify_norm == "bn":
                norm = sparse_batchnorm(c, self.context, sync=sbn)
            elif densify_norm == "ln":
                norm = sparse_layernorm2d(c, self.context)
            else:
                norm = nn.Identity()
            self.densify_norms.append(norm)
            token = nn.Parameter(torch.zeros(1, c, 1, 1))
            nn.init.trunc_normal_(token, mean=0.0, std=0.02, a=-0.02, b=0.02)
            self.mask_tokens.append(token)
            kernel = 1 if i == 0 else 3
            if kernel == 1 and c == widths[i]:
                proj = nn.Identity()
            else:
                # PyTorch's default initialization, as SparK's densify projections (only
                # its decoder is re-initialized truncated-normal)
                proj = nn.Conv2d(c, widths[i], kernel_size=kernel, stride=1, padding=kernel // 2, bias=True)
            self.densify_projs.append(proj)

    # ---- helpers

    @property
    def feature_channels(self) -> list[int]:
        return list(self.encoder.feature_channels)

    def grid(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """The mask grid (rows, columns of ``mask_patch`` cells) of an input size."""
        return mask_grid(self, height, width)

    def _check(self, images_b3hw: torch.Tensor, active_b1hw: torch.Tensor) -> torch.Tensor:
        return checked_active(self, images_b3hw, active_b1hw,
                              f"the encoder's downsampling ratio {self.patch_size}")

    # ---- forward: mask → encode → densify → decode → loss

    def forward(self, images_b3hw: torch.Tensor, active_b1hw: torch.Tensor) -> SparKOutput:
        active = self._check(images_b3hw, active_b1hw)
        p = self.mask_patch
        # mask
        active_px = upsample_cells(active[:, 0], p).unsqueeze(1)
        masked_input = images_b3hw * active_px.to(images_b3hw.dtype)
        with self.context.active(active):
            # encode
            features = self.encoder(masked_input)[::-1]
            # densify
            densified = []
            for feat, norm, token, proj in zip(features, self.densify_norms, self.mask_tokens,
                                               self.densify_projs):
                feat = norm(feat)
                visible = self.context.mask_bool(feat.shape[2], feat.shape[3])
                feat = torch.where(visible, feat, token.to(feat.dtype))
                densified.append(proj(feat))
        # decode
        reconstruction = self.decoder(densified)
        # loss
        l2_bn, mean, std = patch_losses(reconstruction, images_b3hw, p,
                                        norm_pix_loss=self.norm_pix_loss)
        loss = masked_mean(l2_bn, active)
        with torch.no_grad():
            figure = self._figure(reconstruction, images_b3hw, active_px, mean, std)
        return SparKOutput(loss, figure, masked_input.detach(), l2_bn.detach())

    def _figure(self, reconstruction, images, active_px, mean, std) -> torch.Tensor:
        p = self.mask_patch
        b, c, h, w = images.shape
        rec = patchify(reconstruction.detach().float(), p) * std + mean
        rec = unpatchify(rec, p, (h // p, w // p), c).to(images.dtype)
        return torch.where(active_px, images.detach(), rec)

    # ---- the encoder in timm's key space

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights with the keys of ``timm.create_model(arch, num_classes=0)``
        (sparse BN layers save exactly BN's keys)."""
        return self.encoder.timm_state_dict()

    def dense_encoder(self) -> nn.Module:
        """A plain timm model (``num_classes=0``) carrying the learned encoder weights."""
        return self.encoder.dense_model()

    def extra_repr(self) -> str:
        return (f"arch={self.arch!r}, input_size={self.input_size}, patch_size={self.patch_size}, "
                f"mask_patch={self.mask_patch}, "
                f"decoder_width={self.decoder_width}, densify_norm={self.densify_norm!r}, "
                f"norm_pix_loss={self.norm_pix_loss}, sbn={self.sbn}")
