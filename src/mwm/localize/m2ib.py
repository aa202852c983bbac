"""M2IB: text-guided saliency maps by a multi-modal information bottleneck.

For each image, the token sequence leaving vision block ``layer`` is passed through a
learnt noisy bottleneck; the bottleneck keeps as little information as possible
(KL to a noise prior, weighted by ``beta``) while keeping the image embedding close to
the prompt's text embedding (cosine). The information each patch token lets through is
the saliency map. The formula and the differences with the published code are in
``docs/m2ib.md``.

``objective="contrastive"`` (MWM's addition, :mod:`mwm.localize.m2ib_contrast`) keeps
what makes the image match the prompt more than contrast prompts (:func:`text_term`).

Efficiency by construction: the model is frozen (only the bottleneck's ``alpha`` gets
gradients), each distinct prompt is encoded once (cached on the adapter), the blocks up
to ``layer`` run once per image without gradients, and many images are optimized
together in one batch with the same result as one at a time (per-image losses are
summed, Adam is element-wise, and each image draws its noise from its own generator
seeded by ``(seed, key)``).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import flag_name, opt
from ..errors import DataError
from .m2ib_contrast import (OBJECTIVES, check_contrast_tensors, check_objective,
                            contrast_embeddings, contrast_lists, per_image_prompts,
                            presence_scores, prompt_log_softmax)
from .vlm import VLMAdapter

STD_EPS = 1e-6

__all__ = ["M2IBConfig", "saliency_maps", "information_maps", "shifted_information",
           "kl_per_element", "image_seed", "text_term", "presence_scores",
           "text_gradient_share", "contrast_lists", "contrast_embeddings", "OBJECTIVES"]


def parse_layers(text: str) -> int | tuple[int, ...]:
    """``--layer``: ``7`` or ``1,2`` (several blocks, their maps averaged)."""
    try:
        values = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        raise ValueError(f"expected a block index or indices such as 1,2, got {text!r}") from None
    return values[0] if len(values) == 1 else values


#: What a setting left at None becomes when the model folder recommends nothing
#: (:meth:`M2IBConfig.resolved`): MWM's defaults, the ones the maps were always made with.
DEFAULTS = {"layer": 7, "beta": 1.0, "noise_scale": 1.0, "standardize": True}

#: ``--published``: the published code's values (MedCLIP-SAMv2's
#: ``generate_saliency_maps.py``: ``--vlayer 7 --vbeta 0.1``, ``--vvar`` unused; M2IB's
#: ``vision_heatmap_iba``: 10 Adam steps with lr 1 on a batch of 10 noise draws, alpha
#: initialised to 5, the prior N(0, 1) on raw activations, fp32, one map per forward).
PUBLISHED = {"layer": 7, "beta": 0.1, "noise_scale": 1.0, "standardize": False, "steps": 10,
             "samples": 10, "lr": 1.0, "alpha_init": 5.0, "shifts": 1, "smooth": 0.0,
             "amp": False}
#: What ``--published`` leaves to the user: the published code's own options (``--vlayer``,
#: ``--vbeta``); the rest of :data:`PUBLISHED` defines its computation.
PUBLISHED_OPTIONS = ("layer", "beta")


@dataclass
class M2IBConfig:
    """M2IB hyper-parameters; every one of them changes the maps.

    ``layer``, ``beta``, ``noise_scale`` and ``standardize`` default to None: "not given",
    filled from the model folder's recommendation (``m2ib_recommended.json``, written by
    ``mwm clip train``), else from :data:`DEFAULTS` (:meth:`for_model`, :meth:`resolved`).

    ``layer``: 0-based vision block whose output is bottlenecked (must be < depth), or
    several blocks (a tuple): one bottleneck per block, each map scaled to [0, 1], the
    maps averaged and scaled again (see :attr:`layers`);
    ``beta``: weight of the information term; ``noise_scale``: std of the noise and of
    the prior, in units of the per-channel std of the block output when ``standardize``;
    ``steps``: Adam updates of alpha; ``samples``: noise draws per step; ``lr``: Adam
    learning rate; ``alpha_init``: initial alpha (sigmoid(5) = 0.9933 keeps 99% of the
    signal); ``seed``: noise seed (per image, see :func:`image_seed`); ``batch_size``:
    images optimized together (no effect on the result); ``standardize``: standardize the
    block output per image and channel before the bottleneck (IBA-style); ``amp``: bf16
    autocast for the blocks after ``layer`` (CPU or CUDA).

    ``shifts``: sub-patch shift averaging. A ViT's map lives on its patch grid (16 px
    patches: a 14 x 14 map for a 224 px input), so lesion edges can only fall on patch
    borders. With ``shifts = n`` the input is also shifted by fractions of a patch
    (n x n offsets ``(k - (n - 1) / 2) * patch / n``, k = 0..n-1, rounded to pixels), the
    bottleneck is fitted for each shifted input, and the information maps, shifted back,
    are averaged: a finer and less noisy map for n^2 times the compute (1 = off).
    ``smooth``: std of a Gaussian blur of the averaged map, in patches, at model-input
    resolution before it is mapped back to the image (0 = off); it removes the
    bilinear-upsampling ridges that otherwise decide where a threshold cuts.

    ``objective``: the loss's text term, ``"published"`` or ``"contrastive"`` (needs
    contrast prompts; τ = ``temperature``; :func:`text_term`).
    """

    layer: int | tuple[int, ...] | None = opt(
        None, "vision block (0-based) whose output passes the bottleneck, or blocks such as "
        "1,2: one map per block, averaged (default: the model folder's recommendation, else 7)",
        parse=parse_layers)
    beta: float | None = opt(None, "weight of the information term (default: the model "
                             "folder's recommendation, else 1)", low=0.0)
    noise_scale: float | None = opt(None, "std of the noise and prior (default: the model "
                                    "folder's recommendation, else 1)", above=0.0)
    steps: int = opt(10, "Adam steps per image", low=1)
    samples: int = opt(10, "noise draws per step", low=1)
    lr: float = opt(1.0, "Adam learning rate on alpha", low=0.0, flag="m2ib_lr")
    alpha_init: float = opt(5.0, "initial alpha (sigmoid(5) keeps 99% of the signal)")
    seed: int = opt(0, "noise seed (per image, from the image's name)")
    batch_size: int = opt(8, "images optimized together (no effect on the maps)", low=1)
    standardize: bool | None = opt(None, "standardize the block output per image and channel "
                                   "first (default: the model folder's recommendation, else on)")
    amp: bool = opt(False, "bf16 autocast (faster on CPU and GPU)")
    shifts: int = opt(1, "average the maps of N x N sub-patch shifts of the input: finer, "
                      "less noisy maps for N^2 the time (1 = off)", low=1)
    smooth: float = opt(0.0, "Gaussian blur of the map, std in patches, before it is mapped "
                        "back to the image (0 = off)", low=0.0)
    objective: str = opt("published", "text term of the loss: the published cosine to the "
                         "prompt, or contrastive: the prompt's log-softmax among the prompt "
                         "and contrast prompts (docs/m2ib.md)", choices=OBJECTIVES)
    temperature: float = opt(0.1, "temperature of the contrastive objective's softmax "
                             "(unused by the published one)", above=0.0)

    def __post_init__(self):
        if isinstance(self.layer, (list, tuple)):  # one spelling per setting: fingerprints
            self.layer = self.layer[0] if len(self.layer) == 1 else tuple(self.layer)

    @property
    def layers(self) -> tuple[int, ...]:
        """The bottlenecked blocks, as a tuple (one element for a single ``layer``; empty
        while ``layer`` is None)."""
        if self.layer is None:
            return ()
        return self.layer if isinstance(self.layer, tuple) else (self.layer,)

    def resolved(self, recommended: dict | None = None) -> "M2IBConfig":
        """Settings left at None from ``recommended`` (a model's), else :data:`DEFAULTS`."""
        recommended = recommended or {}
        return replace(self, **{k: recommended.get(k, DEFAULTS[k]) if getattr(self, k) is None
                                else getattr(self, k) for k in DEFAULTS})

    def for_model(self, adapter: VLMAdapter, *, tuning: bool = False) -> "M2IBConfig":
        """:meth:`resolved` with the adapter's recommendation (a model folder's
        ``m2ib_recommended.json``, checked against the model here). A default layer the
        model is too shallow for is an error, unless ``tuning`` (the grid picks layers)."""
        recommended = dict(getattr(adapter, "m2ib_recommendation", None) or {})
        if recommended:
            try:
                M2IBConfig(**recommended).validate(adapter.depth)
            except (DataError, TypeError) as err:
                where = getattr(adapter, "m2ib_recommendation_file", None) or adapter.name
                raise DataError(f"{where}: {err}; fix or delete that file.") from err
        if self.layer is None and "layer" not in recommended and not tuning \
                and DEFAULTS["layer"] >= adapter.depth:
            d = adapter.depth
            raise DataError(f"M2IB: this model has {d} vision blocks, too few for the default "
                            f"layer {DEFAULTS['layer']}; give --layer in 0..{d - 1} (e.g. "
                            f"{d - 1}), or --tune to search its last blocks.")
        return self.resolved(recommended)

    def published(self) -> "M2IBConfig":
        """The published computation (:data:`PUBLISHED`), whatever the model recommends.

        ``layer`` and ``beta`` keep a value given (the published code's options); a
        setting given that contradicts the published computation is an error naming it
        (a setting equal to its default cannot be told from one not given: the defaults
        of those settings are the published values, except ``standardize`` and
        ``noise_scale``, whose None means "not given").
        """
        fixed = {**PUBLISHED, "objective": "published"}  # the published loss, too
        conflicts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in fixed and f.name not in PUBLISHED_OPTIONS and value is not None \
                    and value != fixed[f.name]:
                conflicts.append(f"--{flag_name(f).replace('_', '-')} {value!r} (published: "
                                 f"{fixed[f.name]!r})")
        if conflicts:
            verb = "contradicts" if len(conflicts) == 1 else "contradict"
            raise DataError("--published fixes the M2IB computation to the published code's, "
                            f"but {', '.join(conflicts)} {verb} it; leave them out, or leave "
                            "out --published.")
        return replace(self, **{k: v if getattr(self, k) is None else getattr(self, k)
                                for k, v in PUBLISHED.items()})

    def validate(self, depth: int | None = None) -> "M2IBConfig":
        """Check every setting (``depth``: also the layers against the model's blocks).

        Settings left at None pass (they are filled by :meth:`resolved`)."""
        def bad(msg: str):
            raise DataError(f"M2IB: {msg}")

        if self.standardize not in (None, True, False):
            bad(f"standardize must be true or false, got {self.standardize!r}")
        if self.layer is not None:
            self._validate_layers(depth, bad)
        self._validate_numbers(bad)
        return self

    def _validate_layers(self, depth: int | None, bad) -> None:
        if not self.layers or len(set(self.layers)) != len(self.layers):
            bad(f"layer must be a block index or distinct indices, got {self.layer!r}")
        for layer in self.layers:
            if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
                bad(f"layer must be an integer or a tuple of integers, got {self.layer!r}")
            if layer < 0 or (depth is not None and layer >= depth):
                rng = f"0..{depth - 1}" if depth is not None else ">= 0"
                bad(f"layer {layer} is out of range: this model has {depth} vision blocks, "
                    f"so layer must be in {rng} (0-based; the bottleneck acts on that block's "
                    "output).")

    def _validate_numbers(self, bad) -> None:
        for name in ("steps", "samples", "batch_size", "shifts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                bad(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("beta", "lr"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float))
                                          and math.isfinite(value) and value >= 0):
                bad(f"{name} must be a finite number >= 0, got {value!r}")
        if self.noise_scale is not None and not (
                isinstance(self.noise_scale, (int, float)) and math.isfinite(self.noise_scale)
                and self.noise_scale > 0):
            bad(f"noise_scale must be a finite number > 0, got {self.noise_scale!r}")
        if not (isinstance(self.smooth, (int, float)) and math.isfinite(self.smooth)
                and self.smooth >= 0):
            bad(f"smooth must be a finite number >= 0 (Gaussian std in patches), got {self.smooth!r}")
        if not (isinstance(self.alpha_init, (int, float)) and math.isfinite(self.alpha_init)):
            bad(f"alpha_init must be a finite number, got {self.alpha_init!r}")
        if self.objective not in OBJECTIVES:
            bad(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if isinstance(self.temperature, bool) or not (
                isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            bad(f"temperature must be a finite number > 0, got {self.temperature!r}")

    def to_dict(self) -> dict:
        """The settings; with the published objective without ``objective`` and
        ``temperature``, so its maps keep the fingerprints they had before those existed."""
        data = asdict(self)
        if self.objective == "published":
            del data["objective"], data["temperature"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "M2IBConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DataError(f"M2IB: unknown parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**data).validate()


def kl_per_element(alpha: Tensor, r: Tensor, noise_scale: float) -> Tensor:
    """KL( N(λr, ((1-λ)σ)²) || N(0, σ²) ) element-wise, λ = sigmoid(alpha), σ = noise_scale.

    = ½[(1-λ)² + (λ r / σ)² - 1] - log(1-λ), with log(1-λ) = logsigmoid(-alpha) (stable).
    """
    lam = torch.sigmoid(alpha)
    keep = torch.sigmoid(-alpha)  # 1 - λ without cancellation
    return 0.5 * (keep * keep + (lam * r / noise_scale) ** 2 - 1.0) - F.logsigmoid(-alpha)


def image_seed(seed: int, key: str | int) -> int:
    """A 63-bit seed for one image from the run seed and the image's key (name or index)."""
    digest = hashlib.sha256(f"mwm-m2ib|{int(seed)}|{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def saliency_maps(adapter: VLMAdapter, images: Sequence[np.ndarray],
                  prompts: Sequence[str | Sequence[str]] | str,
                  config: M2IBConfig | None = None, *, keys: Sequence[str | int] | None = None,
                  progress: Callable[[int], None] | None = None,
                  contrast: Sequence[str] | Sequence[Sequence[str]] | None = None
                  ) -> list[np.ndarray]:
    """One (H, W) float32 saliency map in [0, 1] per image, aligned with its pixels.

    ``images``: (3, H, W) float arrays in [0, 1] (``mwm.data.io.to_model_input``).
    ``prompts``: one per image — a string or a list of strings (an ensemble: normalized
    embeddings averaged, then renormalized); a single string applies to all images.
    ``keys``: per-image keys seeding the noise (default: the index in ``images``); pass
    the image names so a map does not depend on which other images share the call.
    ``progress(n)`` is called after each batch with the number of images it finished.
    ``contrast``: the contrast prompts of ``objective="contrastive"`` (required by it,
    refused by the published objective): one list of strings for every image, or one
    list per image (lengths may differ). Each is a single string; a contrast equal to
    one of the image's own prompt strings is dropped for that image (so one list of all
    findings serves every image), duplicates count once.
    A map that is constant (no information difference between patches) is all zeros.
    """
    config = (config or M2IBConfig()).for_model(adapter).validate(adapter.depth)
    images = list(images)
    prompts = per_image_prompts(prompts, len(images))
    keys = list(range(len(images))) if keys is None else list(keys)
    if len(keys) != len(images):
        raise DataError(f"M2IB: {len(images)} images but {len(keys)} keys.")
    check_objective(config.objective, contrast)
    if not images:
        return []
    adapter.freeze()
    text = adapter.embed_prompts(prompts)  # (N, D), each distinct string encoded once
    contrast_nkd = mask_nk = None
    if contrast is not None:
        contrast_nkd, mask_nk = contrast_embeddings(
            adapter, contrast_lists(contrast, prompts, keys))
    maps: list[np.ndarray] = []
    for start in range(0, len(images), config.batch_size):
        stop = min(start + config.batch_size, len(images))
        prepared = [adapter.prepare(img) for img in images[start:stop]]
        pixels = torch.stack([p for p, _ in prepared]).to(adapter.device, adapter.dtype)
        batch_contrast = {} if contrast is None else {
            "contrast": contrast_nkd[start:stop], "contrast_mask": mask_nk[start:stop]}
        per_layer = []  # [layer][image] (H, W) maps in [0, 1]
        for layer in config.layers:
            # fresh generators per layer: each layer's map equals its single-layer run
            gens = [torch.Generator(adapter.device).manual_seed(image_seed(config.seed, k))
                    for k in keys[start:stop]]
            info = shifted_information(adapter, pixels, text[start:stop], gens,
                                       replace(config, layer=layer), **batch_contrast)
            per_layer.append([_minmax(adapter.to_image(square_map, geometry))
                              for square_map, (_, geometry) in zip(info, prepared)])
        if len(per_layer) == 1:
            maps.extend(per_layer[0])
        else:
            maps.extend(_minmax(np.mean(image_maps, axis=0)) for image_maps in zip(*per_layer))
        if progress is not None:
            progress(stop - start)
    return maps


def text_term(emb_bsd: Tensor, text_bd: Tensor, cfg: M2IBConfig,
              contrast_bkd: Tensor | None = None, mask_bk: Tensor | None = None) -> Tensor:
    """(B, S) what the bottleneck maximizes besides staying small, per noise sample.

    published: cos(e_s, t). contrastive: τ · log_softmax of t among {t, c_1..c_K} =
    cos(e_s, t) − τ · logsumexp_{t, c_k}(cos(e_s, ·) / τ), in cosine units: its gradient,
    (1 − p_t)(t − the softmax-weighted mean of the contrasts), is no larger than the
    cosine's difference, so ``beta`` keeps a comparable meaning."""
    if cfg.objective == "published":
        return (emb_bsd * text_bd[:, None]).sum(-1)
    return cfg.temperature * prompt_log_softmax(emb_bsd, text_bd, contrast_bkd, mask_bk,
                                                cfg.temperature)


def patch_offsets(patch_size: int, shifts: int) -> list[int]:
    """Sub-patch offsets in model pixels, centred on 0: ``round((k - (n-1)/2) * patch / n)``."""
    return [int(round((k - (shifts - 1) / 2) * patch_size / shifts)) for k in range(shifts)]


def shift_image(x: Tensor, dy: int, dx: int, fill: Tensor | float) -> Tensor:
    """Move (..., H, W) content by (dy, dx) pixels (down/right positive); vacated pixels = fill."""
    h, w = x.shape[-2:]
    out = torch.empty_like(x)
    out[...] = fill
    src_y, dst_y = slice(max(0, -dy), h - max(0, dy)), slice(max(0, dy), h - max(0, -dy))
    src_x, dst_x = slice(max(0, -dx), w - max(0, dx)), slice(max(0, dx), w - max(0, -dx))
    out[..., dst_y, dst_x] = x[..., src_y, src_x]
    return out


def shifted_information(adapter: VLMAdapter, pixels: Tensor, text: Tensor,
                        generators: Sequence[torch.Generator], config: M2IBConfig,
                        contrast: Tensor | None = None, contrast_mask: Tensor | None = None
                        ) -> Tensor:
    """(B, S, S) information over the model input, averaged over sub-patch shifts, smoothed.

    With ``shifts = 1`` and ``smooth = 0`` this is :func:`information_maps`' (B, gh, gw)
    patch grid itself (``to_image`` upsamples either).

    Each shifted input is padded with the model's black (0 before normalization). Its
    (gh, gw) information map is upsampled bilinearly to S x S and shifted back, so every
    average is over maps aligned with the unshifted input; a pixel that a shift moved out
    of the input is averaged over the shifts that kept it. Each image's noise keeps
    coming from its own generator, shift after shift, so batching still does not change
    the result. ``contrast``, ``contrast_mask``: as in :func:`information_maps`.
    """
    # the contrast only when given: the published call is the one it always was
    extra = {} if contrast is None else {"contrast": contrast, "contrast_mask": contrast_mask}
    if config.shifts == 1 and not config.smooth:
        return information_maps(adapter, pixels, text, generators, config, **extra)
    s = adapter.image_size
    mean = torch.tensor(adapter.mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(adapter.std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    black = -mean / std
    offsets = patch_offsets(adapter.patch_size, config.shifts)
    total = torch.zeros(pixels.shape[0], s, s)
    count = torch.zeros(1, s, s)  # shifts that saw each pixel (the border loses some)
    for dy in offsets:
        for dx in offsets:
            moved = shift_image(pixels, dy, dx, black) if dy or dx else pixels
            grid = information_maps(adapter, moved, text, generators, config, **extra)
            square = F.interpolate(grid[:, None].float(), size=(s, s), mode="bilinear",
                                   align_corners=False)[:, 0]
            total += shift_image(square, -dy, -dx, 0.0)
            count += shift_image(torch.ones(1, s, s), -dy, -dx, 0.0)
    total /= count.clamp_min(1.0)
    if config.smooth > 0:
        total = gaussian_blur(total, config.smooth * adapter.patch_size)
    return total


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """(B, H, W) maps blurred by a Gaussian of std ``sigma`` pixels (separable, edges replicated)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(maps.dtype)
    x = maps[:, None]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return x[:, 0]


def information_maps(adapter: VLMAdapter, pixels: Tensor, text: Tensor,
                     generators: Sequence[torch.Generator], config: M2IBConfig,
                     contrast: Tensor | None = None, contrast_mask: Tensor | None = None
                     ) -> Tensor:
    """(B, gh, gw) information per patch token (nats, KL summed over channels).

    ``pixels``: (B, 3, S, S) prepared inputs; ``text``: (B, D) normalized text
    embeddings; ``generators``: one generator per image (its noise source), on the
    model's device. ``contrast``: (B, K, D) normalized contrast embeddings, required by
    ``objective="contrastive"`` and refused otherwise; ``contrast_mask``: (B, K) bool,
    False for padding (default: all True).
    """
    cfg = config.for_model(adapter).validate(adapter.depth)
    b = pixels.shape[0]
    if text.shape[0] != b or len(generators) != b:
        raise DataError("M2IB: pixels, text and generators must have the same batch size")
    if len(cfg.layers) != 1:
        raise DataError("M2IB: information_maps bottlenecks one layer; saliency_maps averages "
                        "the maps of several")
    rs, mu, sd = _bottleneck_input(adapter, pixels, cfg)
    text, contrast, contrast_mask = check_contrast_tensors(
        cfg.objective, rs, text, contrast, contrast_mask)
    alpha = torch.full_like(rs, float(cfg.alpha_init)).requires_grad_(True)
    optimizer = torch.optim.Adam([alpha], lr=cfg.lr)
    for _ in range(cfg.steps):
        optimizer.zero_grad(set_to_none=True)
        gain, cost = _loss_terms(adapter, alpha, rs, mu, sd, generators, cfg, text, contrast,
                                 contrast_mask)
        per_image = cost - gain
        per_image.sum().backward()  # sum: each alpha's gradient depends on its image only
        optimizer.step()
    with torch.no_grad():
        kl = kl_per_element(alpha, rs, float(cfg.noise_scale))            # final alpha
        info = kl[:, adapter.num_prefix_tokens:].sum(dim=-1)
    gh, gw = adapter.grid
    if info.shape[1] != gh * gw:
        raise DataError(f"M2IB: {info.shape[1]} patch tokens do not fill the {gh}x{gw} grid")
    return info.reshape(b, gh, gw).cpu()


def text_gradient_share(adapter: VLMAdapter, pixels: Tensor, text: Tensor,
                        generators: Sequence[torch.Generator], config: M2IBConfig,
                        contrast: Tensor | None = None, contrast_mask: Tensor | None = None
                        ) -> float:
    """||∇_α text term|| / (||∇_α text term|| + ||∇_α β·KL||) at α = ``alpha_init``.

    The gradients of the first step of :func:`information_maps` (same inputs, one draw
    of ``samples`` noise samples from ``generators``), over the whole batch. Near 0: the
    information term alone decides the first update, so the map starts as the tokens'
    outlierness whatever the prompt; near 1: the text term decides it.
    """
    cfg = config.for_model(adapter).validate(adapter.depth)
    if len(cfg.layers) != 1:
        raise DataError("M2IB: text_gradient_share measures one layer")
    rs, mu, sd = _bottleneck_input(adapter, pixels, cfg)
    text, contrast, contrast_mask = check_contrast_tensors(
        cfg.objective, rs, text, contrast, contrast_mask)
    alpha = torch.full_like(rs, float(cfg.alpha_init)).requires_grad_(True)
    gain, cost = _loss_terms(adapter, alpha, rs, mu, sd, generators, cfg, text, contrast,
                             contrast_mask)
    (g_text,) = torch.autograd.grad(gain.sum(), alpha)
    (g_info,) = torch.autograd.grad(cost.sum(), alpha)
    n_text, n_info = float(g_text.norm()), float(g_info.norm())
    return n_text / (n_text + n_info) if n_text + n_info > 0 else 0.0


def _bottleneck_input(adapter: VLMAdapter, pixels: Tensor, cfg: M2IBConfig
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """(r̃, μ, s): block ``layer``'s output standardized per image and channel (or raw,
    μ = 0 and s = 1), computed once without gradients; fp32 unless a fp64 model."""
    b, device = pixels.shape[0], pixels.device
    with torch.no_grad():
        r = adapter.run_blocks(adapter.embed(pixels), 0, cfg.layer + 1)     # (B, T, C)
    work = torch.float64 if r.dtype == torch.float64 else torch.float32
    r = r.to(work)
    c = r.shape[-1]
    if cfg.standardize:
        patches = r[:, adapter.num_prefix_tokens:]
        mu = patches.mean(dim=1, keepdim=True)                              # (B, 1, C)
        sd = patches.std(dim=1, keepdim=True).clamp_min(STD_EPS)
    else:
        mu = torch.zeros(b, 1, c, device=device, dtype=work)
        sd = torch.ones(b, 1, c, device=device, dtype=work)
    return (r - mu) / sd, mu, sd


def _loss_terms(adapter: VLMAdapter, alpha: Tensor, rs: Tensor, mu: Tensor, sd: Tensor,
                generators: Sequence[torch.Generator], cfg: M2IBConfig, text: Tensor,
                contrast: Tensor | None, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """(gain, cost), each (B,): the text term averaged over ``samples`` noise draws and
    β · mean KL. The loss per image is cost − gain."""
    b, t, c = rs.shape
    s, sigma, work = cfg.samples, float(cfg.noise_scale), rs.dtype
    # each image's noise from its own generator, on the generator's device: drawing
    # it on the CPU and copying capped M2IB at ~9 images/s on an H200
    noise = torch.stack([torch.randn((s, t, c), generator=g, dtype=work, device=g.device)
                         for g in generators]).to(rs.device)
    lam = torch.sigmoid(alpha)[:, None]                                     # (B, 1, T, C)
    keep = torch.sigmoid(-alpha)[:, None]
    z = (lam * rs[:, None] + keep * sigma * noise) * sd[:, None] + mu[:, None]
    amp = (torch.autocast(device_type=rs.device.type, dtype=torch.bfloat16) if cfg.amp
           else contextlib.nullcontext())
    with amp:
        out = adapter.run_blocks(z.reshape(b * s, t, c), cfg.layer + 1, adapter.depth)
        emb = adapter.pool(out)
    gain = text_term(emb.to(work).reshape(b, s, -1), text, cfg, contrast, mask)  # (B, S)
    kl = kl_per_element(alpha, rs, sigma)
    return gain.mean(dim=1), cfg.beta * kl.mean(dim=(1, 2))


def _minmax(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    finite = np.isfinite(m)
    if not finite.all():
        m = np.where(finite, m, np.nanmax(np.where(finite, m, -np.inf)) if finite.any() else 0.0)
    lo, hi = float(m.min()), float(m.max())
    span = hi - lo
    if not span > 1e-12 * max(1.0, abs(hi), abs(lo)):
        return np.zeros(m.shape, dtype=np.float32)
    return np.clip((m - lo) / span, 0.0, 1.0).astype(np.float32)
