"""Model hub facts shared by every loader of pretrained weights, and their one error.

Every loader of pretrained weights (open_clip, transformers CLIP and SAM, timm) turns
its library's network/cache error into :class:`~mwm.errors.ModelUnavailableError`,
which names the model and says how to provide the weights (:func:`model_unavailable`,
:func:`load_error`). Nothing here imports torch, so `mwm --help` stays fast.
"""

from __future__ import annotations

import os

from ..errors import DataError, ModelUnavailableError

DEFAULT_VLM = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
DEFAULT_SAM = "facebook/sam-vit-base"

# Fragments of the messages with which huggingface_hub, open_clip and transformers say
# that weights are not cached and the hub cannot be reached.
_UNAVAILABLE_TEXT = ("local cache", "cached files", "offline", "couldn't connect", "could not connect",
                     "connection", "failed to download", "required pretrained weights",
                     "cannot find the requested files", "no clip weights")
_UNAVAILABLE_TYPES = ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionError",
                      "ConnectTimeout", "ReadTimeout")


def model_unavailable(name: str, err: BaseException | None = None) -> ModelUnavailableError:
    reason = f" ({type(err).__name__}: {str(err).splitlines()[0][:200]})" if err else ""
    return ModelUnavailableError(
        f"model {name!r} cannot be loaded: its weights are not in the local cache and the "
        f"model hub cannot be reached{reason}. Provide them in one of two ways: run once on a "
        "machine with network access (with HF_HUB_OFFLINE unset) so the Hugging Face cache "
        "(~/.cache/huggingface, or $HF_HOME) holds them and copy that cache here; or download "
        "the model folder and pass its path (open_clip models: --model local-dir:PATH).")


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off (``HF_HUB_OFFLINE``)."""
    try:
        from huggingface_hub import constants
        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - huggingface_hub is a dependency of open_clip
        return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def hub_cached(repo: str, filename: str) -> bool:
    """Whether ``repo``'s ``filename`` is in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(repo, filename), str)
    except Exception:
        return False


def _causes(err: BaseException):
    seen = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def chain_has(err: BaseException, kind: str) -> bool:
    """Whether ``err`` or anything that caused it is of the class named ``kind``."""
    return any(type(e).__name__ == kind for e in _causes(err))


def is_unavailable(err: BaseException) -> bool:
    """Whether ``err`` says that weights are not cached and the hub cannot be reached."""
    return any(type(e).__name__ in _UNAVAILABLE_TYPES
               or any(t in str(e).lower() for t in _UNAVAILABLE_TEXT) for e in _causes(err))


def load_error(name: str, err: BaseException) -> DataError:
    """The one error a failed load raises: unavailable, not found, gated, or broken."""
    if chain_has(err, "GatedRepoError"):
        return DataError(f"model {name!r} is gated on the Hugging Face hub: accept its licence "
                         "there and log in (huggingface-cli login / HF_TOKEN), or pass a local folder.")
    if chain_has(err, "RepositoryNotFoundError"):
        return DataError(f"model {name!r} was not found on the Hugging Face hub; check the name "
                         "(open_clip hub models need the hf-hub: prefix).")
    if is_unavailable(err):
        return model_unavailable(name, err)
    return DataError(f"model {name!r} could not be loaded: {type(err).__name__}: {err}")
