"""One clear error for model weights that cannot be loaded (offline, not cached).

Every loader of pretrained weights (open_clip, transformers CLIP and SAM, timm) turns
its library's network/cache error into :class:`ModelUnavailableError`, which names the
model and says how to provide the weights.
"""

from __future__ import annotations

from ..errors import ModelUnavailableError


# Defaults live here (no torch import) so that `mwm --help` stays fast.
DEFAULT_VLM = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
DEFAULT_SAM = "facebook/sam-vit-base"


def model_unavailable(name: str, err: BaseException | None = None) -> ModelUnavailableError:
    reason = f" ({type(err).__name__}: {str(err).splitlines()[0][:200]})" if err else ""
    return ModelUnavailableError(
        f"model {name!r} cannot be loaded: its weights are not in the local cache and the "
        f"model hub cannot be reached{reason}. Provide them in one of two ways: run once on a "
        "machine with network access (with HF_HUB_OFFLINE unset) so the Hugging Face cache "
        "(~/.cache/huggingface, or $HF_HOME) holds them and copy that cache here; or download "
        "the model folder and pass its path (open_clip models: --model local-dir:PATH).")
