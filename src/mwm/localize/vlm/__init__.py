"""One adapter over CLIP-style vision-language models, split at the vision blocks.

* :mod:`.base` — the interface (:class:`VLMAdapter`: embed → blocks → pool, text
  embeddings, the image geometry) and the backend registry :data:`VLM_BACKENDS`;
* :mod:`.open_clip_backend` — open_clip models (BiomedCLIP's timm trunk, open_clip's ViT);
* :mod:`.hf_backend` — transformers ``CLIPModel`` and remote-code ports;
* :mod:`.loading` — :func:`load_vlm`: a name or folder → the backend that loads it.

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

Adding a backend: one module that subclasses :class:`VLMAdapter` for its models, a class
with ``resolve``/``load`` and one ``VLM_BACKENDS.register(...)`` line, imported below.
"""

from ...errors import ModelUnavailableError
from .base import VLM_BACKENDS, Geometry, Resolved, VLMAdapter
from .open_clip_backend import wrap_open_clip
from .hf_backend import wrap_hf_clip
from .loading import DEFAULT_MODEL, backend_choices, load_vlm, resolve

__all__ = ["DEFAULT_MODEL", "Geometry", "ModelUnavailableError", "Resolved", "VLMAdapter",
           "VLM_BACKENDS", "backend_choices", "load_vlm", "resolve", "wrap_hf_clip",
           "wrap_open_clip"]
