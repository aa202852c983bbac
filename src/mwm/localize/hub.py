"""Model hub facts shared by every loader of pretrained weights, and their one error.

Every loader of pretrained weights (open_clip, transformers CLIP and SAM, timm) turns
its library's network/cache error into :class:`~mwm.errors.ModelUnavailableError`,
which names the model and says how to provide the weights (:func:`model_unavailable`,
:func:`load_error`). Loads run inside :func:`hub_guard`: when the hub does not answer a
quick connection check, they read the local cache only, so a missing model is reported
at once instead of after half a minute of retries. A model folder may carry the M2IB
settings it works best with (:data:`RECOMMENDED_M2IB`, :func:`read_recommended_m2ib`).
Nothing here imports torch, so `mwm --help` stays fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from ..errors import DataError, ModelUnavailableError

DEFAULT_VLM = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
DEFAULT_SAM = "facebook/sam-vit-base"

#: A model folder's recommended M2IB settings (``mwm clip train`` writes it); the
#: settings a run leaves out are taken from it, then from M2IB's defaults.
RECOMMENDED_M2IB = "m2ib_recommended.json"
RECOMMENDABLE = ("layer", "beta", "noise_scale", "standardize")
#: Seconds the hub (or the proxy) has to accept a connection before loads go offline.
REACH_TIMEOUT = 1.5

# Fragments of the messages with which huggingface_hub, open_clip and transformers say
# that weights are not cached and the hub cannot be reached.
_UNAVAILABLE_TEXT = ("local cache", "cached files", "offline", "couldn't connect", "could not connect",
                     "connection", "failed to download", "required pretrained weights",
                     "cannot find the requested files", "no clip weights")
_UNAVAILABLE_TYPES = ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionError",
                      "ConnectTimeout", "ReadTimeout")
VLM_HINT = "open_clip models: --model local-dir:PATH; transformers CLIP models: --model PATH"
SAM_HINT = ("a transformers SamModel folder with config.json, the weights and "
            "preprocessor_config.json, e.g. from `huggingface-cli download facebook/sam-vit-base "
            "--local-dir DIR` on a machine with network: --model DIR")
_unreachable: str | None = None  # while hub_guard reads the cache only: why


def model_unavailable(name: str, err: BaseException | None = None, *,
                      hint: str = VLM_HINT) -> ModelUnavailableError:
    why = f"; {offline_reason()}" if offline_reason() else ""
    reason = f" ({type(err).__name__}: {str(err).splitlines()[0][:200]})" if err else ""
    return ModelUnavailableError(
        f"model {name!r} cannot be loaded: its weights are not in the local cache and the "
        f"model hub cannot be reached{why}{reason}. Provide them in one of two ways: run once "
        "on a machine with network access (with HF_HUB_OFFLINE unset) so the Hugging Face "
        "cache (~/.cache/huggingface, or $HF_HOME) holds them and copy that cache here; or "
        f"download the model folder and pass its path ({hint}).")


def offline_reason() -> str | None:
    """Why loads read the local cache only: the hub did not answer, or HF_HUB_OFFLINE."""
    if _unreachable:
        return _unreachable
    return "HF_HUB_OFFLINE is set" if hub_offline() else None


def hub_address() -> tuple[str, int]:
    """Host and port a hub request connects to: the proxy's if one applies, else the hub's
    (``HF_ENDPOINT``, default https://huggingface.co)."""
    try:
        from huggingface_hub import constants
        endpoint = constants.ENDPOINT
    except Exception:  # pragma: no cover - huggingface_hub is a dependency of open_clip
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)


def hub_reachable(timeout: float = REACH_TIMEOUT) -> bool:
    """Whether :func:`hub_address` accepts a TCP connection within ``timeout`` seconds.

    In a thread, because a name lookup ignores socket timeouts and can hang for long."""
    host, port = hub_address()
    answered: list[bool] = []

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                answered.append(True)
        except OSError:
            answered.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(answered and answered[0])


@contextlib.contextmanager
def hub_guard():
    """Loads inside read the local cache only when the hub does not answer at once.

    Without it, huggingface_hub retries an unreachable hub for about 25 s before its
    error. Here one quick connection check (:data:`REACH_TIMEOUT`) decides: if the hub
    does not answer, huggingface_hub is switched offline for the duration, so cached
    files load at once and a missing model fails at once (its message says why).
    """
    global _unreachable
    if hub_offline() or hub_reachable():
        yield
        return
    from huggingface_hub import constants

    host, port = hub_address()
    saved, before = constants.HF_HUB_OFFLINE, _unreachable
    constants.HF_HUB_OFFLINE = True  # read by huggingface_hub and transformers on each call
    _unreachable = f"{host}:{port} did not answer within {REACH_TIMEOUT:g} s"
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, _unreachable = saved, before


def read_recommended_m2ib(folder: str | Path) -> dict:
    """The M2IB settings ``folder/m2ib_recommended.json`` recommends ({} without the file).

    Keys: any of :data:`RECOMMENDABLE` (and ``note``, a free text); the values are
    checked against the model where they are used (``M2IBConfig.for_model``).
    """
    path = Path(folder) / RECOMMENDED_M2IB
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not readable JSON ({err}); fix or delete that file.") from err
    unknown = sorted(set(data) - set(RECOMMENDABLE) - {"note"}) if isinstance(data, dict) else None
    if unknown is None or unknown:
        raise DataError(f"{path}: expected a JSON object with some of {', '.join(RECOMMENDABLE)} "
                        f"(and note){f', not {unknown}' if unknown else ''}, e.g. "
                        '{"layer": 2, "noise_scale": 0.5}; fix or delete that file.')
    return {k: data[k] for k in RECOMMENDABLE if k in data}


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


def load_error(name: str, err: BaseException, *, hint: str = VLM_HINT) -> DataError:
    """The one error a failed load raises: unavailable, not found, gated, or broken."""
    if chain_has(err, "GatedRepoError"):
        return DataError(f"model {name!r} is gated on the Hugging Face hub: accept its licence "
                         "there and log in (huggingface-cli login / HF_TOKEN), or pass a local folder.")
    if chain_has(err, "RepositoryNotFoundError"):
        return DataError(f"model {name!r} was not found on the Hugging Face hub; check the name "
                         "(open_clip hub models need the hf-hub: prefix).")
    if is_unavailable(err):
        return model_unavailable(name, err, hint=hint)
    return DataError(f"model {name!r} could not be loaded: {type(err).__name__}: {err}")
