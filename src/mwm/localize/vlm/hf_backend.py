"""The transformers backend: ``CLIPModel`` and remote-code ports with the same layout.

The adapter runs ``vision_model.embeddings / pre_layrnorm / encoder.layers /
post_layernorm / visual_projection``; remote-code ports load only with
``trust_remote_code=True``.

Names it loads (``backend="auto"`` asks it after open_clip): an existing folder with
``config.json`` (transformers' own layout) and any other ``ORG/REPO`` id, e.g.
``openai/clip-vit-base-patch16``. Asked for by name (``backend="hf"``) it also reads
``hf-hub:ORG/REPO`` as the id ``ORG/REPO`` and ``local-dir:PATH`` as a folder.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import DataError
from ..hub import chain_has, hub_offline, load_error, model_unavailable
from .base import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, VLM_BACKENDS, Resolved, VLMAdapter,
                   square_size)
from .open_clip_backend import HF_HUB_PREFIX, LOCAL_DIR_PREFIX


def wrap_hf_clip(model: nn.Module, tokenizer: Callable, *,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 name: str = "hf-clip") -> VLMAdapter:
    """Wrap a transformers ``CLIPModel`` (or a port with the same module layout)."""
    return _HFClip(model, tokenizer, name=name, mean=mean or OPENAI_CLIP_MEAN,
                   std=std or OPENAI_CLIP_STD)


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
        super().__init__(model, name=name, image_size=square_size(image_size, "image size", name),
                         patch_size=square_size(patch_size, "patch size", name),
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


class HFBackend:
    """Which names transformers loads, and how (see the module docstring)."""

    name = "hf"

    def resolve(self, name: str, forced: bool) -> Resolved | None:
        for prefix in (LOCAL_DIR_PREFIX, HF_HUB_PREFIX):
            if name.startswith(prefix):
                return Resolved(self.name, "id", name[len(prefix):]) if forced else None
        path = Path(name).expanduser()
        if path.is_dir():
            return Resolved(self.name, "id", str(path)) if (
                forced or (path / "config.json").is_file()) else None
        return Resolved(self.name, "id", name)

    def load(self, resolved: Resolved, name: str, trust_remote_code: bool) -> VLMAdapter:
        import transformers

        ident = resolved.ident
        try:
            config, _ = transformers.PretrainedConfig.get_config_dict(ident)
        except Exception as err:
            if hub_offline() and not chain_has(err, "RepositoryNotFoundError"):
                raise model_unavailable(name, err) from err
            raise load_error(name, err) from err
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
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                ident, trust_remote_code=trust_remote_code)
        except DataError:
            raise
        except Exception as err:
            raise load_error(name, err) from err
        mean, std = _hf_mean_std(ident)
        return wrap_hf_clip(model, tokenizer, mean=mean, std=std, name=name)


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


VLM_BACKENDS.register(HFBackend.name, HFBackend())
