"""One adapter over CLIP-style vision-language models, split at the vision blocks.

M2IB saliency (:mod:`mwm.localize.m2ib`) needs to run a vision transformer in pieces:
the tokens entering block 0 (:meth:`VLMAdapter.embed`), any range of blocks
(:meth:`VLMAdapter.run_blocks`) and the head that turns final tokens into the image
embedding (:meth:`VLMAdapter.pool`). :class:`VLMAdapter` gives that view for

* **open_clip** models with a timm ViT trunk (BiomedCLIP:
  ``model.visual.trunk`` patch_embed / _pos_embed / norm_pre / blocks / norm, then
  open_clip's head/projection; any text tower: built-in transformer or HF BERT);
* **open_clip** models with the native ``VisionTransformer`` (conv1 / class_embedding /
  positional_embedding / ln_pre / transformer.resblocks / ln_post / proj);
* **transformers** ``CLIPModel`` (vision_model.embeddings / pre_layrnorm /
  encoder.layers / post_layernorm / visual_projection) and remote-code ports with the same
  layout (only with ``trust_remote_code=True``).

``embed → run_blocks(0, depth) → pool`` equals the wrapped model's own image encoder
(tested). The model is frozen: ``eval()`` and ``requires_grad=False`` on every weight.

Model names accepted by :func:`load_vlm` (``backend="auto"``):

==========================================  ================================================
``hf-hub:ORG/REPO``                          open_clip model on the Hugging Face hub
                                             (default: BiomedCLIP)
``local-dir:PATH``                           open_clip folder: ``open_clip_config.json`` +
                                             weights (``open_clip_model.safetensors`` …)
``PATH`` (an existing folder)                open_clip folder if it has
                                             ``open_clip_config.json``, else a transformers
                                             folder (``config.json`` + weights)
``NAME:TAG`` (open_clip built-in name)       e.g. ``ViT-B-16:openai``,
                                             ``ViT-B-32:laion2b_s34b_b79k``
``ORG/REPO`` (anything else)                 transformers model id, e.g.
                                             ``openai/clip-vit-base-patch16``
==========================================  ================================================

``backend="open_clip"`` reads a bare ``ORG/REPO`` as ``hf-hub:ORG/REPO``;
``backend="hf"`` reads ``hf-hub:ORG/REPO`` as the transformers id ``ORG/REPO``.

Geometry (:meth:`VLMAdapter.prepare` / :meth:`VLMAdapter.to_image`): the image is padded
**symmetrically** to a square with 0 (black, in [0, 1] space, before mean/std
normalization; an odd remainder goes to the bottom/right), resized to ``image_size``
(bicubic, antialiased) and normalized with the model's own mean/std. Nothing is cropped,
unlike CLIP's centre crop, so every pixel is seen and maps align exactly with the
original pixels. ``to_image`` upsamples a patch-grid map (bilinear,
``align_corners=False``) directly to the padded square at the original resolution and
crops the padding: one interpolation, no rounding of the pad at model resolution.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DataError, ModelUnavailableError
from .hub import DEFAULT_VLM, model_unavailable

DEFAULT_MODEL = DEFAULT_VLM
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BACKENDS = ("auto", "open_clip", "hf")
HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
TEXT_BATCH = 64

__all__ = [
    "DEFAULT_MODEL", "Geometry", "ModelUnavailableError", "VLMAdapter", "load_vlm",
]


@dataclass(frozen=True)
class Geometry:
    """How an original (H, W) image was placed in the model's square input.

    The image sits at rows ``pad_top:pad_top+height`` and columns
    ``pad_left:pad_left+width`` of a ``side`` x ``side`` square (``side = max(H, W)``),
    which was resized to ``image_size`` x ``image_size``.
    """

    height: int
    width: int
    side: int
    pad_top: int
    pad_left: int
    image_size: int

    @property
    def scale(self) -> float:
        """Model pixels per original pixel."""
        return self.image_size / self.side


# --------------------------------------------------------------------------- adapter


class VLMAdapter:
    """A frozen CLIP-style model seen as embed → blocks → pool, plus its text encoder.

    Build one with :func:`load_vlm` (a model name or folder) or from an already-built
    model with :meth:`from_open_clip` / :meth:`from_hf_clip`.
    """

    backend = "base"

    def __init__(self, model: nn.Module, *, name: str, image_size: int, patch_size: int,
                 num_prefix_tokens: int, mean: Sequence[float], std: Sequence[float]):
        if image_size % patch_size:
            raise DataError(f"{name}: image size {image_size} is not a multiple of the patch "
                            f"size {patch_size}; such models are not supported.")
        self.model = model
        self.name = name
        self.image_size = int(image_size)
        self.patch_size = int(patch_size)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        if len(self.mean) != 3 or len(self.std) != 3:
            raise DataError(f"{name}: mean/std must have 3 values, got {self.mean}, {self.std}")
        self._text_cache: dict[str, Tensor] = {}
        self.freeze()

    # ----- construction from built models

    @classmethod
    def from_open_clip(cls, model: nn.Module, tokenizer: Callable,
                       preprocess_cfg: dict | None = None, *, name: str = "open_clip") -> "VLMAdapter":
        """Wrap an open_clip ``CLIP``/``CustomTextCLIP`` (timm ViT trunk or native ViT).

        ``tokenizer`` is the open_clip tokenizer (``open_clip.get_tokenizer(...)``);
        ``preprocess_cfg`` supplies ``mean``/``std`` (default: the one open_clip attached
        to ``model.visual``, else the OpenAI CLIP constants).
        """
        visual = getattr(model, "visual", None)
        if visual is None:
            raise DataError(f"{name}: not an open_clip CLIP model (no .visual).")
        cfg = dict(preprocess_cfg or getattr(visual, "preprocess_cfg", None) or {})
        mean = cfg.get("mean") or OPENAI_CLIP_MEAN
        std = cfg.get("std") or OPENAI_CLIP_STD
        trunk = getattr(visual, "trunk", None)
        if trunk is not None and hasattr(trunk, "blocks") and hasattr(trunk, "patch_embed"):
            return _OpenClipTimm(model, tokenizer, name=name, mean=mean, std=std)
        if hasattr(visual, "conv1") and hasattr(visual, "transformer"):
            return _OpenClipNative(model, tokenizer, name=name, mean=mean, std=std)
        raise DataError(f"{name}: unsupported open_clip image tower {type(visual).__name__} "
                        "(MWM needs a ViT: a timm VisionTransformer trunk or open_clip's "
                        "VisionTransformer).")

    @classmethod
    def from_hf_clip(cls, model: nn.Module, tokenizer: Callable, *,
                     mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                     name: str = "hf-clip") -> "VLMAdapter":
        """Wrap a transformers ``CLIPModel`` (or a port with the same module layout)."""
        return _HFClip(model, tokenizer, name=name, mean=mean or OPENAI_CLIP_MEAN,
                       std=std or OPENAI_CLIP_STD)

    # ----- common

    def freeze(self) -> None:
        """eval() and no gradients for any weight (M2IB optimizes only its own alphas)."""
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for p in self.model.parameters():
            return p.dtype
        return torch.float32

    @property
    def grid(self) -> tuple[int, int]:
        n = self.image_size // self.patch_size
        return (n, n)

    @property
    def depth(self) -> int:
        return len(self.blocks())

    def to(self, device: str | torch.device) -> "VLMAdapter":
        self.model.to(device)
        self._text_cache = {k: v.to(device) for k, v in self._text_cache.items()}
        return self

    # ----- text

    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """(P, D) L2-normalized text embeddings (no caching; see :meth:`embed_prompts`)."""
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise DataError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        out = []
        with torch.no_grad():
            for i in range(0, len(prompts), TEXT_BATCH):
                out.append(self._encode_text(prompts[i:i + TEXT_BATCH]).float())
        return F.normalize(torch.cat(out), dim=-1)

    def embed_prompts(self, prompts: Sequence[str | Sequence[str]]) -> Tensor:
        """(N, D) one L2-normalized embedding per item; each distinct string encoded once.

        An item may be a list of strings (a prompt ensemble): the normalized embeddings
        of its strings are averaged and renormalized. Embeddings are cached on the
        adapter, so repeated calls never re-encode a string.
        """
        items = [[p] if isinstance(p, str) else list(p) for p in prompts]
        for item in items:
            if not item or not all(isinstance(s, str) and s.strip() for s in item):
                raise DataError(f"every prompt must be a non-empty string (or a non-empty list "
                                f"of them), got {item!r}")
        missing = list(dict.fromkeys(s for item in items for s in item if s not in self._text_cache))
        if missing:
            for s, e in zip(missing, self.encode_text(missing)):
                self._text_cache[s] = e
        rows = [torch.stack([self._text_cache[s] for s in item]).mean(0) for item in items]
        return F.normalize(torch.stack(rows), dim=-1)

    # ----- image: pieces (backend specific)

    def embed(self, pixels: Tensor) -> Tensor:
        """Tokens entering block 0: (B, T, C) (patch embed, prefix tokens, positions, pre-norm)."""
        raise NotImplementedError

    def blocks(self) -> Sequence[nn.Module]:
        """The vision transformer blocks, in order."""
        raise NotImplementedError

    def run_blocks(self, tokens: Tensor, start: int, stop: int) -> Tensor:
        """Apply blocks ``start .. stop-1`` to (B, T, C) tokens."""
        blocks = self.blocks()
        if not 0 <= start <= stop <= len(blocks):
            raise DataError(f"block range {start}:{stop} outside 0:{len(blocks)}")
        for block in blocks[start:stop]:
            tokens = self._run_block(block, tokens)
        return tokens

    def _run_block(self, block: nn.Module, tokens: Tensor) -> Tensor:
        return block(tokens)

    def pool(self, tokens: Tensor) -> Tensor:
        """Final tokens → (B, D) L2-normalized image embedding."""
        raise NotImplementedError

    def encode_image(self, pixels: Tensor) -> Tensor:
        """(B, D) L2-normalized image embedding computed piecewise (equals the model's own)."""
        return self.pool(self.run_blocks(self.embed(pixels), 0, self.depth))

    def reference_image_features(self, pixels: Tensor) -> Tensor:
        """The wrapped model's own image encoder, L2-normalized (for checks)."""
        raise NotImplementedError

    def _encode_text(self, prompts: list[str]) -> Tensor:
        raise NotImplementedError

    # ----- geometry

    def prepare(self, image: np.ndarray) -> tuple[Tensor, Geometry]:
        """(3, H, W) float in [0, 1] → normalized (3, S, S) model input and its geometry.

        Gray (H, W) or (1, H, W) images are repeated over 3 channels. Pads
        symmetrically to a square with 0 (odd remainder bottom/right), resizes to
        ``image_size`` (bicubic, antialiased, clamped to [0, 1]) and normalizes with the
        model's mean/std.
        """
        arr = np.asarray(image)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3 or arr.shape[0] not in (1, 3) or min(arr.shape[1:]) < 1:
            raise DataError(f"image must be (3, H, W) (or gray (H, W)) in [0, 1], got shape "
                            f"{arr.shape}; use mwm.data.io.to_model_input.")
        if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f"image must hold numbers, got dtype {arr.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        if not torch.isfinite(x).all():
            raise DataError("image holds NaN or infinite values")
        if x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        h, w = int(x.shape[1]), int(x.shape[2])
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        geometry = Geometry(h, w, side, top, left, self.image_size)
        x = F.pad(x, (left, side - w - left, top, side - h - top), value=0.0)
        if side != self.image_size:
            x = F.interpolate(x[None], size=(self.image_size, self.image_size), mode="bicubic",
                              align_corners=False, antialias=True)[0].clamp_(0.0, 1.0)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return ((x - mean) / std).contiguous(), geometry

    def to_image(self, grid_map: Tensor | np.ndarray, geometry: Geometry) -> np.ndarray:
        """A map over the model's square input → (H, W) float32 aligned with the original.

        ``grid_map`` is (gh, gw) on the patch grid (or any (h, w) map covering the whole
        model input, e.g. ``image_size`` x ``image_size``). It is upsampled bilinearly
        (``align_corners=False``) to the padded square at original resolution and the
        padding is cropped.
        """
        m = torch.as_tensor(np.asarray(grid_map.detach().cpu() if isinstance(grid_map, Tensor)
                                       else grid_map), dtype=torch.float32)
        if m.ndim != 2:
            raise DataError(f"map must be 2-D (gh, gw), got shape {tuple(m.shape)}")
        g = geometry
        if tuple(m.shape) != (g.side, g.side):
            m = F.interpolate(m[None, None], size=(g.side, g.side), mode="bilinear",
                              align_corners=False)[0, 0]
        out = m[g.pad_top:g.pad_top + g.height, g.pad_left:g.pad_left + g.width]
        return np.ascontiguousarray(out.numpy(), dtype=np.float32)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, image_size={self.image_size}, "
                f"patch_size={self.patch_size}, depth={self.depth}, "
                f"prefix_tokens={self.num_prefix_tokens})")


class _OpenClipBase(VLMAdapter):
    backend = "open_clip"

    def __init__(self, model, tokenizer, *, name, mean, std, image_size, patch_size, prefix):
        self.tokenizer = tokenizer
        super().__init__(model, name=name, image_size=image_size, patch_size=patch_size,
                         num_prefix_tokens=prefix, mean=mean, std=std)

    def _encode_text(self, prompts: list[str]) -> Tensor:
        tokens = self.tokenizer(prompts)
        if not isinstance(tokens, Tensor):
            tokens = torch.as_tensor(tokens)
        return self.model.encode_text(tokens.to(self.device), normalize=True)

    def reference_image_features(self, pixels: Tensor) -> Tensor:
        return self.model.encode_image(pixels, normalize=True)


def _square(value, what: str, name: str) -> int:
    a, b = (value, value) if isinstance(value, int) else tuple(value)
    if a != b:
        raise DataError(f"{name}: non-square {what} {value} is not supported.")
    return int(a)


class _OpenClipTimm(_OpenClipBase):
    """open_clip with a timm VisionTransformer trunk (BiomedCLIP)."""

    def __init__(self, model, tokenizer, *, name, mean, std):
        trunk = model.visual.trunk
        pe = trunk.patch_embed
        super().__init__(model, tokenizer, name=name, mean=mean, std=std,
                         image_size=_square(pe.img_size, "image size", name),
                         patch_size=_square(pe.patch_size, "patch size", name),
                         prefix=int(getattr(trunk, "num_prefix_tokens", 1)))
        if getattr(trunk, "dynamic_img_size", False):
            raise DataError(f"{name}: timm trunks with dynamic_img_size are not supported.")

    def embed(self, pixels):
        t = self.model.visual.trunk
        x = t.patch_embed(pixels)
        x = t._pos_embed(x)
        x = t.patch_drop(x)
        return t.norm_pre(x)

    def blocks(self):
        return list(self.model.visual.trunk.blocks)

    def pool(self, tokens):
        visual = self.model.visual
        x = visual.trunk.forward_head(visual.trunk.norm(tokens))
        return F.normalize(visual.head(x), dim=-1)


class _OpenClipNative(_OpenClipBase):
    """open_clip's own VisionTransformer (OpenAI-style ViT)."""

    def __init__(self, model, tokenizer, *, name, mean, std):
        v = model.visual
        super().__init__(model, tokenizer, name=name, mean=mean, std=std,
                         image_size=_square(v.image_size, "image size", name),
                         patch_size=_square(v.patch_size, "patch size", name), prefix=1)
        self._batch_first = bool(getattr(v.transformer, "batch_first", True))

    def embed(self, pixels):
        v = self.model.visual
        if hasattr(v, "_embeds"):
            return v._embeds(pixels)
        x = v.conv1(pixels)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        return v.ln_pre(v.patch_dropout(x))

    def blocks(self):
        return list(self.model.visual.transformer.resblocks)

    def _run_block(self, block, tokens):
        if self._batch_first:
            return block(tokens)
        return block(tokens.transpose(0, 1)).transpose(0, 1)

    def pool(self, tokens):
        v = self.model.visual
        pooled, _ = v._pool(tokens)
        if v.proj is not None:
            pooled = pooled @ v.proj
        return F.normalize(pooled, dim=-1)


class _HFClip(VLMAdapter):
    """transformers CLIPModel (and ports with the same module layout)."""

    backend = "hf"

    def __init__(self, model, tokenizer, *, name, mean, std):
        vm = getattr(model, "vision_model", None)
        layout_ok = (vm is not None and hasattr(vm, "embeddings")
                     and hasattr(getattr(vm, "encoder", None), "layers")
                     and hasattr(vm, "post_layernorm") and hasattr(model, "visual_projection"))
        if not layout_ok:
            raise DataError(f"{name}: unsupported transformers model {type(model).__name__}: MWM "
                            "needs the CLIP layout (vision_model.embeddings, vision_model.encoder."
                            "layers, vision_model.post_layernorm, visual_projection).")
        vcfg = getattr(getattr(model, "config", None), "vision_config", None)
        image_size = getattr(vcfg, "image_size", None) or vm.embeddings.image_size
        patch_size = getattr(vcfg, "patch_size", None) or vm.embeddings.patch_size
        self.tokenizer = tokenizer
        layer = vm.encoder.layers[0]
        params = inspect.signature(layer.forward).parameters
        self._layer_args = (None, None) if "causal_attention_mask" in params else (None,)
        text_params = inspect.signature(model.get_text_features).parameters
        self._text_mask = "attention_mask" in text_params
        tcfg = getattr(getattr(model, "config", None), "text_config", None)
        self._max_len = int(getattr(tcfg, "max_position_embeddings", 77) or 77)
        super().__init__(model, name=name, image_size=_square(image_size, "image size", name),
                         patch_size=_square(patch_size, "patch size", name),
                         num_prefix_tokens=1, mean=mean, std=std)

    def embed(self, pixels):
        vm = self.model.vision_model
        x = vm.embeddings(pixels)
        pre = getattr(vm, "pre_layrnorm", None)
        return pre(x) if pre is not None else x

    def blocks(self):
        return list(self.model.vision_model.encoder.layers)

    def _run_block(self, block, tokens):
        out = block(tokens, *self._layer_args)
        return out[0] if isinstance(out, (tuple, list)) else out  # transformers 4.x: tuple

    def pool(self, tokens):
        vm = self.model.vision_model
        pooled = vm.post_layernorm(tokens[:, 0, :])
        return F.normalize(self.model.visual_projection(pooled), dim=-1)

    def reference_image_features(self, pixels):
        return F.normalize(_features(self.model.get_image_features(pixel_values=pixels)), dim=-1)

    def _encode_text(self, prompts):
        if self._text_mask:
            enc = self.tokenizer(prompts, padding=True, truncation=True, max_length=self._max_len,
                                 return_tensors="pt")
            out = self.model.get_text_features(input_ids=enc["input_ids"].to(self.device),
                                               attention_mask=enc["attention_mask"].to(self.device))
            return _features(out)
        rows = []  # no attention mask accepted: one unpadded prompt at a time
        for p in prompts:
            enc = self.tokenizer([p], truncation=True, max_length=self._max_len, return_tensors="pt")
            rows.append(_features(self.model.get_text_features(input_ids=enc["input_ids"].to(self.device))))
        return torch.cat(rows)


def _features(out: Any) -> Tensor:
    """get_*_features output: a tensor (transformers 4.x) or an output with pooler_output (5.x)."""
    if isinstance(out, Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if isinstance(pooled, Tensor):
        return pooled
    if isinstance(out, (tuple, list)) and isinstance(out[0], Tensor):
        return out[0]
    raise DataError(f"unexpected feature output {type(out).__name__}")


# --------------------------------------------------------------------------- loading


def load_vlm(name: str = DEFAULT_MODEL, *, device: str | torch.device = "cpu",
             trust_remote_code: bool = False, backend: str = "auto") -> VLMAdapter:
    """Load a CLIP-style model by name or folder (see the module docstring for names).

    Raises :class:`ModelUnavailableError` (a :class:`DataError`) when the weights are not
    in the local cache and the hub cannot be reached, and :class:`DataError` for a model
    that needs remote code without ``trust_remote_code=True`` or is not supported.
    """
    if backend not in BACKENDS:
        raise DataError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"model name must be a non-empty string, got {name!r}")
    name = name.strip()
    kind, ident, tag = _resolve(name, backend)
    if kind == "hf":
        adapter = _load_hf(name, ident, trust_remote_code)
    else:
        adapter = _load_open_clip(name, kind, ident, tag)
    return adapter.to(device)


def _resolve(name: str, backend: str) -> tuple[str, str, str | None]:
    """→ (kind, identifier, tag); kind ∈ open_clip_hub, open_clip_dir, open_clip_builtin, hf."""
    if name.startswith(LOCAL_DIR_PREFIX):
        path = Path(name[len(LOCAL_DIR_PREFIX):]).expanduser()
        if not path.is_dir():
            raise DataError(f"model folder {path} not found (from {name!r}).")
        return ("hf" if backend == "hf" else "open_clip_dir"), str(path), None
    if name.startswith(HF_HUB_PREFIX):
        ident = name[len(HF_HUB_PREFIX):]
        return ("hf" if backend == "hf" else "open_clip_hub"), ident, None
    path = Path(name).expanduser()
    if path.is_dir():
        has_oc = (path / "open_clip_config.json").is_file()
        has_hf = (path / "config.json").is_file()
        if backend == "open_clip" or (backend == "auto" and has_oc):
            return "open_clip_dir", str(path), None
        if has_hf or backend == "hf":
            return "hf", str(path), None
        raise DataError(f"model folder {path} holds neither open_clip_config.json (open_clip) "
                        "nor config.json (transformers).")
    if name.startswith(("/", "./", "../", "~")) or (os.sep != "/" and os.sep in name):
        raise DataError(f"model folder {path} not found.")
    if backend != "hf":
        import open_clip

        builtins = set(open_clip.list_models())
        base, _, tag = name.rpartition(":") if ":" in name else (name, "", "")
        base = base.replace("/", "-")
        if base in builtins:
            if not tag:
                tags = sorted(open_clip.list_pretrained_tags_by_model(base))
                raise DataError(f"open_clip model {base!r} needs a pretrained tag: "
                                f"{base}:TAG with TAG one of {tags or '(none known)'}.")
            return "open_clip_builtin", base, tag
    if backend == "open_clip":
        return "open_clip_hub", name, None
    return "hf", name, None


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants
        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover
        return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _cached(repo: str, filename: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(repo, filename), str)
    except Exception:
        return False


_UNAVAILABLE_TEXT = ("local cache", "cached files", "offline", "couldn't connect", "could not connect",
                     "connection", "failed to download", "required pretrained weights",
                     "cannot find the requested files", "no clip weights")


def _is_unavailable(err: BaseException) -> bool:
    seen = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        kind = type(e).__name__
        if kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionError",
                    "ConnectTimeout", "ReadTimeout"):
            return True
        text = str(e).lower()
        if any(t in text for t in _UNAVAILABLE_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False


def _chain_has(err: BaseException, kind: str) -> bool:
    seen = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if type(e).__name__ == kind:
            return True
        e = e.__cause__ or e.__context__
    return False


def _load_error(name: str, err: BaseException) -> DataError:
    """The one error a failed load raises: unavailable, not found, gated, or broken."""
    if _chain_has(err, "GatedRepoError"):
        return DataError(f"model {name!r} is gated on the Hugging Face hub: accept its licence "
                         "there and log in (huggingface-cli login / HF_TOKEN), or pass a local folder.")
    if _chain_has(err, "RepositoryNotFoundError"):
        return DataError(f"model {name!r} was not found on the Hugging Face hub; check the name "
                         "(open_clip hub models need the hf-hub: prefix).")
    if _is_unavailable(err):
        return model_unavailable(name, err)
    return DataError(f"model {name!r} could not be loaded: {type(err).__name__}: {err}")


def _load_open_clip(name: str, kind: str, ident: str, tag: str | None) -> VLMAdapter:
    import open_clip

    if kind == "open_clip_hub" and _hub_offline() and not _cached(ident, "open_clip_config.json"):
        raise model_unavailable(name)
    kwargs: dict[str, Any] = {"require_pretrained": True}
    if kind == "open_clip_dir":
        model_name = LOCAL_DIR_PREFIX + ident
        kwargs.update(_local_text_override(Path(ident)))
        if not any(any(Path(ident).glob(pat)) for pat in ("*.safetensors", "*.bin", "*.pth", "*.pt")):
            raise ModelUnavailableError(
                f"model folder {ident} holds open_clip_config.json but no weights file "
                "(open_clip_model.safetensors or open_clip_pytorch_model.bin).")
    elif kind == "open_clip_hub":
        model_name = HF_HUB_PREFIX + ident
    else:
        model_name = ident
        kwargs["pretrained"] = tag
    try:
        model = open_clip.create_model(model_name, device="cpu", **kwargs)
        tokenizer = open_clip.get_tokenizer(model_name)
    except ModelUnavailableError:
        raise
    except Exception as err:
        raise _load_error(name, err) from err
    return VLMAdapter.from_open_clip(model, tokenizer, name=name)


def _local_text_override(path: Path) -> dict:
    """A local open_clip folder that also holds its HF text tower's config.json.

    open_clip reads the HF text tower config (e.g. PubMedBERT's) from the hub id named in
    ``open_clip_config.json``; when the folder holds that config, read it from there so
    a copied folder works offline without the text model in the HF cache.
    """
    if not (path / "config.json").is_file():
        return {}
    try:
        cfg = json.loads((path / "open_clip_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    text_cfg = dict(cfg.get("model_cfg", {}).get("text_cfg", {}))
    if not text_cfg.get("hf_model_name"):
        return {}
    text_cfg.update(hf_model_name=str(path), hf_model_pretrained=False)
    return {"text_cfg": text_cfg}


def _load_hf(name: str, ident: str, trust_remote_code: bool) -> VLMAdapter:
    import transformers

    try:
        config, _ = transformers.PretrainedConfig.get_config_dict(ident)
    except Exception as err:
        if _hub_offline() and not _chain_has(err, "RepositoryNotFoundError"):
            raise model_unavailable(name, err) from err
        raise _load_error(name, err) from err
    model_type = config.get("model_type")
    needs_code = model_type != "clip" and "auto_map" in config
    if needs_code and not trust_remote_code:
        raise DataError(
            f"model {name!r} needs custom model code from its repository (model_type "
            f"{model_type!r}); MWM never runs downloaded code by default. If you trust its "
            "source, pass --trust-remote-code (trust_remote_code=True).")
    try:
        if model_type == "clip":
            model = transformers.CLIPModel.from_pretrained(ident)
        elif needs_code:
            model = transformers.AutoModel.from_pretrained(ident, trust_remote_code=True)
        else:
            raise DataError(f"model {name!r}: transformers model_type {model_type!r} is not "
                            "supported (use a CLIP model, or an open_clip model).")
        tokenizer = transformers.AutoTokenizer.from_pretrained(ident, trust_remote_code=trust_remote_code)
    except DataError:
        raise
    except Exception as err:
        raise _load_error(name, err) from err
    mean, std = _hf_mean_std(ident)
    return VLMAdapter.from_hf_clip(model, tokenizer, mean=mean, std=std, name=name)


def _hf_mean_std(ident: str) -> tuple[Sequence[float], Sequence[float]]:
    """image_mean/std from preprocessor_config.json (no code runs); OpenAI CLIP otherwise."""
    try:
        from transformers.image_processing_base import ImageProcessingMixin
        cfg, _ = ImageProcessingMixin.get_image_processor_dict(ident)
        mean, std = cfg.get("image_mean"), cfg.get("image_std")
        if mean and std and len(mean) == 3 and len(std) == 3:
            return tuple(mean), tuple(std)
    except Exception:
        pass
    return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
