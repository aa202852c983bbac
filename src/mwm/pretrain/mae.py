"""MAE for timm Vision Transformers: the encoder sees only the visible patches.

One forward pass of :class:`MAEModel`, in the order of this file:

1. **Embed.** timm's own ``patch_embed`` and ``_pos_embed`` (prefix tokens — CLS,
   registers, distillation — and the absolute position embeddings, resampled the way
   timm resamples them, :func:`timm.layers.resample_abs_pos_embed`, when the image grid
   is not the model's). The model is built with ``dynamic_img_size=True`` for that.
2. **Gather.** ``active_b1hw`` (bool (B, 1, H/p, W/p), True = visible, from
   :mod:`mwm.masking` with ``patch = p``) picks the visible patch tokens of each image,
   in raster order. Region and budget masks may leave images with different visible
   counts ``n_b``: every image is padded to ``L = max_b n_b`` with zero tokens that
   are *keys nobody attends to* (a boolean key-padding mask on every block). So each
   image's visible tokens attend to exactly its own prefix and visible tokens — the same
   computation as that image alone — and no masked pixel ever enters the encoder. When
   every ``n_b`` is equal (random masking: exact counts) there is no padding and no mask.
3. **Encode.** ``norm_pre``, the blocks, ``norm`` (the classifier head, ``fc_norm`` and
   attention pooling are unused: frozen, so DDP needs no ``find_unused_parameters``).
4. **Decode.** :class:`MAEDecoder`: a linear map to the decoder width, a learned mask
   token at every masked position, fixed 2-D sin-cos position embeddings (0 for the
   prefix tokens), ``depth`` timm ``Block``s, LayerNorm, a linear map to ``3·p·p``
   pixels per patch.
5. **Loss.** SparK's and MAE's (:func:`~mwm.pretrain.spark.patch_losses`, then
   :func:`~mwm.pretrain.spark.masked_mean`): per-patch normalized pixel targets
   (``norm_pix_loss``), MSE averaged over the **masked patches only**, in float32; the
   per-patch errors are returned too (``cell_loss_bn``).

The output has :class:`~mwm.pretrain.spark.SparKOutput`'s fields, so the trainer and
the figures treat both models alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ..errors import DataError
from ..masking import upsample_cells
from .spark import checked_active, mask_grid, masked_mean, patch_losses, patchify, unpatchify

__all__ = ["MAEModel", "MAEOutput", "MAEDecoder", "create_vit", "is_vit", "sincos_2d",
           "default_mae_decoder"]

#: MAE's decoder for ViT-B and larger (He et al. 2022).
MAE_DECODER = (512, 8)
#: Modules of a timm ViT that masked pretraining never calls (frozen; exported as made).
UNUSED_MODULES = ("fc_norm", "attn_pool", "head", "head_dist")


@dataclass
class MAEOutput:
    """The fields of :class:`~mwm.pretrain.spark.SparKOutput`: ``loss`` (float32 scalar,
    masked patches only), ``reconstruction_b3hw`` (detached, visible patches copied from
    the input), ``masked_input_b3hw`` (detached, masked patches 0), ``cell_loss_bn``
    (detached (B, N_patches), every patch's error)."""

    loss: torch.Tensor
    reconstruction_b3hw: torch.Tensor
    masked_input_b3hw: torch.Tensor
    cell_loss_bn: torch.Tensor | None = None


def default_mae_decoder(embed_dim: int) -> tuple[int, int]:
    """(width, depth): MAE's 512 x 8 for ViT-B and larger (embed dim >= 768); half the
    encoder width and 4 blocks below, so that the decoder over all N tokens stays cheaper
    than the encoder (ViT-T: 96 x 4)."""
    if embed_dim >= 768:
        return MAE_DECODER
    return max(32, embed_dim // 2 // 4 * 4), 4


def default_heads(width: int) -> int:
    """About 32 channels per head (MAE: 512 / 16), a divisor of ``width``."""
    heads = max(1, width // 32)
    while width % heads:
        heads -= 1
    return heads


def sincos_2d(rows: int, cols: int, dim: int) -> torch.Tensor:
    """(rows·cols, dim) fixed position embeddings, raster order: the first half of the
    channels encodes the row, the second the column, each as
    ``[sin(pos·ω_k), cos(pos·ω_k)]`` with ``ω_k = 10000^(-k / (dim/4))``."""
    if dim % 4:
        raise ValueError(f"the decoder width must be a multiple of 4, got {dim}")
    omega = 10000.0 ** -(torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        angle = pos.to(torch.float64)[:, None] * omega[None]
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.cat([one_axis(r.flatten()), one_axis(c.flatten())], dim=1).float()


# --------------------------------------------------------------------------- the encoder

def _meta_model(arch: str) -> nn.Module | None:
    """The timm model built on the meta device (no memory, no random draws); None if
    timm does not know ``arch`` (the CNN path then reports it as before)."""
    import timm

    with torch.random.fork_rng(), torch.device("meta"):
        try:
            return timm.create_model(arch, pretrained=False, num_classes=0)
        except RuntimeError as err:
            if "Unknown model" in str(err):
                return None
            raise


def is_vit(arch: str) -> bool:
    """True for a timm ``VisionTransformer`` (MAE); False for a CNN (SparK). Other
    transformer families (Swin, EVA, BEiT, hybrid ViTs, ...) are a :class:`DataError`:
    SparK's sparse convolutions would let attention see masked patches."""
    from timm.layers import PatchEmbed
    from timm.models.vision_transformer import VisionTransformer

    model = _meta_model(arch)
    if model is None:
        return False
    kind = type(model).__name__
    if isinstance(model, VisionTransformer) and type(model.patch_embed) is PatchEmbed:
        return True
    if hasattr(model, "patch_embed") or "transformer" in kind.lower() or "vit" in kind.lower():
        raise DataError(f"--model {arch}: a {kind} ({type(model).__module__}) is not supported; "
                        "masked pretraining takes timm VisionTransformer models with a plain "
                        "patch embedding (vit_*, deit_*; MAE) or CNNs (ResNet, ConvNeXt, ...; "
                        "SparK).")
    return False


def create_vit(arch: str, input_size: int, patch_size: int | None = None, **timm_kwargs):
    """A timm ViT without head at ``input_size`` (and ``patch_size``, None = the arch's)."""
    import timm

    kwargs = dict(timm_kwargs)
    if patch_size is not None:
        kwargs["patch_size"] = int(patch_size)
    model = timm.create_model(arch, pretrained=False, num_classes=0, img_size=int(input_size),
                              dynamic_img_size=True, **kwargs)
    rows, cols = model.patch_embed.patch_size
    if rows != cols:
        raise ValueError(f"{arch}: only square patches are supported, got {rows}x{cols}")
    return model


def _gather_visible(patches_bnd: torch.Tensor, visible_bn: torch.Tensor):
    """Each image's visible tokens in raster order, zero-padded to the largest count.

    Returns ``(tokens_bld, order_bn, valid_bl, uniform)``: ``order_bn`` lists each row's
    visible cells first (the MAE shuffle), ``valid_bl`` marks the real tokens,
    ``uniform`` is True when every image has the same count (no padding).
    """
    counts_b = visible_bn.sum(1)
    low, high = torch.stack([counts_b.min(), counts_b.max()]).tolist()  # one host sync
    length = max(high, 1)
    order_bn = torch.argsort((~visible_bn).to(torch.uint8), dim=1, stable=True)
    keep_bl = order_bn[:, :length]
    valid_bl = torch.arange(length, device=visible_bn.device)[None] < counts_b[:, None]
    index = keep_bl.unsqueeze(-1).expand(-1, -1, patches_bnd.shape[-1])
    tokens = torch.gather(patches_bnd, 1, index) * valid_bl.unsqueeze(-1).to(patches_bnd.dtype)
    return tokens, order_bn, valid_bl, low == high and high > 0


def _key_padding(valid_bl: torch.Tensor, n_prefix: int) -> torch.Tensor:
    """(B, 1, 1, P + L) bool attention mask: True = a key this image may attend to."""
    keys = torch.cat([valid_bl.new_ones(valid_bl.shape[0], n_prefix), valid_bl], dim=1)
    if n_prefix == 0:  # an image with nothing visible keeps one (zero) key: no 0/0 softmax
        keys[:, 0] |= ~valid_bl.any(1)
    return keys[:, None, None, :]


# --------------------------------------------------------------------------- the decoder

class MAEDecoder(nn.Module):
    """MAE's light transformer decoder over every patch (visible and masked)."""

    def __init__(self, embed_dim: int, patch: int, *, width: int, depth: int, heads: int,
                 n_prefix: int):
        super().__init__()
        from timm.models.vision_transformer import Block

        if width % heads:
            raise ValueError(f"decoder width {width} is not divisible by {heads} heads")
        self.n_prefix, self.width = int(n_prefix), int(width)
        self.embed = nn.Linear(embed_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio=4.0, qkv_bias=True,
                  norm_layer=partial(nn.LayerNorm, eps=1e-6)) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.pred = nn.Linear(width, patch * patch * 3)
        sincos_2d(1, 1, width)  # fail early on a width that is not a multiple of 4
        self._init()

    def _init(self) -> None:  # MAE's initialization
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, latent_bpd, order_bn, valid_bl, grid: tuple[int, int]) -> torch.Tensor:
        """Encoder output (prefix + padded visible tokens) → (B, N, 3·p·p) pixels."""
        x = self.embed(latent_bpd)
        prefix, visible = x[:, :self.n_prefix], x[:, self.n_prefix:]
        b, n = order_bn.shape
        token = self.mask_token.to(x.dtype)
        # In shuffled order (visible first): real tokens, then mask tokens; padded slots
        # become mask tokens too. Gathering with the inverse order puts each back in place.
        shuffled = torch.cat([torch.where(valid_bl.unsqueeze(-1), visible, token),
                              token.expand(b, n - visible.shape[1], -1)], dim=1)
        restore = torch.argsort(order_bn, dim=1).unsqueeze(-1).expand(-1, -1, self.width)
        patches = torch.gather(shuffled, 1, restore)
        patches = patches + sincos_2d(*grid, self.width).to(x.device, x.dtype)
        x = torch.cat([prefix, patches], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, self.n_prefix:]


# --------------------------------------------------------------------------- the model

class MAEModel(nn.Module):
    """Masked autoencoding of a timm ``VisionTransformer`` (see the module docstring).

    ``arch``: a timm ViT name; ``input_size``: pixels, a multiple of the patch size;
    ``patch_size``: None = the arch's (``vit_tiny_patch16_224`` with ``patch_size=8`` at
    64 px: an 8 x 8 grid). ``decoder_width``/``decoder_depth``: None =
    :func:`default_mae_decoder`; ``decoder_heads``: None = about 32 channels per head.
    ``mask_patch`` equals ``patch_size``: masks live on the patch grid.
    """

    def __init__(self, arch: str = "vit_base_patch16_224", *, input_size: int = 224,
                 patch_size: int | None = None, decoder_width: int | None = None,
                 decoder_depth: int | None = None, decoder_heads: int | None = None,
                 norm_pix_loss: bool = True, **timm_kwargs):
        super().__init__()
        self.arch = arch
        self.encoder = create_vit(arch, input_size, patch_size, **timm_kwargs)
        self.patch_size = self.mask_patch = int(self.encoder.patch_embed.patch_size[0])
        if input_size % self.patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by the patch size "
                             f"{self.patch_size} ({arch}); use a multiple of {self.patch_size}.")
        self.input_size = int(input_size)
        self.norm_pix_loss = bool(norm_pix_loss)
        self.n_prefix = int(self.encoder.num_prefix_tokens)
        for name in UNUSED_MODULES:
            for param in getattr(getattr(self.encoder, name, None), "parameters", list)():
                param.requires_grad_(False)
        width, depth = default_mae_decoder(self.encoder.embed_dim)
        self.decoder_width = int(decoder_width or width)
        self.decoder_depth = int(depth if decoder_depth is None else decoder_depth)
        self.decoder = MAEDecoder(self.encoder.embed_dim, self.patch_size,
                                  width=self.decoder_width, depth=self.decoder_depth,
                                  heads=decoder_heads or default_heads(self.decoder_width),
                                  n_prefix=self.n_prefix)

    def grid(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """The patch grid (rows, columns) of an input size: the mask grid."""
        return mask_grid(self, height, width)

    def _check(self, images_b3hw: torch.Tensor, active_b1hw: torch.Tensor) -> torch.Tensor:
        return checked_active(self, images_b3hw, active_b1hw, f"the patch size {self.patch_size}")

    def encode(self, images_b3hw: torch.Tensor, visible_bn: torch.Tensor):
        """The encoder on the visible tokens only: ``(latent (B, P + L, D), order, valid)``."""
        enc = self.encoder
        x = enc._pos_embed(enc.patch_embed(images_b3hw))  # resamples pos_embed if needed
        tokens, order_bn, valid_bl, uniform = _gather_visible(x[:, self.n_prefix:], visible_bn)
        x = enc.norm_pre(torch.cat([x[:, :self.n_prefix], tokens], dim=1))
        if uniform:  # no padding: the plain (fastest) attention path
            x = enc.blocks(x)
        else:
            mask = _key_padding(valid_bl, self.n_prefix)
            for block in enc.blocks:
                x = block(x, attn_mask=mask)
        return enc.norm(x), order_bn, valid_bl

    def forward(self, images_b3hw: torch.Tensor, active_b1hw: torch.Tensor) -> MAEOutput:
        active = self._check(images_b3hw, active_b1hw)
        grid = tuple(active.shape[2:])
        latent, order_bn, valid_bl = self.encode(images_b3hw, active.flatten(1))
        pred_bnd = self.decoder(latent, order_bn, valid_bl, grid)
        p = self.patch_size
        reconstruction = unpatchify(pred_bnd, p, grid, images_b3hw.shape[1])
        l2_bn, mean, std = patch_losses(reconstruction, images_b3hw, p,
                                        norm_pix_loss=self.norm_pix_loss)
        loss = masked_mean(l2_bn, active)
        with torch.no_grad():
            active_px = upsample_cells(active[:, 0], p).unsqueeze(1)
            rec = patchify(reconstruction.detach().float(), p) * std + mean
            rec = unpatchify(rec, p, grid, images_b3hw.shape[1]).to(images_b3hw.dtype)
            figure = torch.where(active_px, images_b3hw.detach(), rec)
            masked_input = images_b3hw.detach() * active_px.to(images_b3hw.dtype)
        return MAEOutput(loss, figure, masked_input, l2_bn.detach())

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The ViT's weights with the keys of ``timm.create_model(arch, num_classes=0,
        img_size=input_size, patch_size=patch_size)``."""
        return self.encoder.state_dict()

    def extra_repr(self) -> str:
        return (f"arch={self.arch!r}, input_size={self.input_size}, patch_size={self.patch_size}, "
                f"decoder_width={self.decoder_width}, decoder_depth={self.decoder_depth}, "
                f"norm_pix_loss={self.norm_pix_loss}")
