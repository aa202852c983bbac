"""Settings of ``mwm pretrain``: the one home of their defaults (flags are generated from them)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .. import checkpoint
from ..config import check_ranges, opt
from ..errors import DataError
from ..masking import MASKINGS, MaskingParams, default_masking
from ..registry import LazyChoices
from ..utils import AMP_CHOICES

OPTIMIZERS = ("lamb", "adamw")
#: The encoder and input size every stage uses when none is given (the published setting).
DEFAULT_ENCODER = "resnet50"
DEFAULT_INPUT_SIZE = 224


@dataclass(kw_only=True)
class PretrainConfig(MaskingParams):
    """Everything a pretraining run depends on (the masking parameters are inherited)."""

    images: str = opt(help="image folder, phantom folder or CSV manifest (train split used)",
                      positional=True)
    out: str = opt(help="the run folder (checkpoint, logs, figures, encoder)")
    regions: str | None = opt(None, "region masks paired with the images by stem (from `mwm "
                              "postprocess`; saliency maps for soft masking); without it "
                              "masking is random", metavar="DIR")
    model: str = opt(DEFAULT_ENCODER, "timm encoder: a CNN (ResNet or ConvNeXt family, e.g. "
                     "resnet18, resnet50, convnext_tiny; SparK) or a VisionTransformer (e.g. "
                     "vit_small_patch16_224, deit_tiny_patch16_224; MAE)")
    input_size: int = opt(DEFAULT_INPUT_SIZE, "pixels, a multiple of the encoder's stride (32 "
                          "for ResNet) or of the ViT's patch size",
                          low=8)
    patch_size: int | None = opt(None, "ViT only: the patch size in pixels, also the mask cell "
                                 "(default: the arch's, e.g. 16 for vit_*_patch16_*)", low=1)
    mask_patch: int | None = opt(None, "CNN only: the mask cell size in pixels (default: the "
                                 "encoder's stride); a ViT masks whole patches", low=1)
    decoder_width: int | None = opt(None, "decoder channels at the smallest scale (SparK) or "
                                    "token width (MAE) (default: per encoder family)", low=8)
    decoder_depth: int | None = opt(None, "ViT only: MAE decoder blocks (default: 8 for "
                                    "ViT-B and larger, else 4)", low=0)
    masking: str | None = opt(None, "masking strategy (default: region with --regions, else "
                              "random)", choices=LazyChoices(MASKINGS.names))
    epochs: int = opt(100, "epochs", low=1)
    batch_size: int = opt(32, "images per step and process", low=1)
    accumulate: int = opt(1, "gradient accumulation steps", low=1)
    lr: float | None = opt(None, "peak learning rate, used as given (default: base-lr x "
                           "global batch / 256)", above=0.0)
    base_lr: float = opt(2e-4, "learning rate per 256 images", above=0.0)
    warmup_epochs: float = opt(5.0, "linear warm-up epochs", low=0.0)
    optimizer: str = opt("lamb", "optimizer", choices=OPTIMIZERS)
    wd: float = opt(0.04, "weight decay at the start", low=0.0)
    wd_end: float = opt(0.2, "weight decay at the end (cosine)", low=0.0)
    clip: float | None = opt(5.0, "gradient norm clip (0 = off)", low=0.0)
    amp: str = opt("auto", "mixed precision (auto = bf16 where the device has native bf16, "
                   "else fp32; fp16 with a grad scaler needs a GPU)", choices=AMP_CHOICES)
    channels_last: bool = opt(True, "channels-last memory format")
    norm_pix_loss: bool = opt(True, "per-patch normalized pixel targets")
    sync_bn: bool = opt(False, "SyncBatchNorm under torchrun")
    seed: int = opt(0, "random seed")
    workers: int = opt(2, "data-loader worker processes", low=0)
    device: str = opt("auto", "cpu, cuda, cuda:N or auto (a GPU if there is one)")
    checkpoint_every: int = opt(200, "optimizer steps between checkpoints", low=1)
    log_every: int = opt(10, "optimizer steps between log rows", low=1)
    resume: str | None = checkpoint.resume_option()
    stat_images: int = opt(1000, "images for the normalization statistics", low=1)
    max_steps: int | None = checkpoint.max_steps_option()
    quiet: bool = opt(False, "no progress bars")

    def __post_init__(self) -> None:
        if self.masking is None:
            self.masking = default_masking(bool(self.regions))
        strategy = MASKINGS.get(self.masking)
        if strategy.needs_regions and not self.regions:
            raise DataError(f"--masking {self.masking} needs region masks: pass --regions DIR "
                            "(or use --masking random).")
        if self.clip == 0:
            self.clip = None  # 0 = off, one spelling in saved settings
        check_ranges(self)

    @property
    def strategy(self):
        return MASKINGS.get(self.masking)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
