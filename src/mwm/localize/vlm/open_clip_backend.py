"""The open_clip backend: BiomedCLIP (timm ViT trunk) and open_clip's own ViT.

* models with a timm ViT trunk (BiomedCLIP: ``model.visual.trunk`` patch_embed /
  _pos_embed / norm_pre / blocks / norm, then open_clip's head/projection; any text tower:
  built-in transformer or HF BERT);
* models with the native ``VisionTransformer`` (conv1 / class_embedding /
  positional_embedding / ln_pre / transformer.resblocks / ln_post / proj).

Names it loads (``backend="auto"`` asks it first): ``hf-hub:ORG/REPO``,
``local-dir:PATH``, an existing folder with ``open_clip_config.json``, and a built-in
``NAME:TAG`` such as ``ViT-B-16:openai``. Asked for by name (``backend="open_clip"``) it
also reads any folder as an open_clip folder and a bare ``ORG/REPO`` as ``hf-hub:ORG/REPO``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import DataError, ModelUnavailableError
from ..hub import hub_cached, hub_offline, load_error, model_unavailable
from .base import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, VLM_BACKENDS, Resolved, VLMAdapter,
                   square_size)

HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pth", "*.pt")


def wrap_open_clip(model: nn.Module, tokenizer: Callable, preprocess_cfg: dict | None = None,
                   *, name: str = "open_clip") -> VLMAdapter:
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


class _OpenClipTimm(_OpenClipBase):
    """open_clip with a timm VisionTransformer trunk (BiomedCLIP)."""

    def __init__(self, model, tokenizer, *, name, mean, std):
        trunk = model.visual.trunk
        pe = trunk.patch_embed
        super().__init__(model, tokenizer, name=name, mean=mean, std=std,
                         image_size=square_size(pe.img_size, "image size", name),
                         patch_size=square_size(pe.patch_size, "patch size", name),
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
                         image_size=square_size(v.image_size, "image size", name),
                         patch_size=square_size(v.patch_size, "patch size", name), prefix=1)
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


class OpenClipBackend:
    """Which names open_clip loads, and how (see the module docstring)."""

    name = "open_clip"

    def resolve(self, name: str, forced: bool) -> Resolved | None:
        if name.startswith(LOCAL_DIR_PREFIX):
            return Resolved(self.name, "dir", name[len(LOCAL_DIR_PREFIX):])
        if name.startswith(HF_HUB_PREFIX):
            return Resolved(self.name, "hub", name[len(HF_HUB_PREFIX):])
        path = Path(name).expanduser()
        if path.is_dir():
            return Resolved(self.name, "dir", str(path)) if (
                forced or (path / "open_clip_config.json").is_file()) else None
        builtin = _builtin(name)
        if builtin is not None:
            return builtin
        return Resolved(self.name, "hub", name) if forced else None

    def load(self, resolved: Resolved, name: str, trust_remote_code: bool) -> VLMAdapter:
        import open_clip

        kind, ident = resolved.kind, resolved.ident
        if kind == "hub" and hub_offline() and not hub_cached(ident, "open_clip_config.json"):
            raise model_unavailable(name)
        kwargs: dict[str, Any] = {"require_pretrained": True}
        if kind == "dir":
            model_name = LOCAL_DIR_PREFIX + ident
            kwargs.update(_local_text_override(Path(ident)))
            if not any(any(Path(ident).glob(pattern)) for pattern in WEIGHT_PATTERNS):
                raise ModelUnavailableError(
                    f"model folder {ident} holds open_clip_config.json but no weights file "
                    "(open_clip_model.safetensors or open_clip_pytorch_model.bin).")
        elif kind == "hub":
            model_name = HF_HUB_PREFIX + ident
        else:
            model_name = ident
            kwargs["pretrained"] = resolved.tag
        try:
            model = open_clip.create_model(model_name, device="cpu", **kwargs)
            tokenizer = open_clip.get_tokenizer(model_name)
        except ModelUnavailableError:
            raise
        except Exception as err:
            raise load_error(name, err) from err
        return wrap_open_clip(model, tokenizer, name=name)


def _builtin(name: str) -> Resolved | None:
    """``NAME:TAG`` of an open_clip built-in model (a built-in name without a tag is an error)."""
    import open_clip

    base, _, tag = name.rpartition(":") if ":" in name else (name, "", "")
    base = base.replace("/", "-")
    if base not in set(open_clip.list_models()):
        return None
    if not tag:
        tags = sorted(open_clip.list_pretrained_tags_by_model(base))
        raise DataError(f"open_clip model {base!r} needs a pretrained tag: "
                        f"{base}:TAG with TAG one of {tags or '(none known)'}.")
    return Resolved(OpenClipBackend.name, "builtin", base, tag)


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


VLM_BACKENDS.register(OpenClipBackend.name, OpenClipBackend())
